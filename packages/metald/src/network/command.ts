import { InternalError, sharedSpawner } from "@kiln/kit";

/** A host networking command (`ip`, `iptables`, `nsenter`) that failed; carries the command line and its stderr. */
export class NetworkCommandError extends InternalError {
  readonly command: string;
  readonly stderr: string;
  readonly exitCode: number | undefined;
  constructor(command: string, stderr: string, exitCode: number | undefined, cause?: unknown) {
    super(
      `\`${command}\` failed${exitCode === undefined ? "" : ` (exit ${exitCode})`}: ${stderr.trim() || "no output"}`,
      {
        cause,
      },
    );
    this.command = command;
    this.stderr = stderr;
    this.exitCode = exitCode;
  }
}

export interface RunOptions {
  /** Treat a failure whose stderr matches as success (e.g. /File exists/ when ensuring). */
  tolerate?: RegExp;
  input?: string;
  timeoutMs?: number;
}

/**
 * Runs a command without a shell and returns its stdout. Only for setup and teardown paths
 * (attach, detach, router, egress): the sampler never starts processes.
 */
export async function run(file: string, args: readonly string[], opts: RunOptions = {}): Promise<string> {
  const r = await sharedSpawner().run(file, args, {
    timeoutMs: opts.timeoutMs ?? 15_000,
    maxBuffer: 16 * 1024 * 1024,
    input: opts.input,
  });
  if (r.code === 0) return r.stdout;
  if (opts.tolerate?.test(r.stderr)) return r.stdout;
  const why = r.startError?.message ?? (r.timedOut ? `timed out\n${r.stderr}` : r.stderr);
  throw new NetworkCommandError([file, ...args].join(" "), why, r.code ?? undefined);
}

/** `ip` in a named network namespace (`ip -n NAME …`), or the host's when `netns` is undefined. */
export function ip(netns: string | undefined, args: readonly string[], opts?: RunOptions): Promise<string> {
  return run("ip", netns ? ["-n", netns, ...args] : [...args], opts);
}

/**
 * Several idempotent `ip` commands in one process (`ip -batch -`): each forked `ip` costs ~10 ms,
 * and VM creation runs a dozen. Every line must be safe to repeat (replace, set, change).
 */
export function ipBatch(
  netns: string | undefined,
  commands: ReadonlyArray<readonly string[]>,
): Promise<string> {
  const input = `${commands.map((c) => c.join(" ")).join("\n")}\n`;
  return run("ip", [...(netns ? ["-n", netns] : []), "-batch", "-"], { input });
}

/**
 * A command inside a named network namespace through `nsenter --net` — unlike `ip netns exec`
 * it neither forks a wrapper that outlives nothing nor remounts /sys, and keeps the host's mount
 * namespace (which the router's sysfs mount relies on).
 */
export function inNetns(
  netns: string,
  file: string,
  args: readonly string[],
  opts?: RunOptions,
): Promise<string> {
  return run("nsenter", [`--net=${netnsPath(netns)}`, "--", file, ...args], opts);
}

/** Where `ip netns add` pins a named namespace. */
export function netnsPath(name: string): string {
  return `/var/run/netns/${name}`;
}

/** stderr patterns meaning "already there" / "already gone" for `ip` and `iptables`. */
export const EXISTS = /File exists|already assigned|Chain already exists/;
export const GONE =
  /Cannot find device|No such file or directory|does not exist|Cannot open network namespace|No chain\/target\/match|Bad rule|not found|No such process/i;
