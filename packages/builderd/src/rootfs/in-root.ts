import fs from "node:fs/promises";
import path from "node:path";

const MAX_SYMLINKS = 40;

/**
 * Resolves `rel` inside `root` the way the guest would see it: symlinks are followed, but an
 * absolute target restarts at `root` and `..` stops at `root`, so the result never leaves it
 * (like a chroot, or Go's securejoin). Returns the host path; the final component need not exist.
 */
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
    if (++links > MAX_SYMLINKS) throw new Error(`too many symbolic links resolving ${rel} in the image`);
    const target = await fs.readlink(candidate);
    if (target.startsWith("/")) resolved.length = 0;
    pending.unshift(...splitPath(target));
  }
  return path.join(root, ...resolved);
}

/** Reads a file of the image (e.g. /etc/passwd) without following links out of the rootfs. */
export async function readFileInRoot(root: string, rel: string): Promise<string | undefined> {
  const p = await resolveInRoot(root, rel);
  try {
    const st = await fs.stat(p);
    if (!st.isFile()) return undefined;
    return await fs.readFile(p, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw err;
  }
}

function splitPath(p: string): string[] {
  return p.split("/").filter((s) => s !== "" && s !== ".");
}
