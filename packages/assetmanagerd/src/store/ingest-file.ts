import fs from "node:fs";
import fsp from "node:fs/promises";

/**
 * The bytes of one local ingest on their way to disk.
 *
 * Chunks are copied into one of two staging buffers; a full buffer is written with one pwrite
 * while the other fills, so receiving and hashing go on during the write, and only one write per
 * file is in flight (concurrent writes to one file just queue on its inode lock).
 *
 * Writes bypass the page cache (O_DIRECT) where the filesystem allows it: copying a gigabyte into
 * the page cache cost the host more CPU than receiving, hashing and writing it together, and left
 * all of it to flush at the final fsync. Direct writes need block-aligned buffers, offsets and
 * lengths: the staging buffers are page-aligned, every write but the last is a whole buffer, and
 * the last is padded to a block and the file truncated to its real length before the fsync.
 * Where O_DIRECT is refused (EINVAL at open or first write), writes go through the page cache
 * and writeback is started in the background as the file grows, so the fsync has little left.
 * Either way nothing is durable before `finish`, which fsyncs.
 */
export interface IngestFile {
  /** True while writes bypass the page cache. */
  readonly direct: boolean;
  /** Appends a copy of `chunk`. Write errors surface here or at `finish`. */
  write(chunk: Uint8Array): Promise<void>;
  /** Writes what is staged, sets the file's exact length and fsyncs it. */
  finish(): Promise<void>;
  /** Waits for writes in flight and closes the file (idempotent). */
  close(): Promise<void>;
}

/** Hands out page-aligned staging buffers and takes them back for reuse. */
export interface StagingPool {
  /** An aligned buffer, or undefined when none can be allocated (then the caller uses its own). */
  take(): Uint8Array | undefined;
  give(buf: Uint8Array): void;
}

export const STAGE_BYTES = 4 * 1024 * 1024;
/** Direct I/O alignment of offsets and lengths: the largest common logical block size. */
const BLOCK = 4096;
/** Page-cache writes: bytes after which writeback is started in the background. */
const BACKGROUND_SYNC_BYTES = 64 * 1024 * 1024;
const WASM_PAGE = 64 * 1024;
const BUFFERS_PER_MEMORY = 4;
/** Free buffers kept for reuse; more are left to the garbage collector. */
const MAX_FREE = 8;

/** The part of the WebAssembly global used here (the project's lib settings do not declare it). */
declare const WebAssembly: {
  Memory: new (descriptor: { initial: number; maximum: number }) => { readonly buffer: ArrayBuffer };
};

export function createStagingPool(): StagingPool {
  const free: Uint8Array[] = [];
  return {
    take() {
      const buf = free.pop();
      if (buf) return buf;
      let memory: { readonly buffer: ArrayBuffer };
      try {
        // WebAssembly memory starts on a page boundary, as O_DIRECT needs; Node's Buffers promise
        // no alignment. (Never grown: growing would detach the views.)
        const pages = (BUFFERS_PER_MEMORY * STAGE_BYTES) / WASM_PAGE;
        memory = new WebAssembly.Memory({ initial: pages, maximum: pages });
      } catch {
        return undefined;
      }
      for (let i = 1; i < BUFFERS_PER_MEMORY; i++)
        free.push(new Uint8Array(memory.buffer, i * STAGE_BYTES, STAGE_BYTES));
      return new Uint8Array(memory.buffer, 0, STAGE_BYTES);
    },
    give(buf) {
      if (free.length < MAX_FREE && buf.byteLength === STAGE_BYTES) free.push(buf);
    },
  };
}

/** Creates (or truncates) `file` for writing, mode 0600. */
export async function openIngestFile(
  file: string,
  opts: { pool: StagingPool; direct: boolean },
): Promise<IngestFile> {
  const { pool } = opts;
  const aligned = [pool.take(), pool.take()];
  const stages = aligned.map((b) => b ?? new Uint8Array(STAGE_BYTES));
  let direct = opts.direct && aligned.every((b) => b !== undefined);
  const { O_WRONLY, O_CREAT, O_TRUNC, O_DIRECT } = fs.constants;
  let handle: fsp.FileHandle | undefined;
  try {
    if (direct) {
      handle = await fsp.open(file, O_WRONLY | O_CREAT | O_TRUNC | O_DIRECT, 0o600).catch((err: unknown) => {
        if (errno(err) !== "EINVAL") throw err;
        return undefined;
      });
      direct = handle !== undefined;
    }
    handle ??= await fsp.open(file, "w", 0o600);
  } catch (err) {
    for (const b of aligned) if (b) pool.give(b);
    throw err;
  }

  let fh: fsp.FileHandle = handle;
  let cur = 0;
  let fill = 0;
  /** File offset of the current stage's first byte. */
  let at = 0;
  let wroteDirect = false;
  // Neither chain rejects: errors are kept in `failure` and thrown by the next call.
  let writing: Promise<void> = Promise.resolve();
  let syncing: Promise<void> = Promise.resolve();
  let unsynced = 0;
  let failure: unknown;
  let closed = false;
  const fail = (err: unknown) => {
    failure ??= err;
  };

  async function writeStage(buf: Uint8Array, len: number, pos: number): Promise<void> {
    if (direct) {
      const padded = Math.ceil(len / BLOCK) * BLOCK;
      buf.fill(0, len, padded);
      try {
        await writeAll(fh, buf.subarray(0, padded), pos);
        wroteDirect = true;
        return;
      } catch (err) {
        if (errno(err) !== "EINVAL" || wroteDirect) throw err;
        // The filesystem opened the file for direct I/O but will not do it (alignment
        // it needs is larger, or it only pretends): go through the page cache from here.
        const old = fh;
        fh = await fsp.open(file, "r+");
        direct = false;
        await old.close();
      }
    }
    await writeAll(fh, buf.subarray(0, len), pos);
    unsynced += len;
    if (unsynced >= BACKGROUND_SYNC_BYTES) {
      unsynced = 0;
      syncing = syncing.then(() => fh.datasync()).catch(fail);
    }
  }

  /** Starts writing the current stage once the other one is written, and switches to it. */
  async function submit(): Promise<void> {
    await writing;
    if (failure) throw failure;
    const buf = stages[cur]!;
    const len = fill;
    const pos = at;
    at += len;
    fill = 0;
    cur ^= 1;
    writing = writeStage(buf, len, pos).catch(fail);
  }

  return {
    get direct() {
      return direct;
    },
    async write(chunk) {
      if (failure) throw failure;
      let off = 0;
      while (off < chunk.byteLength) {
        const n = Math.min(chunk.byteLength - off, STAGE_BYTES - fill);
        stages[cur]!.set(chunk.subarray(off, off + n), fill);
        fill += n;
        off += n;
        if (fill === STAGE_BYTES) await submit();
      }
    },
    async finish() {
      if (fill > 0) await submit();
      await writing;
      await syncing;
      if (failure) throw failure;
      // Drop the last direct write's padding.
      if (direct && at % BLOCK !== 0) await fh.truncate(at);
      await fh.sync();
    },
    async close() {
      if (closed) return;
      closed = true;
      await writing;
      await syncing;
      await fh.close();
      for (const b of aligned) if (b) pool.give(b);
    },
  };
}

/**
 * The ingest of a file taken by hard link (adopt): nothing to write, only to fsync. The fsync
 * starts at once, so the disk flushes while the caller reads the file to hash it.
 */
export function adoptedFile(handle: fsp.FileHandle): IngestFile {
  let closed = false;
  const syncing = handle.sync();
  // Surfaced by finish(); a writer closed before finishing does not care.
  syncing.catch(() => {});
  return {
    direct: false,
    async write() {},
    finish: () => syncing,
    async close() {
      if (closed) return;
      closed = true;
      await handle.close();
    },
  };
}

async function writeAll(handle: fsp.FileHandle, buf: Uint8Array, position: number): Promise<void> {
  let offset = 0;
  while (offset < buf.byteLength) {
    const { bytesWritten } = await handle.write(buf, offset, buf.byteLength - offset, position + offset);
    offset += bytesWritten;
  }
}

function errno(err: unknown): string | undefined {
  return (err as NodeJS.ErrnoException | undefined)?.code;
}
