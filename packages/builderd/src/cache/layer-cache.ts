import { createHash, randomBytes } from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import type { Readable } from "node:stream";
import { fsyncPath } from "@kiln/kit";
import { digestHex } from "../sources/digest.js";
import { DigestMismatchError } from "../sources/errors.js";
import type { LayerInfo } from "../sources/source.js";

/**
 * A tenant's layer cache: compressed layer blobs as pulled, content-addressed under
 * `<dir>/sha256/<hex>`. Ingest, verify, then commit (containerd's order): bytes land in a temp
 * file beside their final name, are hashed as they stream, checked for size and digest, fsynced,
 * and only then renamed into place — so a blob under its digest is always complete and correct,
 * and a crash leaves at most a temp file that `cleanup` removes. One download per digest at a
 * time: concurrent ingests of the same layer share it (and its progress).
 */
export interface LayerCache {
  path(digest: string): string;
  has(digest: string): Promise<boolean>;
  /**
   * Ensures the blob is in the cache: downloads via open() to a temp file in the same dir,
   * verifies sha256+size, fsyncs, renames. Concurrent ingests of one digest share one download.
   * onBytes reports progress. onGrowing, when this call starts the download, receives the temp
   * file as it is written (to extract while it streams; unverified until its `verified` resolves).
   * Returns the path.
   */
  ingest(
    layer: LayerInfo,
    open: () => Promise<Readable>,
    onBytes?: (n: number) => void,
    onGrowing?: (file: GrowingFile) => void,
  ): Promise<string>;
  /** Removes leftovers of interrupted ingests (temp files) — called at start-up. */
  cleanup(): Promise<void>;
}

/**
 * A blob being downloaded, for a reader that follows the writer: `fd` reads it (positional reads
 * below `written`; it stays valid after the file is renamed into place). The receiver owns the
 * descriptor and must call close().
 */
export interface GrowingFile {
  readonly fd: number;
  /** Bytes written so far. */
  readonly written: number;
  /** The size the blob will have when complete. */
  readonly size: number;
  /** Calls fn after every write with the new `written`; returns the unsubscribe. */
  watch(fn: (written: number) => void): () => void;
  /**
   * Settles once every byte is in: resolves if size and sha256 match, rejects with the download's
   * error otherwise. It comes before the blob is durable and committed (the ingest's own promise),
   * so a reader need not wait for the fsync.
   */
  readonly verified: Promise<void>;
  close(): void;
}

const TEMP_PREFIX = ".ingest-";
const WRITE_BATCH_BYTES = 1 << 20;
const WRITE_BATCH_BUFFERS = 64;

export function createLayerCache(dir: string): LayerCache {
  const blobs = path.join(dir, "sha256");
  const inflight = new Map<string, { done: Promise<string>; listeners: Set<(n: number) => void> }>();

  const pathOf = (digest: string) => path.join(blobs, digestHex(digest, "layer"));

  async function has(digest: string): Promise<boolean> {
    try {
      return (await fsp.stat(pathOf(digest))).isFile();
    } catch {
      return false;
    }
  }

  async function download(
    layer: LayerInfo,
    open: () => Promise<Readable>,
    listeners: Set<(n: number) => void>,
    onGrowing?: (file: GrowingFile) => void,
  ): Promise<string> {
    const final = pathOf(layer.digest);
    if (await has(layer.digest)) return final;
    await fsp.mkdir(blobs, { recursive: true });
    const temp = path.join(
      blobs,
      `${TEMP_PREFIX}${digestHex(layer.digest)}-${randomBytes(4).toString("hex")}`,
    );
    const hash = createHash("sha256");
    let size = 0;
    const out = await fsp.open(temp, "wx", 0o644);
    let writing: Promise<void> = Promise.resolve();
    let growing: ReturnType<typeof growingFile> | undefined;
    try {
      growing = onGrowing ? growingFile(temp, layer.size) : undefined;
      if (growing) onGrowing!(growing.file);
      // Network chunks (~64 KiB) are gathered into batches written with one writev each, one
      // batch in flight while the next arrives: fewer syscalls and stream hops per byte.
      let batch: Buffer[] = [];
      let batchBytes = 0;
      const flush = async () => {
        await writing;
        if (batchBytes === 0) return;
        const buffers = batch;
        const at = size - batchBytes;
        const n = batchBytes;
        batch = [];
        batchBytes = 0;
        writing = writeAllAt(out, buffers, at).then(() => growing?.advance(at + n));
      };
      for await (const chunk of await open()) {
        const buf = chunk as Buffer;
        size += buf.length;
        if (size > layer.size) {
          throw new DigestMismatchError(
            "layer",
            layer.digest,
            "(unknown)",
            `more than the expected ${layer.size} bytes`,
          );
        }
        hash.update(buf);
        for (const l of listeners) l(buf.length);
        batch.push(buf);
        batchBytes += buf.length;
        if (batchBytes >= WRITE_BATCH_BYTES || batch.length >= WRITE_BATCH_BUFFERS) await flush();
      }
      await flush();
      await writing;
      const actual = `sha256:${hash.digest("hex")}`;
      if (size !== layer.size) {
        throw new DigestMismatchError(
          "layer",
          layer.digest,
          actual,
          `expected ${layer.size} bytes, got ${size}`,
        );
      }
      if (actual !== layer.digest) throw new DigestMismatchError("layer", layer.digest, actual);
      growing?.verify();
      await out.sync();
      await out.close();
      await fsp.chmod(temp, 0o444);
      await fsp.rename(temp, final);
    } catch (err) {
      growing?.verify(err);
      await writing.catch(() => {});
      await out.close().catch(() => {});
      await fsp.rm(temp, { force: true });
      throw err;
    }
    // The rename is durable once the directory entry is on disk. Past this point the blob is
    // committed, so a failing directory fsync is not worth failing the build over.
    await fsyncPath(blobs).catch(() => {});
    return final;
  }

  async function ingest(
    layer: LayerInfo,
    open: () => Promise<Readable>,
    onBytes?: (n: number) => void,
    onGrowing?: (file: GrowingFile) => void,
  ): Promise<string> {
    const key = layer.digest;
    pathOf(key); // refuses a malformed digest before anything is shared under it
    const existing = inflight.get(key);
    if (existing) {
      if (onBytes) existing.listeners.add(onBytes);
      try {
        return await existing.done;
      } catch (err) {
        // The shared download belonged to another build; if that build was cancelled, this
        // one still wants the layer. Corrupt content would be corrupt again: give up then.
        if (err instanceof DigestMismatchError) throw err;
        return ingest(layer, open, onBytes);
      } finally {
        if (onBytes) existing.listeners.delete(onBytes);
      }
    }
    const listeners = new Set<(n: number) => void>(onBytes ? [onBytes] : []);
    const done = download(layer, open, listeners, onGrowing).finally(() => inflight.delete(key));
    inflight.set(key, { done, listeners });
    return done;
  }

  return {
    path: pathOf,
    has,
    ingest,
    async cleanup() {
      let names: string[];
      try {
        names = await fsp.readdir(blobs);
      } catch {
        return;
      }
      await Promise.all(
        names
          .filter((n) => n.startsWith(TEMP_PREFIX))
          .map((n) => fsp.rm(path.join(blobs, n), { force: true })),
      );
    },
  };
}

/** Writes all of `buffers` at `position` (writev may write less than asked). */
async function writeAllAt(handle: fsp.FileHandle, buffers: Buffer[], position: number): Promise<void> {
  let pending = buffers;
  let at = position;
  while (pending.length > 0) {
    const { bytesWritten } = await handle.writev(pending, at);
    at += bytesWritten;
    let skip = bytesWritten;
    while (pending.length > 0 && skip >= pending[0]!.length) skip -= pending.shift()!.length;
    if (skip > 0) pending = [pending[0]!.subarray(skip), ...pending.slice(1)];
  }
}

/** The reader's side of a temp file: its own descriptor, and the count of bytes written. */
export function growingFile(
  file: string,
  size: number,
): { file: GrowingFile; advance(written: number): void; verify(err?: unknown): void } {
  const fd = fs.openSync(file, "r");
  const watchers = new Set<(written: number) => void>();
  let written = 0;
  let closed = false;
  let settle!: (err?: unknown) => void;
  const verified = new Promise<void>((resolve, reject) => {
    settle = (err) => (err === undefined ? resolve() : reject(err));
  });
  // Readers that stopped following (a failed extraction) must not leave it unhandled.
  verified.catch(() => {});
  return {
    file: {
      fd,
      size,
      verified,
      get written() {
        return written;
      },
      watch(fn) {
        watchers.add(fn);
        return () => watchers.delete(fn);
      },
      close() {
        if (closed) return;
        closed = true;
        watchers.clear();
        fs.closeSync(fd);
      },
    },
    advance(n) {
      written = n;
      for (const w of watchers) w(n);
    },
    verify: (err) => settle(err),
  };
}
