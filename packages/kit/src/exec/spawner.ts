import { type ChildProcess, spawn } from "node:child_process";
import { HELPER_SOURCE } from "./helper-source.js";

/**
 * Starting processes through a small helper process instead of from the service itself.
 *
 * Why: Node (libuv) starts a child with fork(), which copies the parent's page tables while the
 * event loop waits — measured here at ~3.7 ms per 100 MiB of resident memory: ~9 ms per command
 * for a 250 MiB service, ~33 ms at 850 MiB (`kiln up` runs every service in one process). metald
 * starts a dozen commands per VM (ip, iptables, mount, runc), so the loop stalled for tens of
 * milliseconds per VM, delaying every other request and the 100 ms sampler. The helper is a
 * ~40 MiB Node process: its fork costs ~1.5 ms, and it happens outside the service's loop.
 *
 * One helper per spawner, started on first use and again after it dies; it exits when its parent
 * does. While no command is under way it does not keep the parent's event loop alive.
 */
export interface RunOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** Written to the command's stdin, which is then closed. */
  input?: string;
  /** Killed with SIGKILL after this long (0 = never). */
  timeoutMs?: number;
  /** stdout + stderr beyond this kill the command (default 32 MiB). */
  maxBuffer?: number;
  /** Aborting kills the command (SIGTERM) and rejects with the signal's reason. */
  signal?: AbortSignal;
}

export interface RunResult {
  /** Exit code; null when killed by a signal or never started. */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** Killed for exceeding timeoutMs or maxBuffer. */
  timedOut: boolean;
  /** Set when the program could not be started at all (`ENOENT`, `EACCES`, …). */
  startError?: { code: string; message: string };
}

export interface DetachedSpawnOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** stdout and stderr are appended here; stdin is /dev/null. */
  logFile: string;
  /** Own session and process group (setsid), default true. */
  newSession?: boolean;
}

export interface DetachedProcess {
  pid: number;
  /** Resolves when the process exits (never rejects); code and signal are null if the helper died first. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

export interface Spawner {
  /**
   * Runs a command to completion. Never rejects for the command's own failure (see the result),
   * only when `signal` aborts it.
   */
  run(file: string, args: readonly string[], opts?: RunOptions): Promise<RunResult>;
  /** Starts a long-lived process; resolves once it exists, rejects when it cannot start. */
  spawnDetached(file: string, args: readonly string[], opts: DetachedSpawnOptions): Promise<DetachedProcess>;
  /** Stops the helper (commands under way are answered with an error). */
  close(): Promise<void>;
}

type Reply =
  | ({ id: number; kind: "done" } & Omit<RunResult, "startError"> & { error?: RunResult["startError"] })
  | { id: number; kind: "spawned"; pid: number }
  | { id: number; kind: "exited"; code: number | null; signal: NodeJS.Signals | null }
  | { id: number; kind: "failed"; error: { code: string; message: string } };

interface Pending {
  onReply(reply: Reply): boolean; // true when this was the last reply for the request
  onHelperGone(reason: string): void;
}

export class SpawnError extends Error {
  constructor(
    message: string,
    readonly code: string,
  ) {
    super(message);
    this.name = "SpawnError";
  }
}

export function createSpawner(): Spawner {
  let helper: ChildProcess | undefined;
  const pending = new Map<number, Pending>();
  /** Requests whose caller waits (a run until done, a detached start until it exists). */
  const awaited = new Set<number>();
  let nextId = 1;

  /**
   * Keeps the parent alive only while a caller waits: a detached process being watched for
   * its exit (a VM) must not keep the service from exiting.
   */
  function updateRef(): void {
    if (!helper) return;
    if (awaited.size > 0) {
      helper.ref();
      helper.channel?.ref();
    } else {
      helper.unref();
      helper.channel?.unref();
    }
  }

  function start(): ChildProcess {
    const child = spawn(process.execPath, ["--input-type=module", "-e", HELPER_SOURCE], {
      stdio: ["ignore", "ignore", "inherit", "ipc"],
      // None of the parent's Node options (loaders, inspector, heap sizes): the helper is plain JS.
      env: { ...process.env, NODE_OPTIONS: "" },
    });
    child.on("message", (reply: Reply) => {
      const p = pending.get(reply.id);
      if (p?.onReply(reply)) pending.delete(reply.id);
      if (reply.kind !== "exited") awaited.delete(reply.id);
      updateRef();
    });
    const gone = (why: string) => {
      if (helper !== child) return;
      helper = undefined;
      const waiting = [...pending.values()];
      pending.clear();
      awaited.clear();
      for (const p of waiting) p.onHelperGone(why);
    };
    child.once("exit", (code, signal) => gone(`spawn helper exited (${signal ?? code})`));
    child.once("error", (err) => gone(`spawn helper failed: ${err.message}`));
    return child;
  }

  /** Sends a request; returns its id. */
  function request(msg: Record<string, unknown>, p: Pending): number {
    helper ??= start();
    const id = nextId++;
    pending.set(id, p);
    awaited.add(id);
    updateRef();
    helper.send({ ...msg, id }, (err) => {
      if (err && pending.delete(id)) {
        awaited.delete(id);
        updateRef();
        p.onHelperGone(`spawn helper unreachable: ${err.message}`);
      }
    });
    return id;
  }

  return {
    run(file, args, opts = {}) {
      return new Promise((resolve, reject) => {
        const { signal } = opts;
        if (signal?.aborted) return reject(signal.reason);
        const onAbort = () => helper?.send({ kind: "kill", target: id, signal: "SIGTERM" }, () => {});
        signal?.addEventListener("abort", onAbort, { once: true });
        const finish = (result: RunResult) => {
          signal?.removeEventListener("abort", onAbort);
          if (signal?.aborted) reject(signal.reason);
          else resolve(result);
        };
        const id = request(
          {
            kind: "run",
            file,
            args: [...args],
            cwd: opts.cwd,
            env: opts.env,
            input: opts.input,
            timeoutMs: opts.timeoutMs ?? 0,
            maxBuffer: opts.maxBuffer ?? 32 * 1024 * 1024,
          },
          {
            onReply(reply) {
              if (reply.kind !== "done") return false;
              const { error, ...rest } = reply;
              const { id: _id, kind: _kind, ...result } = rest;
              finish(error ? { ...result, startError: error } : result);
              return true;
            },
            onHelperGone(reason) {
              finish({
                code: null,
                signal: null,
                stdout: "",
                stderr: reason,
                timedOut: false,
                startError: { code: "EHELPER", message: reason },
              });
            },
          },
        );
      });
    },

    spawnDetached(file, args, opts) {
      return new Promise((resolve, reject) => {
        let settleExit: (v: { code: number | null; signal: NodeJS.Signals | null }) => void = () => {};
        const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => {
          settleExit = r;
        });
        let started = false;
        request(
          {
            kind: "detached",
            file,
            args: [...args],
            cwd: opts.cwd,
            env: opts.env,
            logFile: opts.logFile,
            newSession: opts.newSession ?? true,
          },
          {
            onReply(reply) {
              if (reply.kind === "spawned") {
                started = true;
                resolve({ pid: reply.pid, exited });
                return false;
              }
              if (reply.kind === "exited") {
                settleExit({ code: reply.code, signal: reply.signal });
                return true;
              }
              if (reply.kind === "failed") {
                if (started) settleExit({ code: null, signal: null });
                else reject(new SpawnError(`cannot start ${file}: ${reply.error.message}`, reply.error.code));
                return true;
              }
              return false;
            },
            onHelperGone(reason) {
              if (started) settleExit({ code: null, signal: null });
              else reject(new SpawnError(`cannot start ${file}: ${reason}`, "EHELPER"));
            },
          },
        );
      });
    },

    async close() {
      const child = helper;
      if (!child) return;
      const exited = new Promise<void>((r) => child.once("exit", () => r()));
      child.disconnect();
      await exited;
    },
  };
}

let shared: Spawner | undefined;

/**
 * The process's spawner, for code that runs commands without being handed one. Like
 * child_process itself it is a facility of the process, not state of a service: every service in
 * the process shares the one helper.
 */
export function sharedSpawner(): Spawner {
  shared ??= createSpawner();
  return shared;
}
