/**
 * Worker-thread side of the layer applier: applies one layer file at a time. Extraction uses
 * synchronous file system calls (fast, but they block a thread), so it runs here, on its own
 * core, while the main thread keeps downloading the next layers.
 */
import fs from "node:fs";
import { parentPort } from "node:worker_threads";
import { KilnError } from "@kiln/kit";
import { applyLayer } from "./apply-layer.js";
import { decompressLayer } from "./decompress.js";

export interface ApplyJob {
  id: number;
  rootfs: string;
  file: string;
  compression: "gzip" | "zstd" | "none";
  maxBytes: number;
  usedBytes: number;
}

if (!parentPort) throw new Error("apply-worker must run in a worker thread");
const port = parentPort;

port.on("message", async (job: ApplyJob) => {
  try {
    const stream = decompressLayer(
      fs.createReadStream(job.file, { highWaterMark: 1 << 20 }),
      job.compression,
    );
    const result = await applyLayer(job.rootfs, stream, { maxBytes: job.maxBytes, usedBytes: job.usedBytes });
    port.postMessage({ id: job.id, result });
  } catch (err) {
    const e = err instanceof Error ? err : new Error(String(err));
    port.postMessage({
      id: job.id,
      error: { name: e.name, message: e.message, code: err instanceof KilnError ? err.code : undefined },
    });
  }
});
