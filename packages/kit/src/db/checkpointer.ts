import { createRequire } from "node:module";
import { Worker } from "node:worker_threads";

/**
 * SQLite WAL checkpoints on a worker thread. By default SQLite checkpoints inside the commit that
 * takes the write-ahead log past 1000 pages: copying them back into the database and fsyncing
 * takes milliseconds, and better-sqlite3 runs on the event loop, so every few hundredth request
 * waited for it (assetmanagerd's PrepareAssets p99). The service's connection sets
 * `wal_autocheckpoint = 0`, and the thread, with a connection of its own per database, runs
 * PASSIVE checkpoints (which never block the service's reads or writes) every `intervalMs`.
 * Closing the last connection still checkpoints the whole log, as SQLite always does.
 *
 * One thread serves every database watched through the same Checkpointer: `kiln up` shares one
 * among its six services (a thread is ~10 MB of memory). It starts with the first watch and ends
 * when the last one stops.
 */
export interface Checkpointer {
  /** Checkpoints `file` from now on; `stop` runs a last checkpoint and closes that connection. */
  watch(file: string, opts?: { intervalMs?: number; onError?: (message: string) => void }): CheckpointWatch;
  /** Whether the thread is running (it is while anything is watched). */
  readonly running: boolean;
}

export interface CheckpointWatch {
  stop(): Promise<void>;
}

type ToWorker =
  | { kind: "watch"; id: number; file: string; intervalMs: number }
  | { kind: "unwatch"; id: number }
  | { kind: "end" };
type FromWorker = { kind: "error"; id: number; message: string } | { kind: "unwatched"; id: number };

// CommonJS, evaluated in the worker: the module path comes from here, so it resolves the same
// better-sqlite3 whatever the process's working directory.
const WORKER_SOURCE = `
const { parentPort, workerData } = require("node:worker_threads");
const Database = require(workerData.module);
const watched = new Map();
const checkpoint = (id, db) => {
  try {
    db.pragma("wal_checkpoint(PASSIVE)");
  } catch (err) {
    parentPort.postMessage({ kind: "error", id, message: String((err && err.message) || err) });
  }
};
parentPort.on("message", (m) => {
  if (m.kind === "watch") {
    let db;
    try {
      db = new Database(m.file);
      db.pragma("busy_timeout = 5000");
      db.pragma("synchronous = NORMAL");
    } catch (err) {
      parentPort.postMessage({ kind: "error", id: m.id, message: String((err && err.message) || err) });
      return;
    }
    watched.set(m.id, { db, timer: setInterval(() => checkpoint(m.id, db), m.intervalMs) });
  } else if (m.kind === "unwatch") {
    const w = watched.get(m.id);
    if (w) {
      watched.delete(m.id);
      clearInterval(w.timer);
      checkpoint(m.id, w.db);
      w.db.close();
    }
    parentPort.postMessage({ kind: "unwatched", id: m.id });
  } else if (m.kind === "end") {
    parentPort.close();
  }
});
`;

export function createCheckpointer(): Checkpointer {
  const module = createRequire(import.meta.url).resolve("better-sqlite3");
  let worker: Worker | undefined;
  let nextId = 1;
  const watches = new Map<
    number,
    { thread: Worker; onError?: (message: string) => void; stopped?: () => void }
  >();

  const start = (): Worker => {
    const w = new Worker(WORKER_SOURCE, { eval: true, workerData: { module } });
    w.unref(); // a service that forgets to close its database still exits
    w.on("message", (m: FromWorker) => {
      const watch = watches.get(m.id);
      if (m.kind === "error") watch?.onError?.(m.message);
      else if (m.kind === "unwatched") {
        watches.delete(m.id);
        watch?.stopped?.();
      }
    });
    w.on("error", (err) => {
      for (const watch of watches.values()) if (watch.thread === w) watch.onError?.(err.message);
    });
    // A thread that died cannot checkpoint or stop anything: stop() returns rather than hangs.
    w.once("exit", () => {
      if (worker === w) worker = undefined;
      for (const [id, watch] of watches) {
        if (watch.thread !== w) continue;
        watches.delete(id);
        watch.stopped?.();
      }
    });
    return w;
  };

  return {
    get running() {
      return worker !== undefined;
    },
    watch(file, opts = {}) {
      worker ??= start();
      const w = worker;
      const id = nextId++;
      watches.set(id, { thread: w, onError: opts.onError });
      w.postMessage({ kind: "watch", id, file, intervalMs: opts.intervalMs ?? 500 } satisfies ToWorker);
      let stopping: Promise<void> | undefined;
      return {
        stop() {
          stopping ??= new Promise<void>((resolve) => {
            const watch = watches.get(id);
            if (!watch) return resolve();
            watch.stopped = resolve;
            w.postMessage({ kind: "unwatch", id } satisfies ToWorker);
            // The last watch of this thread: it ends after that unwatch (messages keep order).
            const busy = [...watches.values()].some((x) => x.thread === w && !x.stopped);
            if (!busy && worker === w) {
              worker = undefined;
              w.postMessage({ kind: "end" } satisfies ToWorker);
            }
          });
          return stopping;
        },
      };
    },
  };
}
