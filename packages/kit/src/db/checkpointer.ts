import { createRequire } from "node:module";
import { Worker } from "node:worker_threads";

/**
 * SQLite WAL checkpoints on a worker thread. By default SQLite checkpoints inside the commit that
 * takes the write-ahead log past 1000 pages: copying them back into the database and fsyncing
 * takes milliseconds, and better-sqlite3 runs on the event loop, so every few hundredth request
 * waited for it (assetmanagerd's PrepareAssets p99). The service's connection sets
 * `wal_autocheckpoint = 0`, and this worker, with a connection of its own, runs PASSIVE
 * checkpoints (which never block the service's reads or writes) every `intervalMs`. Closing the
 * last connection still checkpoints the whole log, as SQLite always does.
 */
export interface Checkpointer {
  /** Runs a last checkpoint and ends the worker. */
  stop(): Promise<void>;
}

// CommonJS, evaluated in the worker: the module path comes from here, so it resolves the same
// better-sqlite3 whatever the process's working directory.
const WORKER_SOURCE = `
const { parentPort, workerData } = require("node:worker_threads");
const Database = require(workerData.module);
const db = new Database(workerData.file);
db.pragma("busy_timeout = 5000");
db.pragma("synchronous = NORMAL");
const checkpoint = () => {
  try {
    db.pragma("wal_checkpoint(PASSIVE)");
  } catch (err) {
    parentPort.postMessage({ error: String(err && err.message || err) });
  }
};
const timer = setInterval(checkpoint, workerData.intervalMs);
parentPort.on("message", () => {
  clearInterval(timer);
  checkpoint();
  db.close();
  parentPort.close();
});
`;

export function startCheckpointer(
  file: string,
  opts: { intervalMs?: number; onError?: (message: string) => void } = {},
): Checkpointer {
  const module = createRequire(import.meta.url).resolve("better-sqlite3");
  const worker = new Worker(WORKER_SOURCE, {
    eval: true,
    workerData: { file, module, intervalMs: opts.intervalMs ?? 500 },
  });
  worker.unref(); // a service that forgets to close its database still exits
  worker.on("message", (m: { error?: string }) => m.error && opts.onError?.(m.error));
  worker.on("error", (err) => opts.onError?.(err.message));
  const exited = new Promise<void>((resolve) => worker.once("exit", () => resolve()));
  return {
    async stop() {
      worker.postMessage("stop");
      await exited;
    },
  };
}
