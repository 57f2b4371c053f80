/**
 * Worker-thread side of the layer applier: applies one layer at a time, and writes the ext4 image
 * around the extracted content at the end. Both use synchronous file system calls (fast, but they
 * block a thread), so they run here, on their own core, while the main thread keeps downloading
 * the next layers and serving RPCs.
 */
import fs from "node:fs";
import { Readable } from "node:stream";
import { parentPort } from "node:worker_threads";
import { KilnError } from "@kiln/kit/errors";
import { type WriteImageOptions, writeExt4Image } from "../rootfs/ext4/writer.js";
import { type ApplyLayerResult, applyLayer } from "./apply-layer.js";
import { decompressLayer } from "./decompress.js";

export interface ApplyJob {
  kind: "apply";
  id: number;
  rootfs: string;
  /** A complete layer file… */
  file?: string;
  /** …or one still being written: a descriptor (the process's, shared with this thread), the final size and what is written so far; "written" messages follow. */
  growing?: { fd: number; size: number; written: number };
  compression: "gzip" | "zstd" | "none";
  maxBytes: number;
  usedBytes: number;
  /** Write file content into this image's data area (ApplyLayerOptions.imageData); nonce in hex. */
  image?: { file: string; nonce: string; nextBlock: number };
  /** The next layer's complete file, to start decompressing while this one is applied. */
  next?: { file: string; compression: ApplyJob["compression"] };
}

/** Write the ext4 image of a tree extracted with `image` (rootfs/ext4/writer.ts); nonce in hex. */
export interface WriteImageJob extends Omit<WriteImageOptions, "nonce"> {
  kind: "write-image";
  id: number;
  nonce: string;
}

/** More of a growing layer file is on disk. */
export interface WrittenUpdate {
  kind: "written";
  id: number;
  written: number;
}

const READ_BYTES = 1 << 20;

if (!parentPort) throw new Error("apply-worker must run in a worker thread");
const port = parentPort;
const followers = new Map<number, (written: number) => void>();

/**
 * The next layer's decompressed stream, started while the current layer is applied (ApplyJob.next):
 * zlib inflates on libuv's threadpool, so the next layer inflates on the other core while this
 * thread writes the current one, up to the stream's read-ahead. Taken by the job for that file;
 * dropped by any other job.
 */
let prefetched: { file: string; stream: Readable; failed: boolean } | undefined;

function takePrefetched(file: string | undefined): Readable | undefined {
  const p = prefetched;
  prefetched = undefined;
  if (p && p.file === file && !p.failed && !p.stream.destroyed) return p.stream;
  p?.stream.destroy();
  return undefined;
}

function prefetch(next: ApplyJob["next"]): void {
  if (!next) return;
  const stream = decompressLayer(
    fs.createReadStream(next.file, { highWaterMark: READ_BYTES }),
    next.compression,
  );
  const entry = { file: next.file, stream, failed: false };
  // An error before the job takes it: that job opens the file again and meets it itself.
  stream.once("error", () => {
    entry.failed = true;
  });
  prefetched = entry;
}

port.on("message", async (m: ApplyJob | WriteImageJob | WrittenUpdate) => {
  if (m.kind === "written") {
    followers.get(m.id)?.(m.written);
    return;
  }
  try {
    if (m.kind !== "apply") takePrefetched(undefined);
    const result =
      m.kind === "apply" ? await apply(m) : writeExt4Image({ ...m, nonce: Buffer.from(m.nonce, "hex") });
    port.postMessage({ id: m.id, result });
  } catch (err) {
    const e = err instanceof Error ? err : new Error(String(err));
    port.postMessage({
      id: m.id,
      error: { name: e.name, message: e.message, code: err instanceof KilnError ? err.code : undefined },
    });
  } finally {
    followers.delete(m.id);
  }
});

async function apply(job: ApplyJob): Promise<ApplyLayerResult> {
  // Opened before the source, which would leak if this failed. No O_CREAT or O_TRUNC: the caller
  // made the image, and earlier layers' content is in it.
  const image = job.image;
  const imageFd = image && fs.openSync(image.file, fs.constants.O_WRONLY);
  let result: ApplyLayerResult;
  try {
    let stream = takePrefetched(job.file);
    if (!stream) {
      let source: Readable;
      if (job.growing) {
        const follow = followGrowing(job.growing.fd, job.growing.size, job.growing.written);
        followers.set(job.id, follow.advance);
        source = follow.stream;
      } else {
        source = fs.createReadStream(job.file!, { highWaterMark: READ_BYTES });
      }
      stream = decompressLayer(source, job.compression);
    }
    prefetch(job.next);
    result = await applyLayer(job.rootfs, stream, {
      maxBytes: job.maxBytes,
      usedBytes: job.usedBytes,
      imageData:
        image && imageFd !== undefined
          ? { fd: imageFd, nonce: Buffer.from(image.nonce, "hex"), nextBlock: image.nextBlock }
          : undefined,
    });
  } catch (err) {
    // A failed layer fails the build: the next layer will not be asked for.
    takePrefetched(undefined);
    throw err;
  } finally {
    // Inside the caller's try: an error closing fails this job instead of crashing the thread.
    if (imageFd !== undefined) fs.closeSync(imageFd);
  }
  return result;
}

/**
 * The bytes of a file another thread is still writing, read up to what it reports written and
 * ending at `size`. The writer's digest check comes later: the caller trusts the content only
 * once the download is verified (until then a bad layer can only fail the build, as any
 * hostile layer can).
 */
function followGrowing(fd: number, size: number, written: number) {
  let pos = 0;
  let available = written;
  let starved = false;
  const stream = new Readable({
    highWaterMark: READ_BYTES,
    read() {
      pump();
    },
  });
  function pump(): void {
    starved = false;
    while (pos < size) {
      if (pos >= available) {
        starved = true;
        return;
      }
      const len = Math.min(READ_BYTES, available - pos);
      const buf = Buffer.allocUnsafe(len);
      let n: number;
      try {
        n = fs.readSync(fd, buf, 0, len, pos);
      } catch (err) {
        stream.destroy(err as Error);
        return;
      }
      if (n === 0) {
        stream.destroy(new Error(`layer file ended at ${pos} bytes, before the ${available} written`));
        return;
      }
      pos += n;
      if (!stream.push(n < len ? buf.subarray(0, n) : buf)) return;
    }
    stream.push(null);
  }
  return {
    stream,
    advance(n: number) {
      available = n;
      if (starved) pump();
    },
  };
}
