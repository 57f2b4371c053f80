import type { Worker } from "node:worker_threads";
import { Code } from "@connectrpc/connect";
import {
  FailedPreconditionError,
  InternalError,
  InvalidArgumentError,
  type KilnError,
  ResourceExhaustedError,
  UnimplementedError,
} from "@kiln/kit";
import type { GrowingFile } from "../cache/layer-cache.js";
import type { WriteImageOptions, WrittenImage } from "../rootfs/ext4/writer.js";
import type { ApplyLayerResult } from "./apply-layer.js";
import type { ApplyJob, WriteImageJob, WrittenUpdate } from "./apply-worker.js";
import { startExtractionWorker } from "./worker-heap.js";

/**
 * Applies layer files in worker threads, so extraction and downloads use both cores; and writes
 * the ext4 image of a tree extracted into one (rootfs/ext4/writer.ts) there too.
 */
export interface LayerApplier {
  /**
   * Applies a complete layer file, or one still downloading (read as it grows, up to its size).
   * With `image`, file content goes into that existing image file's data area from block
   * `nextBlock` on, and the result's `nextBlock` is where the next layer continues
   * (ApplyLayerOptions.imageData).
   */
  apply(
    rootfs: string,
    file: string | GrowingFile,
    compression: ApplyJob["compression"],
    opts: {
      maxBytes: number;
      usedBytes: number;
      signal?: AbortSignal;
      image?: { file: string; nonce: Buffer; nextBlock: number };
      /** The next layer's complete file: decompressed ahead while this one is applied. */
      next?: ApplyJob["next"];
    },
  ): Promise<ApplyLayerResult>;
  /** Writes the ext4 image around content the layers put into it (rootfs/ext4/writer.ts). */
  writeImage(opts: WriteImageOptions, signal?: AbortSignal): Promise<WrittenImage>;
  close(): Promise<void>;
}

// From sources (tests, `kiln` under tsx) the worker is TypeScript and needs tsx's loader too.
const fromSource = import.meta.url.endsWith(".ts");
const workerUrl = new URL(`./apply-worker.${fromSource ? "ts" : "js"}`, import.meta.url);

const ERRORS: Partial<Record<Code, new (message: string) => KilnError>> = {
  [Code.InvalidArgument]: InvalidArgumentError,
  [Code.ResourceExhausted]: ResourceExhaustedError,
  [Code.Unimplemented]: UnimplementedError,
  [Code.FailedPrecondition]: FailedPreconditionError,
};

export function createLayerApplier(): LayerApplier {
  const idle: Worker[] = [];
  const all = new Set<Worker>();
  let nextId = 1;

  const spawn = () => {
    // Loaders given by --import do not reach worker threads on Node 20: register tsx inside.
    const code = fromSource
      ? `import("tsx/esm/api").then((m) => { m.register(); return import(${JSON.stringify(workerUrl.href)}); })`
      : `import(${JSON.stringify(workerUrl.href)})`;
    const w = startExtractionWorker(code, {
      eval: true,
      execArgv: fromSource ? ["--conditions=kiln-source"] : [],
    });
    w.unref();
    all.add(w);
    w.once("exit", () => all.delete(w));
    return w;
  };

  // One thread is started ahead, so the first build does not wait for it.
  idle.push(spawn());

  /**
   * Runs one job on an idle worker and settles with its reply. Jobs are synchronous in the
   * worker: stopping one means ending the thread (a new one is started for the next job).
   */
  const run = <T>(job: ApplyJob | WriteImageJob, signal?: AbortSignal, watch?: (w: Worker) => () => void) => {
    const worker = idle.pop() ?? spawn();
    return new Promise<T>((resolve, reject) => {
      const unwatch = watch?.(worker);
      const done = () => {
        unwatch?.();
        worker.off("message", onMessage);
        worker.off("error", onError);
        worker.off("exit", onExit);
        signal?.removeEventListener("abort", onAbort);
      };
      const onMessage = (m: {
        id: number;
        result?: T;
        error?: { name: string; message: string; code?: Code };
      }) => {
        if (m.id !== job.id) return;
        done();
        idle.push(worker);
        if (m.result) return resolve(m.result);
        const Cls = m.error?.code !== undefined ? ERRORS[m.error.code] : undefined;
        reject(Cls ? new Cls(m.error!.message) : new InternalError(m.error?.message ?? `${job.kind} failed`));
      };
      const onError = (err: Error) => {
        done();
        reject(new InternalError(`layer extraction crashed: ${err.message}`, { cause: err }));
      };
      const onExit = () => {
        done();
        reject(signal?.aborted ? signal.reason : new InternalError("layer extraction worker exited"));
      };
      const onAbort = () => void worker.terminate();
      worker.on("message", onMessage);
      worker.once("error", onError);
      worker.once("exit", onExit);
      if (signal?.aborted) return onAbort();
      signal?.addEventListener("abort", onAbort, { once: true });
      worker.postMessage(job);
    });
  };

  return {
    apply(rootfs, file, compression, opts) {
      const id = nextId++;
      const job: ApplyJob = {
        kind: "apply",
        id,
        rootfs,
        ...(typeof file === "string"
          ? { file }
          : { growing: { fd: file.fd, size: file.size, written: file.written } }),
        compression,
        maxBytes: opts.maxBytes,
        usedBytes: opts.usedBytes,
        // A Buffer would arrive in the worker as a plain Uint8Array: sent as hex, as ApplyJob says.
        ...(opts.image && { image: { ...opts.image, nonce: opts.image.nonce.toString("hex") } }),
        next: opts.next,
      };
      const watch =
        typeof file === "string"
          ? undefined
          : (worker: Worker) =>
              file.watch((written) =>
                worker.postMessage({ kind: "written", id, written } satisfies WrittenUpdate),
              );
      return run<ApplyLayerResult>(job, opts.signal, watch);
    },
    writeImage(opts, signal) {
      const job: WriteImageJob = {
        ...opts,
        kind: "write-image",
        id: nextId++,
        nonce: opts.nonce.toString("hex"),
      };
      return run<WrittenImage>(job, signal);
    },
    async close() {
      await Promise.all([...all].map((w) => w.terminate()));
    },
  };
}
