import { createHash, randomBytes } from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import type { Readable } from "node:stream";
import { InternalError, InvalidArgumentError } from "@kiln/kit";
import { UnsafePathError } from "../errors.js";
import { isErrno } from "../store/local.js";
import type { AssetType } from "./model.js";

/**
 * Placing assets into VM directories: `<vm root>/<target_path>/<stable name>`, hard-linked from
 * the blob store (one inode, no bytes copied), copied when the link is impossible (another
 * filesystem: EXDEV; hardening or link limits: EPERM, EMLINK), or downloaded when the blob store
 * keeps no local files (S3). All or nothing: on any failure, every file this call placed is
 * removed again (a file it replaced stays replaced).
 *
 * A hard link shares the blob's inode: a VM that writes to its rootfs writes to the stored blob.
 * Committed blobs are read-only (0444), but root ignores modes, so VM backends open placed files
 * read-only or put a copy-on-write layer over them (QEMU `snapshot=on`, an overlay).
 */

/** The file name an asset gets in a VM directory. */
export function stableFileName(type: AssetType, name: string): string {
  switch (type) {
    case "ROOTFS":
      return "rootfs.ext4";
    case "KERNEL":
      return "vmlinux";
    case "INITRD":
      return "initrd";
    case "DISK_IMAGE":
      return name;
  }
}

/** Checks a target path is plain and relative: no "..", ".", empty segments, NUL or leading "/". */
export function targetSegments(targetPath: string): string[] {
  if (targetPath === "" || targetPath.startsWith("/") || targetPath.includes("\0")) {
    throw new UnsafePathError("target_path", targetPath, "must be a relative path inside the VM root");
  }
  const segs = targetPath.split("/");
  if (segs.some((s) => s === "" || s === "." || s === "..")) {
    throw new UnsafePathError("target_path", targetPath, "must not contain '..', '.' or empty segments");
  }
  return segs;
}

/** Real paths of VM roots, created on first use (they are fixed for a process's life). */
const realRoots = new Map<string, string>();

function realRoot(vmRoot: string, again = false): string {
  let root = again ? undefined : realRoots.get(vmRoot);
  if (root === undefined) {
    fs.mkdirSync(vmRoot, { recursive: true });
    root = fs.realpathSync.native(vmRoot);
    realRoots.set(vmRoot, root);
  }
  return root;
}

/**
 * Resolves `<vmRoot>/<targetPath>`, creating missing directories, and refuses a path that passes
 * through a symlink or a non-directory, or that resolves outside the VM root.
 *
 * The walk and the hard links of `placeFiles` use synchronous calls: they are metadata-only
 * syscalls on a local directory, well under a millisecond each, and the thread pool round trip
 * each asynchronous one added dominated the placement's latency (p50 0.7 → 0.2 ms, p99 4 → 1 ms
 * for a new two-level target and two links). Copies and downloads, which move bytes, stay
 * asynchronous.
 */
export async function resolveVmTarget(vmRoot: string, targetPath: string): Promise<string> {
  const segs = targetSegments(targetPath);
  try {
    return walkTarget(realRoot(vmRoot), segs, targetPath);
  } catch (err) {
    if (!isErrno(err, "ENOENT")) throw err;
    return walkTarget(realRoot(vmRoot, true), segs, targetPath); // root removed under us: again
  }
}

function walkTarget(root: string, segs: readonly string[], targetPath: string): string {
  let cur = root;
  for (const seg of segs) {
    cur = path.join(cur, seg);
    // mkdir(2) never follows a symlink in the last component: success means a new, real
    // directory; EEXIST means something is there already, and lstat says what.
    try {
      fs.mkdirSync(cur, 0o755);
      continue;
    } catch (err) {
      if (!isErrno(err, "EEXIST")) throw err;
    }
    const st = fs.lstatSync(cur);
    const rel = path.relative(root, cur);
    if (st.isSymbolicLink())
      throw new UnsafePathError("target_path", targetPath, `passes through the symlink ${rel}`);
    if (!st.isDirectory())
      throw new UnsafePathError("target_path", targetPath, `passes through ${rel}, which is not a directory`);
  }
  // Belt and braces against a component swapped for a symlink while we walked.
  const real = fs.realpathSync.native(cur);
  if (real !== path.join(root, ...segs)) {
    throw new UnsafePathError("target_path", targetPath, "resolves outside the VM root");
  }
  return cur;
}

export interface PlacementItem {
  assetId: string;
  fileName: string;
  digest: string;
  /** The blob as a local file (local store); else `open` is used. */
  localPath: string | undefined;
  open: () => Promise<Readable>;
}

export type PlacementMethod = "hardlink" | "copy" | "download";

export interface Placed {
  assetId: string;
  path: string;
  method: PlacementMethod;
}

/** One file of a placement in progress, and how to undo it. */
interface Staged {
  item: PlacementItem;
  final: string;
  method: PlacementMethod;
  /** Set when the file waits under a temporary name for the rename into `final`. */
  temp?: string;
  /** True when `final` was created by this placement (undone by unlinking it). */
  created: boolean;
}

/**
 * Places every item into `dir` under its file name, all or nothing. The common case — a new
 * VM directory on the store's filesystem — is one link(2) per file straight to its final name
 * (atomic: the name appears with the complete content). Replacing an existing file, copying and
 * downloading go through a temporary name and a rename. `commit` (recording the placement) runs
 * once every file is in place; when it fails, the placement is undone like any other failure.
 */
export async function placeFiles(
  dir: string,
  items: readonly PlacementItem[],
  commit: (placed: Placed[]) => Promise<void> = async () => {},
): Promise<Placed[]> {
  const names = new Map<string, string>();
  for (const item of items) {
    const other = names.get(item.fileName);
    if (other !== undefined && other !== item.assetId) {
      throw new InvalidArgumentError(
        `assets ${other} and ${item.assetId} would both be placed as ${item.fileName}: prepare them into different target paths`,
        { field: "asset_ids" },
      );
    }
    names.set(item.fileName, item.assetId);
  }
  const unique = items.filter((item, i) => items.findIndex((o) => o.assetId === item.assetId) === i);
  const tag = randomBytes(6).toString("hex");
  const settled = await Promise.allSettled(unique.map((item) => stage(dir, item, tag)));
  const staged = settled.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
  const renamed: string[] = [];
  try {
    const failed = settled.find((r): r is PromiseRejectedResult => r.status === "rejected");
    if (failed) throw failed.reason;
    for (const s of staged) {
      if (!s.temp) continue;
      await fsp.rename(s.temp, s.final);
      renamed.push(s.final);
    }
    const placed = staged.map((s) => ({ assetId: s.item.assetId, path: s.final, method: s.method }));
    await commit(placed);
    return placed;
  } catch (err) {
    for (const s of staged) {
      if (s.temp) await fsp.rm(s.temp, { force: true }).catch(() => {});
      if (s.created) await fsp.rm(s.final, { force: true }).catch(() => {});
    }
    for (const f of renamed) await fsp.rm(f, { force: true }).catch(() => {});
    throw err;
  }
}

async function stage(dir: string, item: PlacementItem, tag: string): Promise<Staged> {
  const final = path.join(dir, item.fileName);
  const temp = path.join(dir, `.kiln-prepare-${tag}-${item.fileName}`);
  if (item.localPath) {
    try {
      fs.linkSync(item.localPath, final); // synchronous: see resolveVmTarget
      return { item, final, method: "hardlink", created: true };
    } catch (err) {
      if (isErrno(err, "EEXIST")) {
        // Already there: nothing to do when it is this blob, else replace it.
        const [have, want] = await Promise.all([fsp.lstat(final), fsp.stat(item.localPath)]);
        if (have.ino === want.ino && have.dev === want.dev)
          return { item, final, method: "hardlink", created: false };
      } else if (!isErrno(err, "EXDEV", "EPERM", "EMLINK")) {
        throw wrapPlacement(err, item);
      }
    }
  }
  try {
    const method = await placeOne(item, temp);
    return { item, final, method, temp, created: false };
  } catch (err) {
    await fsp.rm(temp, { force: true }).catch(() => {});
    throw err instanceof InternalError ? err : wrapPlacement(err, item);
  }
}

async function placeOne(item: PlacementItem, temp: string): Promise<PlacementMethod> {
  if (item.localPath) {
    try {
      await fsp.link(item.localPath, temp);
      return "hardlink";
    } catch (err) {
      if (!isErrno(err, "EXDEV", "EPERM", "EMLINK")) throw wrapPlacement(err, item);
    }
    try {
      // A reflink where the filesystem can (btrfs, xfs), a byte copy otherwise.
      await fsp.copyFile(item.localPath, temp, fs.constants.COPYFILE_FICLONE);
      return "copy";
    } catch (err) {
      throw wrapPlacement(err, item);
    }
  }
  await download(item, temp);
  return "download";
}

/** Streams a blob into `temp`, verifying its digest on the way (a corrupt object is not placed). */
async function download(item: PlacementItem, temp: string): Promise<void> {
  const hash = createHash("sha256");
  const handle = await fsp.open(temp, "wx", 0o444);
  try {
    const body = await item.open();
    for await (const chunk of body) {
      const buf = chunk as Buffer;
      hash.update(buf);
      let offset = 0;
      while (offset < buf.length) offset += (await handle.write(buf, offset)).bytesWritten;
    }
    await handle.sync();
  } finally {
    await handle.close();
  }
  const actual = `sha256:${hash.digest("hex")}`;
  if (actual !== item.digest) {
    throw new InternalError(
      `stored blob of asset ${item.assetId} is corrupt: expected ${item.digest}, read ${actual}`,
    );
  }
}

function wrapPlacement(err: unknown, item: PlacementItem): Error {
  const reason = err instanceof Error ? err.message : String(err);
  if (isErrno(err, "ENOENT")) {
    return new InternalError(
      `blob ${item.digest} of asset ${item.assetId} is missing from the store: ${reason}`,
      {
        cause: err,
      },
    );
  }
  return new InternalError(`could not place asset ${item.assetId}: ${reason}`, { cause: err });
}
