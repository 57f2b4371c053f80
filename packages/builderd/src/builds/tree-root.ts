import { createHash } from "node:crypto";
import fsp from "node:fs/promises";
import path from "node:path";
import type { Logger } from "@kiln/kit";

/**
 * Where extracted trees are assembled when Kiln's ext4 writer makes the image.
 *
 * With that writer a tree holds no file content (it is in the image file already), only its
 * shape: directories, links, modes, owners and a 64-byte placeholder per file. Every one of those
 * is a metadata operation, and on a disk-backed filesystem a file create can cost hundreds of
 * microseconds (measured 0.6–0.8 ms on the CI machines' ext4, 7 µs on tmpfs), which made creating
 * the tree cost more than writing the content. So by default the tree goes on a tmpfs, at
 * `/dev/shm`, when there is one; it costs about 4 KiB of memory per file while the build runs.
 *
 * A tmpfs is small in places (a container's /dev/shm is 64 MiB by default): "auto" takes it only
 * with MIN_FREE_BYTES free, and each build checks again (`roomFor`), extracting in its build dir
 * when there is less.
 *
 * The directory is `<base>/kiln-builderd-<id>`, `<id>` derived from the data dir, so builderds
 * with different data dirs never share one. `/dev/shm` is writable by every local user, so a
 * directory found there is used only if it is a real directory owned by this process's user;
 * it is made private (0700). Anything in it is left from an earlier process (a builderd owns its
 * data dir alone) and is deleted at start-up.
 */

/** The tmpfs tried by "auto". */
export const DEFAULT_TMPFS = "/dev/shm";
/** statfs(2) f_type of a tmpfs. */
const TMPFS_MAGIC = 0x01021994;
/** Free space a tree root needs to take a build's tree: a 30,000-file tree takes ~120 MB. */
export const MIN_FREE_BYTES = 512 * 1024 * 1024;

export interface TreeRootOptions {
  /** "auto": a tmpfs at `tmpfs` if there is one, else in the build dir; "build"; or an absolute directory. */
  setting: string;
  dataDir: string;
  log: Logger;
  /** For tests: the tmpfs "auto" tries. */
  tmpfs?: string;
  /** For tests: instead of MIN_FREE_BYTES. */
  minFreeBytes?: number;
}

/**
 * Prepares the directory extracted trees go under, emptied of anything an earlier process left;
 * undefined when trees go in their build dirs. An explicit directory that cannot be used fails
 * start-up; "auto" falls back to the build dirs, with a warning saying why.
 */
export async function prepareTreeRoot(opts: TreeRootOptions): Promise<string | undefined> {
  const { setting, log } = opts;
  if (setting === "build") return undefined;
  const base = setting === "auto" ? (opts.tmpfs ?? DEFAULT_TMPFS) : setting;
  if (!path.isAbsolute(base)) {
    throw new Error(`UNKEY_BUILDERD_TREE_DIR must be "auto", "build" or an absolute directory, not ${base}`);
  }
  try {
    if (setting === "auto") {
      if (!(await isTmpfs(base))) {
        log.info({ path: base }, "no tmpfs for extracted trees; they are assembled in the build dirs");
        return undefined;
      }
      const free = await freeBytes(base);
      if (free < (opts.minFreeBytes ?? MIN_FREE_BYTES)) {
        log.info(
          { path: base, free_bytes: free },
          "the tmpfs has too little room for extracted trees; they are assembled in the build dirs",
        );
        return undefined;
      }
    }
    const root = treeRootPath(base, opts.dataDir);
    await ownPrivateDir(root);
    for (const name of await fsp.readdir(root))
      await fsp.rm(path.join(root, name), { recursive: true, force: true });
    return root;
  } catch (err) {
    if (setting !== "auto") throw err;
    log.warn(
      { err, path: base },
      "cannot use the tmpfs for extracted trees; they are assembled in the build dirs",
    );
    return undefined;
  }
}

/** The tree root under `base` of the builderd whose data dir is `dataDir`. */
export function treeRootPath(base: string, dataDir: string): string {
  const id = createHash("sha256").update(path.resolve(dataDir)).digest("hex").slice(0, 16);
  return path.join(base, `kiln-builderd-${id}`);
}

/** Whether `dir`'s filesystem has room for another build's tree. */
export async function roomFor(dir: string, minFreeBytes = MIN_FREE_BYTES): Promise<boolean> {
  return (await freeBytes(dir).catch(() => 0)) >= minFreeBytes;
}

async function freeBytes(dir: string): Promise<number> {
  const s = await fsp.statfs(dir);
  return s.bavail * s.bsize;
}

export async function isTmpfs(dir: string): Promise<boolean> {
  try {
    return (await fsp.statfs(dir)).type === TMPFS_MAGIC;
  } catch {
    return false;
  }
}

/** Makes `dir` (mode 0700) or accepts it if it is a real directory this user owns; then 0700. */
async function ownPrivateDir(dir: string): Promise<void> {
  await fsp.mkdir(dir, { mode: 0o700 }).catch((err: NodeJS.ErrnoException) => {
    if (err.code !== "EEXIST") throw err;
  });
  const st = await fsp.lstat(dir);
  const uid = process.getuid?.();
  if (!st.isDirectory()) throw new Error(`${dir} exists and is not a directory`);
  if (uid !== undefined && st.uid !== uid)
    throw new Error(`${dir} belongs to uid ${st.uid}, not to this process (uid ${uid})`);
  // lstat said it is our directory and not a symlink: nobody else can swap it now.
  if ((st.mode & 0o777) !== 0o700) await fsp.chmod(dir, 0o700);
}

/**
 * Deletes the tree root and whatever is still in it (graceful stop, once no build runs: leave no
 * litter on the tmpfs). Everything there is this builderd's (checked at start-up).
 */
export async function removeTreeRoot(root: string): Promise<void> {
  await fsp.rm(root, { recursive: true, force: true }).catch(() => {});
}
