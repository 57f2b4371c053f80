import fs from "node:fs/promises";
import path from "node:path";
import { InternalError, sharedSpawner } from "@kiln/kit";

/**
 * Host processes as backends see them: identified by pid *and* start time (a pid alone can be
 * reused after the VM's process exits), started detached from metald, and recorded under the VM
 * directory so delete() finds them when the manager lost the handle.
 */
export interface ProcessIdentity {
  pid: number;
  /** Field 22 of /proc/<pid>/stat: clock ticks after boot. */
  startTime: number;
}

interface ProcStat {
  state: string;
  ppid: number;
  utimeTicks: number;
  stimeTicks: number;
  startTime: number;
  rssPages: number;
}

/** Parses /proc/<pid>/stat; the command name in parentheses may itself contain spaces and ")". */
export function parseProcStat(text: string): ProcStat {
  const close = text.lastIndexOf(")");
  if (close < 0) throw new Error(`malformed /proc stat line: ${JSON.stringify(text.slice(0, 80))}`);
  // Fields after the name, numbered from 3 (state) as in proc(5).
  const f = text
    .slice(close + 2)
    .trim()
    .split(" ");
  const field = (n: number) => Number(f[n - 3]);
  return {
    state: f[0] ?? "?",
    ppid: field(4),
    utimeTicks: field(14),
    stimeTicks: field(15),
    startTime: field(22),
    rssPages: field(24),
  };
}

export async function readProcStat(pid: number): Promise<ProcStat | undefined> {
  if (!Number.isInteger(pid) || pid <= 0) return undefined;
  try {
    return parseProcStat(await fs.readFile(`/proc/${pid}/stat`, "utf8"));
  } catch {
    return undefined;
  }
}

/** The start time of a live process; undefined when it is gone or a zombie. */
export async function processStartTime(pid: number): Promise<number | undefined> {
  const st = await readProcStat(pid);
  if (!st || st.state === "Z" || st.state === "X") return undefined;
  return st.startTime;
}

/** Whether `id` still names the process that was started (not gone, not a zombie, not a reused pid). */
export async function isAlive(id: ProcessIdentity): Promise<boolean> {
  return (await processStartTime(id.pid)) === id.startTime;
}

export async function identify(pid: number): Promise<ProcessIdentity> {
  const startTime = await processStartTime(pid);
  if (startTime === undefined) {
    throw new InternalError(`process ${pid} exited right after it started; see the VM's console log`);
  }
  return { pid, startTime };
}

/**
 * Waits until the process is gone; false if it still runs after `timeoutMs`. Once it has exited,
 * waits a little longer (≤ 1 s) for its parent to reap it: a zombie still counts in its cgroup
 * (cgroup v1 lists it in cgroup.procs), so the cgroup could not be removed yet.
 */
export async function waitForExit(id: ProcessIdentity, timeoutMs: number, pollMs = 25): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (!(await isAlive(id))) break;
    if (Date.now() >= deadline) return false;
    await sleep(Math.min(pollMs, Math.max(1, deadline - Date.now())));
  }
  const reapDeadline = Date.now() + 1_000;
  while (Date.now() < reapDeadline && (await readProcStat(id.pid))?.startTime === id.startTime)
    await sleep(10);
  return true;
}

/** Signals the process only if it is still the one identified; false when it was already gone. */
export async function signalIfAlive(id: ProcessIdentity, signal: NodeJS.Signals): Promise<boolean> {
  if (!(await isAlive(id))) return false;
  try {
    process.kill(id.pid, signal);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ESRCH") return false;
    throw err;
  }
}

/** SIGKILL and wait; throws if the process survives (a D-state hang) so callers do not leak it silently. */
export async function killAndWait(id: ProcessIdentity, timeoutMs = 10_000): Promise<void> {
  await signalIfAlive(id, "SIGKILL");
  if (!(await waitForExit(id, timeoutMs))) {
    throw new InternalError(`process ${id.pid} did not exit ${timeoutMs} ms after SIGKILL`);
  }
}

/**
 * Live processes whose command line contains `needle` (a VM's own directory): the helpers a
 * runtime started for that VM (runsc's sandbox and gofer carry `--root=<dir>/…`).
 */
export async function processesMentioning(needle: string): Promise<ProcessIdentity[]> {
  const out: ProcessIdentity[] = [];
  for (const entry of await fs.readdir("/proc")) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    const cmdline = await fs.readFile(`/proc/${entry}/cmdline`, "utf8").catch(() => "");
    if (!cmdline.includes(needle)) continue;
    const startTime = await processStartTime(Number(entry));
    if (startTime !== undefined) out.push({ pid: Number(entry), startTime });
  }
  return out;
}

/** Linux's USER_HZ: /proc times are in these ticks. 100 on every mainstream architecture. */
export const CLOCK_TICKS_PER_SECOND = 100;

/** CPU time (user + system) and resident memory of one process, from /proc. */
export async function processUsage(
  pid: number,
): Promise<{ cpuTimeNanos: number; memoryBytes: number } | undefined> {
  const st = await readProcStat(pid);
  if (!st) return undefined;
  const ticks = st.utimeTicks + st.stimeTicks;
  return {
    cpuTimeNanos: Math.round((ticks * 1e9) / CLOCK_TICKS_PER_SECOND),
    memoryBytes: st.rssPages * 4096,
  };
}

/** The process's I/O counters (bytes that reached the storage layer). */
export async function processIo(pid: number): Promise<{ readBytes: number; writeBytes: number } | undefined> {
  try {
    const text = await fs.readFile(`/proc/${pid}/io`, "utf8");
    const get = (k: string) => Number(new RegExp(`^${k}:\\s*(\\d+)`, "m").exec(text)?.[1] ?? 0);
    return { readBytes: get("read_bytes"), writeBytes: get("write_bytes") };
  } catch {
    return undefined;
  }
}

/** The process record a backend keeps next to its files, for delete() without a handle. */
export async function writeProcessRecord(file: string, id: ProcessIdentity): Promise<void> {
  const tmp = `${file}.tmp`;
  await fs.writeFile(tmp, `${JSON.stringify(id)}\n`);
  await fs.rename(tmp, file);
}

export async function readProcessRecord(file: string): Promise<ProcessIdentity | undefined> {
  try {
    const v = JSON.parse(await fs.readFile(file, "utf8")) as Partial<ProcessIdentity>;
    if (typeof v.pid === "number" && typeof v.startTime === "number") {
      return { pid: v.pid, startTime: v.startTime };
    }
  } catch {
    // missing or torn: nothing recorded
  }
  return undefined;
}

export interface DetachedOptions {
  /** Appended to (never truncated): the VM's console / stdout + stderr. */
  logFile: string;
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /**
   * Own session and process group (default true), so a signal to metald's group (Ctrl-C in a
   * terminal, a service manager stopping metald) does not reach the VM. The Firecracker jailer
   * must not be a group leader (it calls setsid() itself), hence the opt-out.
   */
  newSession?: boolean;
}

/**
 * Starts a long-lived process that does not depend on metald: stdin from /dev/null, stdout and
 * stderr appended to the log file, its own session, unreferenced so metald can exit. Started by
 * the process's spawn helper (kit's spawner: no fork of metald itself). Resolves once the
 * process exists (or rejects when it cannot be started at all).
 */
export async function spawnDetached(
  file: string,
  args: readonly string[],
  opts: DetachedOptions,
): Promise<{ pid: number; exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }> }> {
  await fs.mkdir(path.dirname(opts.logFile), { recursive: true });
  try {
    return await sharedSpawner().spawnDetached(file, args, {
      logFile: opts.logFile,
      cwd: opts.cwd,
      env: opts.env,
      newSession: opts.newSession ?? true,
    });
  } catch (err) {
    throw new InternalError(err instanceof Error ? err.message : String(err), { cause: err });
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
