import { InvalidArgumentError } from "@kiln/kit";
import { readFileInRoot } from "./in-root.js";

const FIELD = "config.target.microvm_rootfs.runtime_config.user";
const MAX_ID = 0xfffffffe; // (uid_t)-1 means "unchanged" to setuid(2)

export interface ResolvedUser {
  uid: number;
  gid: number;
}

/**
 * Resolves an image's USER (`user`, `uid`, `user:group`, `uid:gid`, any mix) to numeric ids
 * through the image's /etc/passwd and /etc/group, with Docker's rules: empty means root; a
 * numeric uid without a passwd entry gets gid 0; a name that is not found is an error.
 */
export async function resolveUser(rootfs: string, user: string): Promise<ResolvedUser> {
  const spec = user.trim();
  if (spec === "") return { uid: 0, gid: 0 };
  const colon = spec.indexOf(":");
  const userPart = colon >= 0 ? spec.slice(0, colon) : spec;
  const groupPart = colon >= 0 ? spec.slice(colon + 1) : undefined;
  if (userPart === "" || groupPart === "") {
    throw new InvalidArgumentError(
      `user ${JSON.stringify(user)} must be USER[:GROUP] (names or numeric ids)`,
      {
        field: FIELD,
      },
    );
  }

  const passwd = parseColonFile(await readFileInRoot(rootfs, "etc/passwd"));
  let uid: number;
  let gid = 0;
  const numericUid = parseId(userPart);
  if (numericUid !== undefined) {
    uid = numericUid;
    const entry = passwd.find((f) => parseId(f[2] ?? "") === uid);
    if (entry) gid = parseId(entry[3] ?? "") ?? 0;
  } else {
    const entry = passwd.find((f) => f[0] === userPart);
    if (!entry) {
      if (userPart === "root")
        return { uid: 0, gid: groupPart ? await resolveGroup(rootfs, groupPart, user) : 0 };
      throw new InvalidArgumentError(
        `user ${JSON.stringify(userPart)} is not in the image's /etc/passwd; use a numeric uid[:gid] or add the user to the image`,
        { field: FIELD },
      );
    }
    const u = parseId(entry[2] ?? "");
    if (u === undefined) {
      throw new InvalidArgumentError(
        `the image's /etc/passwd entry for ${JSON.stringify(userPart)} has no valid uid`,
        {
          field: FIELD,
        },
      );
    }
    uid = u;
    gid = parseId(entry[3] ?? "") ?? 0;
  }
  if (groupPart !== undefined) gid = await resolveGroup(rootfs, groupPart, user);
  return { uid, gid };
}

async function resolveGroup(rootfs: string, group: string, user: string): Promise<number> {
  const numeric = parseId(group);
  if (numeric !== undefined) return numeric;
  const groups = parseColonFile(await readFileInRoot(rootfs, "etc/group"));
  const entry = groups.find((f) => f[0] === group);
  const gid = entry ? parseId(entry[2] ?? "") : undefined;
  if (gid === undefined) {
    throw new InvalidArgumentError(
      `group ${JSON.stringify(group)} (of user ${JSON.stringify(user)}) is not in the image's /etc/group; use a numeric gid`,
      { field: FIELD },
    );
  }
  return gid;
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
