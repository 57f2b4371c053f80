import { EventEmitter } from "node:events";
import net from "node:net";
import { DeadlineExceededError, InternalError, UnavailableError } from "@kiln/kit";

/**
 * A small client for QEMU's machine protocol (QMP) over its unix socket: read the greeting,
 * negotiate capabilities, then send commands tagged with ids and match the replies; asynchronous
 * events (SHUTDOWN, STOP, RESUME, RESET, …) are emitted as they arrive. One connection at a time
 * per QEMU: QEMU serves a QMP socket to one client, so callers connect, do their work and close.
 */

/** A command QEMU refused (`{"error": {"class", "desc"}}`). */
export class QmpCommandError extends InternalError {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command} failed: ${errorClass}: ${desc}`);
  }
}

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

interface Pending {
  command: string;
  resolve(value: unknown): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout;
}

export interface QmpConnectOptions {
  /** For connecting and for the greeting + capabilities negotiation (default 5 s). */
  timeoutMs?: number;
  /** Default per-command timeout (default 10 s). */
  commandTimeoutMs?: number;
}

export class QmpClient extends EventEmitter<{ event: [QmpEvent]; close: [] }> {
  private buffer = "";
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private closed = false;
  greeting: QmpGreeting | undefined;

  private constructor(
    private readonly socket: net.Socket,
    private readonly commandTimeoutMs: number,
  ) {
    super();
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => this.onData(chunk));
    socket.on("close", () => this.onClose(new UnavailableError("QMP connection closed")));
    socket.on("error", (err) =>
      this.onClose(new UnavailableError(`QMP connection failed: ${err.message}`, { cause: err })),
    );
  }

  /** Connects, reads the greeting and enters command mode (qmp_capabilities). */
  static async connect(socketPath: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? 5_000;
    const socket = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.createConnection(socketPath);
      const timer = setTimeout(() => {
        s.destroy();
        reject(
          new DeadlineExceededError(
            `QMP socket ${socketPath} did not accept a connection within ${timeoutMs} ms`,
          ),
        );
      }, timeoutMs);
      s.once("connect", () => {
        clearTimeout(timer);
        resolve(s);
      });
      s.once("error", (err) => {
        clearTimeout(timer);
        reject(
          new UnavailableError(`cannot connect to QMP socket ${socketPath}: ${err.message}`, { cause: err }),
        );
      });
    });
    const client = new QmpClient(socket, opts.commandTimeoutMs ?? 10_000);
    try {
      await client.waitForGreeting(timeoutMs);
      await client.execute("qmp_capabilities", undefined, { timeoutMs });
    } catch (err) {
      client.close();
      throw err;
    }
    return client;
  }

  private greetingWaiter: { resolve(): void; reject(err: Error): void } | undefined;

  private waitForGreeting(timeoutMs: number): Promise<void> {
    if (this.greeting) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new DeadlineExceededError(`no QMP greeting within ${timeoutMs} ms`)),
        timeoutMs,
      );
      this.greetingWaiter = {
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
        reject: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      };
    });
  }

  /** Runs a command and resolves with its `return` value. */
  execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    opts: { timeoutMs?: number } = {},
  ): Promise<T> {
    if (this.closed)
      return Promise.reject(new UnavailableError(`QMP connection closed; cannot run ${command}`));
    const id = `kiln-${this.nextId++}`;
    const timeoutMs = opts.timeoutMs ?? this.commandTimeoutMs;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new DeadlineExceededError(`QMP ${command} got no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      this.socket.write(
        `${JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id })}\n`,
      );
    });
  }

  /** Resolves with the next event of that name (or undefined after the timeout, or when QEMU goes away). */
  waitForEvent(name: string, timeoutMs: number): Promise<QmpEvent | undefined> {
    return new Promise((resolve) => {
      const onEvent = (ev: QmpEvent) => {
        if (ev.event !== name) return;
        done(ev);
      };
      const onClose = () => done(undefined);
      const timer = setTimeout(() => done(undefined), timeoutMs);
      const done = (ev: QmpEvent | undefined) => {
        clearTimeout(timer);
        this.off("event", onEvent);
        this.off("close", onClose);
        resolve(ev);
      };
      this.on("event", onEvent);
      this.on("close", onClose);
    });
  }

  close(): void {
    this.socket.destroy();
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    let nl = this.buffer.indexOf("\n");
    while (nl >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      nl = this.buffer.indexOf("\n");
      if (line) this.onMessage(line);
    }
  }

  private onMessage(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return; // not QMP; ignore rather than tear the connection down
    }
    if ("QMP" in msg) {
      this.greeting = msg.QMP as QmpGreeting;
      this.greetingWaiter?.resolve();
      return;
    }
    if ("event" in msg) {
      this.emit("event", msg as unknown as QmpEvent);
      return;
    }
    const id = typeof msg.id === "string" ? msg.id : undefined;
    const p = id ? this.pending.get(id) : undefined;
    if (!p || !id) return;
    this.pending.delete(id);
    clearTimeout(p.timer);
    if ("error" in msg) {
      const e = msg.error as { class?: string; desc?: string };
      p.reject(new QmpCommandError(p.command, e.class ?? "GenericError", e.desc ?? "unknown error"));
    } else {
      p.resolve(msg.return);
    }
  }

  private onClose(err: Error): void {
    if (this.closed) return;
    this.closed = true;
    this.greetingWaiter?.reject(err);
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      this.pending.delete(id);
      p.reject(err);
    }
    this.emit("close");
  }
}

/** Connects, runs `fn`, closes: the usual shape of a QMP conversation. */
export async function withQmp<T>(
  socketPath: string,
  fn: (qmp: QmpClient) => Promise<T>,
  opts?: QmpConnectOptions,
): Promise<T> {
  const qmp = await QmpClient.connect(socketPath, opts);
  try {
    return await fn(qmp);
  } finally {
    qmp.close();
  }
}
