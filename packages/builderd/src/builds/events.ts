import type { Logger } from "@kiln/kit";
import { type BuildState, isTerminal } from "./states.js";
import type { BuildStore, LogRow } from "./store.js";

export type LogLevel = "debug" | "info" | "warn" | "error";

export interface Progress {
  stage: BuildState;
  bytesDone: number;
  bytesTotal: number;
  layersDone: number;
  layersTotal: number;
  percent: number;
  step: string;
}

export type BuildEvent =
  | { kind: "log"; entry: LogRow }
  | { kind: "progress"; progress: Progress }
  | { kind: "state"; state: BuildState; error?: string };

/**
 * A build's log lines (persisted, numbered) and its live progress and state changes, for
 * StreamBuildLogs: history from the DB, then the live tail until the build ends.
 */
export function createBuildEvents(store: BuildStore, log: Logger) {
  const listeners = new Map<string, Set<(e: BuildEvent) => void>>();
  // Appends per build are chained so sequence numbers follow call order.
  const chains = new Map<string, Promise<number>>();

  const emit = (buildId: string, event: BuildEvent) => {
    for (const fn of listeners.get(buildId) ?? []) fn(event);
  };

  return {
    emit,

    /** Persists a log line and sends it to followers. Never throws (a log line must not fail a build). */
    log(
      buildId: string,
      level: LogLevel,
      component: string,
      message: string,
      metadata: Record<string, string | number> = {},
    ): Promise<void> {
      const prev = chains.get(buildId) ?? store.lastLogSeq(buildId);
      const next = prev.then(async (last) => {
        const entry: LogRow = {
          build_id: buildId,
          seq: last + 1,
          ts: Date.now(),
          level,
          component,
          message,
          metadata_json: JSON.stringify(
            Object.fromEntries(Object.entries(metadata).map(([k, v]) => [k, String(v)])),
          ),
        };
        await store.appendLog(entry);
        emit(buildId, { kind: "log", entry });
        return entry.seq;
      });
      const settled = next.catch((err) => {
        log.warn({ err, build_id: buildId }, "could not store a build log line");
        return prev.catch(() => 0);
      });
      chains.set(buildId, settled);
      return settled.then(() => undefined);
    },

    /** Resolves once every log line appended so far is stored and sent. */
    async flush(buildId: string): Promise<void> {
      await chains.get(buildId);
    },

    /** Drops per-build bookkeeping once a build has ended and been followed to the end. */
    forget(buildId: string): void {
      chains.delete(buildId);
    },

    /**
     * History, then (with `follow`) live events until the build reaches a terminal state or
     * `signal` aborts. `currentState` is read after subscribing, so no ending is missed.
     */
    async *follow(
      buildId: string,
      opts: { follow: boolean; currentState: () => Promise<BuildState>; signal?: AbortSignal },
    ): AsyncGenerator<BuildEvent> {
      const queue: BuildEvent[] = [];
      let wake: (() => void) | undefined;
      const listener = (e: BuildEvent) => {
        queue.push(e);
        wake?.();
      };
      const set = listeners.get(buildId) ?? new Set();
      listeners.set(buildId, set);
      set.add(listener);
      const onAbort = () => wake?.();
      opts.signal?.addEventListener("abort", onAbort);
      try {
        const state = await opts.currentState();
        let lastSeq = 0;
        for (const entry of await store.logs(buildId, 0)) {
          lastSeq = entry.seq;
          yield { kind: "log", entry };
        }
        if (!opts.follow || isTerminal(state)) {
          yield { kind: "state", state };
          return;
        }
        for (;;) {
          while (queue.length > 0) {
            const e = queue.shift()!;
            if (e.kind === "log") {
              if (e.entry.seq <= lastSeq) continue; // already sent from history
              lastSeq = e.entry.seq;
            }
            yield e;
            if (e.kind === "state" && isTerminal(e.state)) return;
          }
          if (opts.signal?.aborted) return;
          await new Promise<void>((resolve) => (wake = resolve));
          wake = undefined;
        }
      } finally {
        set.delete(listener);
        if (set.size === 0) listeners.delete(buildId);
        opts.signal?.removeEventListener("abort", onAbort);
      }
    },
  };
}

export type BuildEvents = ReturnType<typeof createBuildEvents>;
