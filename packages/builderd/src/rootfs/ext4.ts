import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import fs from "node:fs/promises";
import path from "node:path";
import { FailedPreconditionError, fsyncPath, InternalError, readFileChunks, sharedSpawner } from "@kiln/kit";
import { journalBytes } from "./ext4/format.js";

export interface Ext4Options {
  /** Free space to add on top of the content (default 32 MiB)… */
  headroomBytes?: number;
  /** …or this fraction of the content, whichever is larger (default 0.1). */
  headroomRatio?: number;
  /** Filesystem label (default "rootfs"; at most 16 bytes). */
  label?: string;
  /** The mkfs.ext4 to run (default: /usr/sbin/mkfs.ext4, /sbin/mkfs.ext4, then PATH). */
  mkfsPath?: string;
  /** Compute the image's sha256 (default true). Off when assetmanagerd hashes it on registration anyway. */
  checksum?: boolean;
  /**
   * fsync the image before returning (default true). Off when the image is handed to something
   * that makes it durable itself: assetmanagerd fsyncs a registered file while it hashes it.
   */
  sync?: boolean;
  signal?: AbortSignal;
}

const BLOCK = 4096;
const INODE_SIZE = 256;
/** Entries of one directory lstat-ed at once while measuring the tree. */
const LSTAT_BATCH = 64;
const MiB = 1 << 20;

export class MkfsError extends InternalError {
  constructor(
    message: string,
    readonly stderr: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/**
 * Makes an ext4 image of a directory with `mkfs.ext4 -d` (no mount, no loop device). The size
 * comes from the content, counted the way ext4 stores it (4 KiB blocks, each inode once,
 * directories, long symlinks, inode table, journal), plus headroom for the workload. If the
 * estimate is ever short, mkfs says so and the image is made again with 50% more blocks and inodes.
 * mkfs's own fsyncs are skipped where Debian's libeatmydata is installed: the image is flushed
 * once at the end instead, while it is hashed (for 156 MiB, ~45 ms less than mkfs syncing).
 * Returns the image size and its digest ("sha256:…").
 */
export async function buildExt4(
  rootfs: string,
  outFile: string,
  opts: Ext4Options = {},
): Promise<{ sizeBytes: number; sha256: string | undefined }> {
  const st = await fs.stat(rootfs).catch(() => undefined);
  if (!st?.isDirectory()) {
    throw new FailedPreconditionError(
      `rootfs directory ${rootfs} does not exist; nothing to make an ext4 image of`,
    );
  }
  const label = opts.label ?? "rootfs";
  if (Buffer.byteLength(label) > 16 || /[\0\n]/.test(label)) {
    throw new FailedPreconditionError(`ext4 label ${JSON.stringify(label)} must be at most 16 bytes`);
  }
  let { sizeBytes: size, inodes } = await planExt4(rootfs, opts);

  await fs.mkdir(path.dirname(outFile), { recursive: true });
  for (let attempt = 1; ; attempt++) {
    opts.signal?.throwIfAborted();
    await fs.rm(outFile, { force: true });
    // A sparse file of the final size: mkfs writes only what it needs.
    const fh = await fs.open(outFile, "w", 0o644);
    await fh.truncate(size);
    await fh.close();
    try {
      await run(
        opts.mkfsPath ?? mkfsBinary(),
        mkfsExt4Args(rootfs, outFile, { sizeBytes: size, inodes }, label),
        opts.signal,
      );
      break;
    } catch (err) {
      const outOfSpace =
        err instanceof MkfsError && /no space|could not allocate|not enough|too many/i.test(err.stderr);
      if (!outOfSpace || attempt >= 3) {
        await fs.rm(outFile, { force: true });
        throw err;
      }
      size = roundUp(size * 1.5, MiB);
      inodes = Math.ceil(inodes * 1.5);
    }
  }

  return { sizeBytes: size, sha256: await sealImage(outFile, opts) };
}

/**
 * Hashes and fsyncs a finished image, each unless turned off; the two overlap (the hash reads
 * from the page cache while the flush writes it out). Returns the digest ("sha256:…").
 */
export async function sealImage(
  file: string,
  opts: Pick<Ext4Options, "checksum" | "sync" | "signal">,
): Promise<string | undefined> {
  const [sha256] = await Promise.all([
    opts.checksum === false ? undefined : hashFile(file, opts.signal),
    opts.sync === false ? undefined : fsyncPath(file),
  ]);
  return sha256;
}

async function hashFile(file: string, signal?: AbortSignal): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of readFileChunks(file, 4 * MiB)) {
    signal?.throwIfAborted();
    hash.update(chunk);
  }
  return `sha256:${hash.digest("hex")}`;
}

/** An image's size (whole MiB) and inode count. */
export interface Ext4Plan {
  sizeBytes: number;
  inodes: number;
}

/** Size and inodes for an image of the tree at `rootfs`: its content plus headroom. */
export async function planExt4(
  rootfs: string,
  opts: Pick<Ext4Options, "headroomBytes" | "headroomRatio" | "signal"> = {},
): Promise<Ext4Plan> {
  const usage = await measureTree(rootfs, opts.signal);
  const headroom = Math.max(opts.headroomBytes ?? 32 * MiB, (opts.headroomRatio ?? 0.1) * usage.bytes);
  // Spare inodes for what the workload creates, too.
  const inodes = Math.ceil(usage.inodes * 1.2) + 4096;
  return { sizeBytes: roundUp(filesystemBytes(usage.bytes + headroom, inodes), MiB), inodes };
}

/**
 * `mkfs.ext4` arguments for an image of `rootfs` at `outFile`. Explicit 4 KiB blocks and an
 * inode count from the content: for images under 512 MiB mke2fs would otherwise pick 1 KiB
 * blocks and an inode per 4 KiB (its "small" type), which made mkfs ~60% slower here and the
 * filesystem worse for a rootfs. No blocks reserved for root (-m 0): the whole image is the VM's.
 */
export function mkfsExt4Args(rootfs: string, outFile: string, plan: Ext4Plan, label = "rootfs"): string[] {
  return [
    "-q",
    "-F",
    "-L",
    label,
    "-b",
    String(BLOCK),
    "-I",
    String(INODE_SIZE),
    "-N",
    String(plan.inodes),
    "-m",
    "0",
    "-d",
    rootfs,
    outFile,
    `${plan.sizeBytes / 1024}k`,
  ];
}

interface TreeUsage {
  /** Bytes the content takes in 4 KiB blocks, hard links counted once. */
  bytes: number;
  inodes: number;
}

/** Like `du --apparent-size` rounded to blocks, without following symlinks. */
async function measureTree(root: string, signal?: AbortSignal): Promise<TreeUsage> {
  const seen = new Set<string>();
  let bytes = 0;
  let inodes = 1;
  const walk = async (dir: string): Promise<void> => {
    signal?.throwIfAborted();
    const names = await fs.readdir(dir);
    // Directory entries: 8 bytes + name, 4-byte aligned; at least one block.
    let dirBytes = 24;
    const subdirs: string[] = [];
    for (let at = 0; at < names.length; at += LSTAT_BATCH) {
      const batch = names.slice(at, at + LSTAT_BATCH);
      // Several lstats at once (libuv runs them on its threadpool), not one round trip each.
      const stats = await Promise.all(batch.map((name) => fs.lstat(path.join(dir, name))));
      batch.forEach((name, i) => {
        const st = stats[i]!;
        dirBytes += 8 + roundUp(Buffer.byteLength(name), 4);
        const key = `${st.dev}:${st.ino}`;
        if (st.nlink > 1 && !st.isDirectory()) {
          if (seen.has(key)) return;
          seen.add(key);
        }
        inodes++;
        if (st.isDirectory()) subdirs.push(path.join(dir, name));
        else if (st.isFile()) bytes += roundUp(st.size, BLOCK) + extentOverhead(st.size);
        // Targets under 60 bytes live in the inode itself.
        else if (st.isSymbolicLink() && st.size >= 60) bytes += BLOCK;
      });
    }
    for (const sub of subdirs) await walk(sub);
    bytes += roundUp(Math.max(dirBytes * 1.1, 1), BLOCK);
  };
  await walk(root);
  return { bytes, inodes };
}

/** Large files may need extent tree blocks (an extent maps at most 128 MiB). */
function extentOverhead(size: number): number {
  const extents = Math.ceil(size / (128 * MiB));
  return extents > 4 ? Math.ceil(extents / 340) * BLOCK : 0;
}

/** Data plus what ext4 itself takes for a filesystem of that size. */
function filesystemBytes(data: number, inodes: number): number {
  const inodeTable = inodes * INODE_SIZE;
  let total = data + inodeTable;
  // Bitmaps, group descriptors, reserved GDT blocks: about 1% plus a fixed part.
  total += total * 0.01 + 2 * MiB;
  return total + journalBytes(total);
}

function roundUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

function mkfsBinary(): string {
  // /usr/sbin is not on every PATH (non-login shells, some service managers).
  return ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"].find((p) => existsSync(p)) ?? "mkfs.ext4";
}

/** Where Debian installs libeatmydata (package libeatmydata1), per architecture. */
const EATMYDATA = [
  "/usr/lib/x86_64-linux-gnu/libeatmydata.so.1",
  "/usr/lib/aarch64-linux-gnu/libeatmydata.so.1",
  "/usr/lib/libeatmydata.so.1",
];
let eatmydata: string | null | undefined;

/** The environment for mkfs: with its fsyncs turned into no-ops when libeatmydata is there. */
function mkfsEnv(): NodeJS.ProcessEnv | undefined {
  eatmydata ??= EATMYDATA.find((p) => existsSync(p)) ?? null;
  if (!eatmydata) return undefined;
  const preload = [process.env.LD_PRELOAD, eatmydata].filter(Boolean).join(" ");
  return { ...process.env, LD_PRELOAD: preload };
}

async function run(cmd: string, args: string[], signal?: AbortSignal): Promise<void> {
  // Through the spawn helper: a fork of the service itself would stall its event loop.
  const r = await sharedSpawner().run(cmd, args, { signal, env: mkfsEnv() });
  if (r.code === 0) return;
  if (r.startError?.code === "ENOENT") {
    throw new FailedPreconditionError("mkfs.ext4 is not installed: install the e2fsprogs package");
  }
  const output = `${r.stdout}${r.stderr}`;
  const detail = output.trim() || r.startError?.message || `exit code ${r.code ?? r.signal}`;
  throw new MkfsError(`mkfs.ext4 failed: ${detail}`, output);
}
