import v8 from "node:v8";
import { Worker, type WorkerOptions } from "node:worker_threads";

/**
 * The initial old-space size of an extraction thread's V8 heap, in MiB.
 *
 * Per layer, the thread streams about twice the layer's size through short-lived Buffers (the
 * compressed reads and zlib's inflated output). A new isolate starts with a small allocation
 * limit, and that external memory counts against it: V8 ran a full mark-compact about every
 * 15 MB, ~10 per 100 MB image, which cost 250–400 ms of CPU on its helper threads, the largest
 * single cost of a cold build on two cores. From this size on, scavenges free those Buffers and
 * a build sees 0–2 mark-compacts. The old space grows only with what survives, which here is
 * little: the heap itself stays at ~8–18 MB.
 */
export const EXTRACTION_INITIAL_OLD_SPACE_MB = 128;

const FLAG = "--initial-old-space-size";
let starting = 0;

/**
 * Starts a worker whose isolate has the extraction heap settings. V8 flags are process-wide and
 * read when an isolate is made, so the flag is set only until the worker is online (or failed to
 * start) and then put back to V8's default, leaving other isolates of the process (`kiln up` runs
 * every service in one) as they were. A process started with the flag keeps the operator's value.
 * `setFlags` and `execArgv` are parameters for tests.
 */
export function startExtractionWorker(
  code: string,
  options: WorkerOptions,
  setFlags: (flags: string) => void = v8.setFlagsFromString,
  execArgv: readonly string[] = process.execArgv,
): Worker {
  if (execArgv.some((a) => a === FLAG || a.startsWith(`${FLAG}=`))) return new Worker(code, options);
  if (starting++ === 0) setFlags(`${FLAG}=${EXTRACTION_INITIAL_OLD_SPACE_MB}`);
  let settled = false;
  const settle = () => {
    if (settled) return;
    settled = true;
    if (--starting === 0) setFlags(`${FLAG}=0`);
  };
  let worker: Worker;
  try {
    worker = new Worker(code, options);
  } catch (err) {
    settle();
    throw err;
  }
  worker.once("online", settle);
  worker.once("error", settle);
  worker.once("exit", settle);
  return worker;
}
