/**
 * Applies one OCI image layer (an uncompressed tar stream) onto a rootfs directory, with the
 * layer semantics of the OCI image spec (layer.md) as `umoci raw unpack` implements them, and
 * without ever creating, writing or removing anything outside the rootfs.
 *
 * How safety holds:
 * - Entry names and hardlink targets are split into components; absolute names and `..` are
 *   refused (entry-path.ts).
 * - Every parent directory is resolved component by component with lstat (root-resolver.ts):
 *   symlinks are read and followed inside the rootfs, absolute targets restart at the rootfs root,
 *   and anything leading above the root or looping is refused. The resolved parent is a chain of
 *   real directories, so the OS never follows a symlink in it.
 * - The final component is never followed: files are created with O_CREAT|O_EXCL|O_NOFOLLOW (an
 *   existing path is removed first), symlinks and hardlinks with symlink(2)/link(2) (which do not
 *   follow the new path), metadata with lchown/lutimes or on the open descriptor, and chmod only on
 *   a path just confirmed (by mkdir or lstat) to be a real directory.
 * - This process is the only writer of the rootfs while a layer is applied, so a check is not
 *   raced by another actor; the layer itself can only change the tree through these entries.
 *
 * With `imageData`, regular files' content goes into the data area of the ext4 image being built
 * (rootfs/ext4/data-area.ts), and the file in the rootfs holds a placeholder naming where.
 *
 * Syscalls are synchronous on purpose: each takes microseconds on a local filesystem, while a
 * round trip through libuv's threadpool would dominate the per-entry cost of images made of
 * thousands of small files. The event loop still runs between chunks and entries, which arrive
 * asynchronously from the decompressor.
 */
import fs from "node:fs";
import path from "node:path";
import type { Readable } from "node:stream";
import { InvalidArgumentError, KilnError } from "@kiln/kit/errors";
import { writeAllSync } from "@kiln/kit/fs";
import {
  BLOCK_SIZE,
  blocksFor,
  DATA_START_BLOCK,
  decodePlaceholder,
  encodePlaceholder,
  placeholderSized,
} from "../rootfs/ext4/data-area.js";
import { type Xattr, xattrsFitBlock } from "../rootfs/ext4/xattrs.js";
import { type EntryMetadata, entryMetadata } from "./entry-metadata.js";
import { entryComponents } from "./entry-path.js";
import {
  InvalidLayerError,
  LayerEntryFailedError,
  LayerTooLargeError,
  TooManyEntriesError,
  UnsafeLayerEntryError,
} from "./errors.js";
import { createRootResolver, type RootResolver } from "./root-resolver.js";
import { readTar, type TarEntry } from "./tar-reader.js";
import { classifyWhiteout, removeLower } from "./whiteouts.js";

export interface ApplyLayerOptions {
  /** Running byte budget for the whole image (tenant's MaxDiskBytes); 0 = unlimited. */
  maxBytes: number;
  /** Bytes already used by earlier layers (the budget is for the image, not per layer). */
  usedBytes?: number;
  /** Most entries one layer may have (default DEFAULT_MAX_ENTRIES): bounds inode bombs of empty files. */
  maxEntries?: number;
  /** Apply uid/gid (default: true when running as root). */
  chown?: boolean;
  signal?: AbortSignal;
  onProgress?: (bytesWritten: number) => void;
  /**
   * Write each non-empty regular file's content into the image open at `fd` (positioned writes, each
   * file block-aligned from block `nextBlock` on) and leave a placeholder in the rootfs instead.
   */
  imageData?: { fd: number; nonce: Buffer; nextBlock: number };
}

export interface ApplyLayerResult {
  entries: number;
  /** Content bytes, and with `imageData` the names and values of the extended attributes kept. */
  bytesWritten: number;
  skipped: Array<{ path: string; reason: string }>;
  /** With `imageData`: the first block after this layer's content, where the next layer starts. */
  nextBlock?: number;
}

/** Far above any real layer (a full Debian is ~30k entries), far below what exhausts inodes. */
export const DEFAULT_MAX_ENTRIES = 1_000_000;

const PROGRESS_EVERY_BYTES = 4 * 1024 * 1024;
const O_CREATE_NEW =
  fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW;

interface Times {
  atime: number;
  mtime: number;
}

export async function applyLayer(
  rootfs: string,
  tarStream: Readable,
  opts: ApplyLayerOptions,
): Promise<ApplyLayerResult> {
  const root = path.resolve(rootfs);
  const signal = opts.signal;
  let rootStat: fs.Stats;
  try {
    rootStat = fs.statSync(root);
  } catch (err) {
    tarStream.destroy();
    const missing = (err as NodeJS.ErrnoException).code === "ENOENT";
    throw new InvalidArgumentError(
      missing
        ? `rootfs ${root} does not exist; create it before applying layers`
        : `rootfs ${root} cannot be read: ${(err as Error).message}`,
      { cause: err },
    );
  }
  if (!rootStat.isDirectory()) {
    tarStream.destroy();
    throw new InvalidArgumentError(`rootfs ${root} is not a directory`);
  }
  const nextBlock = opts.imageData?.nextBlock;
  if (nextBlock !== undefined && !(Number.isSafeInteger(nextBlock) && nextBlock >= DATA_START_BLOCK)) {
    tarStream.destroy();
    // Below the data area are the superblock and group descriptors, which content must not overwrite.
    throw new InvalidArgumentError(
      `imageData.nextBlock ${nextBlock} is not in the image's data area (blocks ${DATA_START_BLOCK} and up)`,
    );
  }
  if (signal?.aborted) {
    tarStream.destroy();
    throw signal.reason;
  }

  const applier = createLayerApplier(root, rootStat, opts);
  let sourceError: unknown;
  const onSourceError = (err: unknown) => {
    sourceError ??= err;
  };
  const onAbort = () => tarStream.destroy(signal?.reason);
  tarStream.on("error", onSourceError);
  signal?.addEventListener("abort", onAbort, { once: true });
  let done = false;
  try {
    for await (const entry of readTar(tarStream)) {
      await applier.apply(entry);
    }
    applier.finish();
    done = true;
    return applier.result();
  } catch (err) {
    if (signal?.aborted) throw signal.reason;
    // Write errors name no file: a full filesystem is the operator's to find.
    const where = opts.imageData
      ? `no space: the tree is written in ${root}, file content into the build's image file`
      : `no space: the tree is written in ${root}`;
    throw explain(err, sourceError, applier.position(), where);
  } finally {
    signal?.removeEventListener("abort", onAbort);
    if (!done) tarStream.destroy();
  }
}

/** Turns filesystem errors into errors that name the entry and what to do (the reader's name it already). */
function explain(err: unknown, sourceError: unknown, at: Position, noSpaceHint: string): unknown {
  if (err instanceof KilnError || err === sourceError) return err;
  const e = err as NodeJS.ErrnoException;
  if (typeof e?.code === "string" && e.code.startsWith("Z_")) {
    return new InvalidLayerError(
      `layer is not valid compressed data (${e.message}); the blob is corrupt`,
      at.entry,
      {
        cause: err,
      },
    );
  }
  if (typeof e?.code === "string" && /^E[A-Z]+$/.test(e.code)) {
    const hint = e.code === "ENOSPC" || e.code === "EDQUOT" ? noSpaceHint : undefined;
    return new LayerEntryFailedError(at.entry ?? "(before the first entry)", err, hint);
  }
  return new LayerEntryFailedError(at.entry ?? "(before the first entry)", err);
}

interface Position {
  entry: string | undefined;
  declared: number;
  remaining: number;
}

function truncatedEntry(at: Position): InvalidLayerError {
  return new InvalidLayerError(
    `layer tar ends in the middle of entry ${JSON.stringify(at.entry)} (declared ${at.declared} bytes); ` +
      "it is truncated or corrupt",
    at.entry,
  );
}

interface LayerApplier {
  apply(entry: TarEntry): Promise<void>;
  finish(): void;
  result(): ApplyLayerResult;
  position(): Position;
}

function createLayerApplier(root: string, rootStat: fs.Stats, opts: ApplyLayerOptions): LayerApplier {
  const chown = opts.chown ?? process.getuid?.() === 0;
  const maxBytes = opts.maxBytes > 0 ? opts.maxBytes : Number.POSITIVE_INFINITY;
  const usedBefore = opts.usedBytes ?? 0;
  const maxEntries = opts.maxEntries ?? DEFAULT_MAX_ENTRIES;
  const signal = opts.signal;
  const image = opts.imageData;
  let nextBlock = image?.nextBlock ?? 0;

  let entries = 0;
  let bytesWritten = 0;
  let lastProgress = 0;
  const skipped: ApplyLayerResult["skipped"] = [];
  /** Extended attributes not kept: how many, and the first, for one report per layer. */
  let xattrDrops = 0;
  let firstXattrDrop: { path: string; reason: string } | undefined;
  const pos: Position = { entry: undefined, declared: 0, remaining: 0 };

  /** Paths (resolved, relative to root) this layer created, and their ancestors: whiteouts spare them. */
  const upper = new Set<string>();
  /**
   * Directory times to set when the layer is done (adding children changes a directory's mtime):
   * the header's times for directory entries, the previous times for directories that existed.
   */
  const dirTimes = new Map<string, Times>([
    ["", { atime: seconds(rootStat.atimeMs), mtime: seconds(rootStat.mtimeMs) }],
  ]);

  const resolver: RootResolver = createRootResolver(root, {
    onExistingDir(rel, st) {
      if (!dirTimes.has(rel)) dirTimes.set(rel, { atime: seconds(st.atimeMs), mtime: seconds(st.mtimeMs) });
    },
  });

  const abs = (rel: string) => (rel === "" ? root : `${root}/${rel}`);
  const join = (dir: string, name: string) => (dir === "" ? name : `${dir}/${name}`);

  function markUpper(rel: string): void {
    let p = rel;
    while (p !== "" && !upper.has(p)) {
      upper.add(p);
      const i = p.lastIndexOf("/");
      p = i < 0 ? "" : p.slice(0, i);
    }
  }

  function forgetTimesUnder(rel: string): void {
    const prefix = `${rel}/`;
    for (const key of dirTimes.keys()) if (key === rel || key.startsWith(prefix)) dirTimes.delete(key);
  }

  /** Removes whatever is at `rel` so a new entry can take its place (umoci's clobber). */
  function clobber(rel: string): void {
    const p = abs(rel);
    const st = fs.lstatSync(p, { throwIfNoEntry: false });
    if (!st) return;
    if (st.isDirectory()) {
      fs.rmSync(p, { recursive: true, force: true });
      forgetTimesUnder(rel);
    } else {
      fs.unlinkSync(p);
    }
    if (st.isDirectory() || st.isSymbolicLink()) resolver.invalidate();
    else resolver.forget(rel);
  }

  function checkIds(name: string, m: EntryMetadata): void {
    if (!chown) return;
    // 0xffffffff is chown's "leave unchanged"; anything above does not fit a uid_t.
    const valid = (id: number) => Number.isSafeInteger(id) && id >= 0 && id < 0xffffffff;
    if (!valid(m.uid) || !valid(m.gid)) {
      throw new InvalidLayerError(`layer entry ${JSON.stringify(name)} has an invalid uid or gid`, name);
    }
  }

  function dropXattrs(name: string, attr: string, reason: string): void {
    xattrDrops++;
    firstXattrDrop ??= { path: name, reason: `${attr}: ${reason}` };
  }

  /**
   * Sets `xattrs` on the placeholder at `rel` (merged over those it has, as setxattr would on a
   * hard link's inode), keeping its times; an empty plain file becomes a placeholder with no content.
   */
  function addXattrs(name: string, rel: string, xattrs: Xattr[]): void {
    const p = abs(rel);
    const st = fs.lstatSync(p);
    const current =
      st.size === 0
        ? { block: nextBlock, length: 0, xattrs: [] }
        : placeholderSized(st.size)
          ? decodePlaceholder(fs.readFileSync(p), image!.nonce)
          : undefined;
    if (!st.isFile() || !current) {
      for (const a of xattrs) dropXattrs(name, a.name, "the hard link's target is not a regular file");
      return;
    }
    const merged = new Map(current.xattrs.map((a) => [a.name, a.value]));
    for (const a of xattrs) merged.set(a.name, a.value);
    const all = [...merged].map(([n, value]) => ({ name: n, value }));
    if (!xattrsFitBlock(all)) {
      for (const a of xattrs) dropXattrs(name, a.name, "the inode's attributes would exceed one ext4 block");
      return;
    }
    const added = xattrBytes(all) - xattrBytes(current.xattrs);
    if (usedBefore + bytesWritten + added > maxBytes) throw new LayerTooLargeError(opts.maxBytes, name);
    bytesWritten += Math.max(0, added);
    const fd = fs.openSync(p, fs.constants.O_WRONLY | fs.constants.O_TRUNC | fs.constants.O_NOFOLLOW);
    try {
      writeAllSync(fd, encodePlaceholder(image!.nonce, current, all), 0);
      fs.futimesSync(fd, st.atime, st.mtime);
    } finally {
      fs.closeSync(fd);
    }
  }

  async function writeFile(
    entry: TarEntry,
    name: string,
    parentComps: string[],
    base: string,
    m: EntryMetadata,
  ) {
    const size = entry.header.size;
    // Kept attributes take room in the image too (in the inode, or a block of their own).
    const attrBytes = image ? xattrBytes(m.xattrs) : 0;
    if (usedBefore + bytesWritten + size + attrBytes > maxBytes)
      throw new LayerTooLargeError(opts.maxBytes, name);
    const rel = join(resolver.resolveDir(parentComps, name, true)!, base);
    const p = abs(rel);
    let fd: number;
    try {
      fd = fs.openSync(p, O_CREATE_NEW, 0o600);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      clobber(rel);
      fd = fs.openSync(p, O_CREATE_NEW, 0o600);
    }
    resolver.forget(rel);
    markUpper(rel);
    try {
      pos.declared = size;
      pos.remaining = size;
      if (size > 0) {
        const block = nextBlock;
        const start = block * BLOCK_SIZE;
        for await (const chunk of entry) {
          if (signal?.aborted) throw signal.reason;
          const buf = chunk as Buffer;
          if (usedBefore + bytesWritten + buf.length > maxBytes)
            throw new LayerTooLargeError(opts.maxBytes, name);
          const offset = size - pos.remaining;
          if (image) writeAllSync(image.fd, buf, start + offset);
          else writeAllSync(fd, buf, offset);
          bytesWritten += buf.length;
          pos.remaining -= buf.length;
          if (opts.onProgress && bytesWritten - lastProgress >= PROGRESS_EVERY_BYTES) {
            lastProgress = bytesWritten;
            opts.onProgress(bytesWritten);
          }
        }
        // The reader fails a short entry and never yields more than declared; checked anyway, since
        // a placeholder must name exactly the bytes written.
        if (pos.remaining !== 0) throw truncatedEntry(pos);
        if (image) {
          writeAllSync(fd, encodePlaceholder(image.nonce, { block, length: size }, m.xattrs), 0);
          nextBlock = block + blocksFor(size);
        }
      } else if (image && m.xattrs.length > 0) {
        // No content, but attributes: a placeholder carries them all the same.
        writeAllSync(fd, encodePlaceholder(image.nonce, { block: nextBlock, length: 0 }, m.xattrs), 0);
      }
      bytesWritten += attrBytes;
      if (!image) {
        for (const a of m.xattrs)
          dropXattrs(name, a.name, "only Kiln's ext4 writer keeps them (ext4Writer=kiln)");
      }
      // chmod after chown: chown clears setuid/setgid.
      if (chown) fs.fchownSync(fd, m.uid, m.gid);
      fs.fchmodSync(fd, m.mode);
      fs.futimesSync(fd, m.atime, m.mtime);
    } finally {
      fs.closeSync(fd);
    }
  }

  function makeDir(name: string, parentComps: string[], base: string, m: EntryMetadata): void {
    const rel = join(resolver.resolveDir(parentComps, name, true)!, base);
    const p = abs(rel);
    try {
      fs.mkdirSync(p, 0o755);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      // An existing directory is kept (its children merge); anything else is replaced.
      if (!fs.lstatSync(p).isDirectory()) {
        clobber(rel);
        fs.mkdirSync(p, 0o755);
      }
    }
    resolver.setDir(rel);
    markUpper(rel);
    if (chown) fs.lchownSync(p, m.uid, m.gid);
    fs.chmodSync(p, m.mode);
    dirTimes.set(rel, { atime: m.atime, mtime: m.mtime });
  }

  function makeSymlink(
    name: string,
    parentComps: string[],
    base: string,
    target: string,
    m: EntryMetadata,
  ): void {
    if (target === "")
      throw new InvalidLayerError(`symlink ${JSON.stringify(name)} has an empty target`, name);
    const rel = join(resolver.resolveDir(parentComps, name, true)!, base);
    const p = abs(rel);
    try {
      fs.symlinkSync(target, p);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      clobber(rel);
      fs.symlinkSync(target, p);
    }
    resolver.setSymlink(rel, target);
    markUpper(rel);
    if (chown) fs.lchownSync(p, m.uid, m.gid);
    fs.lutimesSync(p, m.atime, m.mtime);
  }

  /** Links `name` to `linkname`'s inode; returns the inode's path relative to the root. */
  function makeHardlink(name: string, parentComps: string[], base: string, linkname: string): string {
    const target = entryComponents(linkname, name, "hardlink target");
    if (target.length === 0) throw new UnsafeLayerEntryError(name, "the hardlink target is the rootfs root");
    const targetDir = resolver.resolveDir(target.slice(0, -1), name, false);
    const missing = () =>
      new UnsafeLayerEntryError(
        name,
        `the hardlink target ${JSON.stringify(linkname)} does not exist in the rootfs`,
      );
    if (targetDir === null) throw missing();
    const targetRel = join(targetDir, target[target.length - 1]!);
    const targetStat = fs.lstatSync(abs(targetRel), { throwIfNoEntry: false });
    if (!targetStat) throw missing();
    if (targetStat.isDirectory()) {
      throw new InvalidLayerError(
        `layer entry ${JSON.stringify(name)} is a hardlink to the directory ${JSON.stringify(linkname)}`,
        name,
      );
    }
    const rel = join(resolver.resolveDir(parentComps, name, true)!, base);
    if (rel === targetRel) return rel; // already the same file
    const p = abs(rel);
    try {
      fs.linkSync(abs(targetRel), p);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      clobber(rel);
      try {
        fs.linkSync(abs(targetRel), p);
      } catch (err2) {
        if ((err2 as NodeJS.ErrnoException).code !== "ENOENT") throw err2;
        throw new InvalidLayerError(
          `hardlink ${JSON.stringify(name)} replaced its own target ${JSON.stringify(linkname)}`,
          name,
          { cause: err2 },
        );
      }
    }
    resolver.forget(rel);
    markUpper(rel);
    return rel;
  }

  function applyRoot(entry: TarEntry, name: string, m: EntryMetadata): void {
    if (entry.header.type !== "directory") {
      throw new UnsafeLayerEntryError(
        name,
        `a ${entry.header.type} entry would replace the rootfs root itself`,
      );
    }
    if (chown) fs.lchownSync(root, m.uid, m.gid);
    fs.chmodSync(root, m.mode);
    dirTimes.set("", { atime: m.atime, mtime: m.mtime });
  }

  async function apply(entry: TarEntry): Promise<void> {
    const h = entry.header;
    const name = h.name;
    pos.entry = name;
    pos.declared = 0;
    pos.remaining = 0;
    if (signal?.aborted) throw signal.reason;
    if (++entries > maxEntries) throw new TooManyEntriesError(maxEntries, name);

    const comps = entryComponents(name);
    const m = entryMetadata(h);
    for (const d of m.droppedXattrs) dropXattrs(name, d.name, d.reason);
    checkIds(name, m);
    if (comps.length === 0) return applyRoot(entry, name, m);
    const base = comps[comps.length - 1]!;
    const parentComps = comps.slice(0, -1);

    const whiteout = classifyWhiteout(base, name);
    if (whiteout) {
      const dir = resolver.resolveDir(parentComps, name, false);
      if (dir === null) return; // nothing below a missing directory to remove
      const target = whiteout.kind === "opaque" ? dir : join(dir, whiteout.name);
      let stale = false;
      removeLower(root, target, upper, whiteout.kind === "opaque", (rel, st) => {
        if (st.isDirectory()) forgetTimesUnder(rel);
        if (st.isDirectory() || st.isSymbolicLink()) stale = true;
        else resolver.forget(rel);
      });
      if (stale) resolver.invalidate();
      return;
    }

    switch (h.type) {
      case "file":
      case "contiguous-file":
        return writeFile(entry, name, parentComps, base, m);
      case "directory":
      case "symlink":
        if (h.type === "directory") makeDir(name, parentComps, base, m);
        else makeSymlink(name, parentComps, base, h.linkname, m);
        for (const a of m.xattrs) dropXattrs(name, a.name, `not kept on a ${h.type}`);
        return;
      case "link": {
        const rel = makeHardlink(name, parentComps, base, h.linkname);
        if (m.xattrs.length === 0) return;
        if (image) addXattrs(name, rel, m.xattrs);
        else
          for (const a of m.xattrs)
            dropXattrs(name, a.name, "only Kiln's ext4 writer keeps them (ext4Writer=kiln)");
        return;
      }
      case "character-device":
      case "block-device":
      case "fifo":
        // Parents are still created, as umoci does before its mknod.
        markUpper(resolver.resolveDir(parentComps, name, true)!);
        skipped.push({
          path: name,
          reason: `${h.type} entries are not created (the VM's init mounts devtmpfs on /dev)`,
        });
        return;
      default:
        throw new InvalidLayerError(
          `layer entry ${JSON.stringify(name)} has an unsupported tar entry type (${JSON.stringify(h.typeflag)})`,
          name,
        );
    }
  }

  function finish(): void {
    for (const [rel, t] of dirTimes) {
      try {
        fs.lutimesSync(abs(rel), t.atime, t.mtime);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
      }
    }
    if (opts.onProgress && bytesWritten !== lastProgress) opts.onProgress(bytesWritten);
    if (firstXattrDrop) {
      skipped.push({
        path: firstXattrDrop.path,
        reason: `${xattrDrops} extended attribute${xattrDrops === 1 ? "" : "s"} not kept in this layer; the first, ${firstXattrDrop.reason}`,
      });
    }
  }

  return {
    apply,
    finish,
    result: () => ({ entries, bytesWritten, skipped, ...(image ? { nextBlock } : {}) }),
    position: () => ({ ...pos }),
  };
}

/** What extended attributes take, counted against the byte budget: their names and values. */
function xattrBytes(xattrs: readonly Xattr[]): number {
  let n = 0;
  for (const a of xattrs) n += Buffer.byteLength(a.name) + a.value.length;
  return n;
}

function seconds(ms: number): number {
  return ms / 1000;
}
