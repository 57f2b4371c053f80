import { createHash, randomBytes } from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import type { Readable } from "node:stream";
import { Transform } from "node:stream";
import { pipeline } from "node:stream/promises";
import { digestHex } from "../sources/digest.js";
import { DigestMismatchError } from "../sources/errors.js";
import type { LayerInfo } from "../sources/source.js";

/**
 * A tenant's layer cache: compressed layer blobs as pulled, content-addressed under
 * `<dir>/sha256/<hex>`. Ingest, verify, then commit (containerd's order): bytes land in a temp
 * file beside their final name, are hashed as they stream, fsynced, checked for size and digest,
 * and only then renamed into place — so a blob under its digest is always complete and correct,
 * and a crash leaves at most a temp file that `cleanup` removes. One download per digest at a
 * time: concurrent ingests of the same layer share it (and its progress).
 */
export interface LayerCache {
  path(digest: string): string;
  has(digest: string): Promise<boolean>;
  /** Ensures the blob is in the cache: downloads via open() to a temp file in the same dir, verifies sha256+size, fsyncs, renames. Concurrent ingests of one digest share one download. onBytes reports progress. Returns the path. */
  ingest(layer: LayerInfo, open: () => Promise<Readable>, onBytes?: (n: number) => void): Promise<string>;
  /** Removes leftovers of interrupted ingests (temp files) — called at start-up. */
  cleanup(): Promise<void>;
}

const TEMP_PREFIX = ".ingest-";

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
    const meter = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        size += chunk.length;
        if (size > layer.size) {
          cb(
            new DigestMismatchError(
              "layer",
              layer.digest,
              "(unknown)",
              `more than the expected ${layer.size} bytes`,
            ),
          );
          return;
        }
        hash.update(chunk);
        for (const l of listeners) l(chunk.length);
        cb(null, chunk);
      },
    });
    try {
      await pipeline(await open(), meter, fs.createWriteStream(temp, { flags: "wx", mode: 0o644 }));
      const handle = await fsp.open(temp, "r");
      try {
        await handle.sync();
      } finally {
        await handle.close();
      }
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
      await fsp.chmod(temp, 0o444);
      await fsp.rename(temp, final);
    } catch (err) {
      await fsp.rm(temp, { force: true });
      throw err;
    }
    // The rename is durable once the directory entry is on disk. Past this point the blob is
    // committed, so a failing directory fsync is not worth failing the build over.
    await syncDir(blobs).catch(() => {});
    return final;
  }

  async function ingest(
    layer: LayerInfo,
    open: () => Promise<Readable>,
    onBytes?: (n: number) => void,
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
    const done = download(layer, open, listeners).finally(() => inflight.delete(key));
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

async function syncDir(dir: string): Promise<void> {
  const fd = await fsp.open(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    await fd.sync();
  } finally {
    await fd.close();
  }
}
