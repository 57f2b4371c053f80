import fs from "node:fs/promises";
import path from "node:path";
import { InvalidArgumentError } from "./errors.js";

const MAX_ID = 0xfffffffe; // (uid_t)-1 means "unchanged" to setuid(2)
const MAX_SYMLINKS = 40;

export interface ImageUser {
  uid: number;
  gid: number;
  /** Supplementary groups: the groups of /etc/group that list the user by name. */
  additionalGids: number[];
}

/**
 * Resolves an image's USER (`name`, `uid`, `name:group`, `uid:gid`, any mix) to numeric ids through
 * the image's /etc/passwd and /etc/group, with Docker's rules: empty means root; a numeric uid
 * without a passwd entry gets gid 0; a name that is not found is an error naming the field.
 * `root` is the image's root directory on the host; its files are read as the workload would
 * see them, so symlinks never lead out of it. `field` names the request field in errors.
 * (builderd resolves users when injecting the VM init, metald for container backends.)
 */
export async function resolveImageUser(root: string, user: string, field = "user"): Promise<ImageUser> {
  const spec = user.trim();
  if (spec === "") return { uid: 0, gid: 0, additionalGids: [] };
  const colon = spec.indexOf(":");
  const userPart = colon >= 0 ? spec.slice(0, colon) : spec;
  const groupPart = colon >= 0 ? spec.slice(colon + 1) : undefined;
  if (userPart === "" || groupPart === "") {
    throw new InvalidArgumentError(
      `user ${JSON.stringify(user)} must be USER[:GROUP] (names or numeric ids)`,
      {
        field,
      },
    );
  }
  const passwd = parseColonFile(await readFileInRoot(root, "etc/passwd"));
  const groups = parseColonFile(await readFileInRoot(root, "etc/group"));

  let uid: number;
  let gid = 0;
  let name: string | undefined;
  const numericUid = parseId(userPart);
  if (numericUid !== undefined) {
    uid = numericUid;
    const entry = passwd.find((f) => parseId(f[2] ?? "") === uid);
    if (entry) {
      gid = parseId(entry[3] ?? "") ?? 0;
      name = entry[0];
    }
  } else {
    const entry = passwd.find((f) => f[0] === userPart);
    const entryUid = entry ? parseId(entry[2] ?? "") : userPart === "root" ? 0 : undefined;
    if (entryUid === undefined) {
      throw new InvalidArgumentError(
        `user ${JSON.stringify(userPart)} is not in the image's /etc/passwd; use a numeric uid[:gid] or add the user to the image`,
        { field },
      );
    }
    uid = entryUid;
    gid = entry ? (parseId(entry[3] ?? "") ?? 0) : 0;
    name = userPart;
  }
  if (groupPart !== undefined) {
    const numeric = parseId(groupPart);
    const entry = numeric === undefined ? groups.find((f) => f[0] === groupPart) : undefined;
    const g = numeric ?? (entry ? parseId(entry[2] ?? "") : undefined);
    if (g === undefined) {
      throw new InvalidArgumentError(
        `group ${JSON.stringify(groupPart)} (of user ${JSON.stringify(user)}) is not in the image's /etc/group; use a numeric gid`,
        { field },
      );
    }
    gid = g;
  }
  const additionalGids =
    name === undefined
      ? []
      : groups
          .filter((f) => (f[3] ?? "").split(",").includes(name))
          .map((f) => parseId(f[2] ?? ""))
          .filter((g): g is number => g !== undefined && g !== gid);
  return { uid, gid, additionalGids: [...new Set(additionalGids)] };
}

/**
 * Reads a file of the image the way the container would see it: an absolute symlink target
 * restarts at `root` and `..` stops there (like a chroot). Undefined when missing or not a file.
 */
export async function readFileInRoot(root: string, rel: string): Promise<string | undefined> {
  const p = await resolveInRoot(root, rel);
  const st = await fs.stat(p).catch(() => undefined);
  if (!st?.isFile()) return undefined;
  return fs.readFile(p, "utf8");
}

/** The host path of `rel` inside `root`, following symlinks without leaving `root`. */
export async function resolveInRoot(root: string, rel: string): Promise<string> {
  const pending = splitPath(rel);
  const resolved: string[] = [];
  let links = 0;
  while (pending.length > 0) {
    const part = pending.shift()!;
    if (part === "..") {
      resolved.pop();
      continue;
    }
    const candidate = path.join(root, ...resolved, part);
    const st = await fs.lstat(candidate).catch(() => undefined);
    if (!st?.isSymbolicLink()) {
      resolved.push(part);
      continue;
    }
    if (++links > MAX_SYMLINKS) {
      throw new InvalidArgumentError(`too many symbolic links resolving /${rel} in the image`, {
        field: "rootfs",
      });
    }
    const target = await fs.readlink(candidate);
    if (target.startsWith("/")) resolved.length = 0;
    pending.unshift(...splitPath(target));
  }
  return path.join(root, ...resolved);
}

function splitPath(p: string): string[] {
  return p.split("/").filter((s) => s !== "" && s !== ".");
}

function parseColonFile(text: string | undefined): string[][] {
  if (!text) return [];
  return text
    .split("\n")
    .filter((l) => l.trim() !== "" && !l.startsWith("#"))
    .map((l) => l.split(":"));
}

function parseId(s: string): number | undefined {
  if (!/^\d{1,10}$/.test(s)) return undefined;
  const n = Number(s);
  return n <= MAX_ID ? n : undefined;
}
