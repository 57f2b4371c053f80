import { FailedPreconditionError, InternalError, sharedSpawner } from "@kiln/kit";

/** A runtime command (runc, runsc, qemu-img, mount, …) that failed; carries its command line and stderr. */
export class BackendCommandError extends InternalError {
  constructor(
    readonly command: string,
    readonly stderr: string,
    readonly exitCode: number | undefined,
    options?: { cause?: unknown },
  ) {
    const detail = stderr.trim().split("\n").slice(-5).join("\n") || "no output";
    super(`\`${command}\` failed${exitCode === undefined ? "" : ` (exit ${exitCode})`}: ${detail}`, options);
  }
}

export interface CommandOptions {
  timeoutMs?: number;
  /** A failure whose stderr matches counts as success (e.g. "does not exist" when deleting). */
  tolerate?: RegExp;
  env?: NodeJS.ProcessEnv;
}

/** Runs a command without a shell and returns its stdout. */
export async function runCommand(
  file: string,
  args: readonly string[],
  opts: CommandOptions = {},
): Promise<{ stdout: string; stderr: string }> {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  const r = await sharedSpawner().run(file, args, { timeoutMs, maxBuffer: 32 * 1024 * 1024, env: opts.env });
  const { stdout, stderr } = r;
  if (r.code === 0) return { stdout, stderr };
  if (opts.tolerate?.test(stderr) || opts.tolerate?.test(stdout)) return { stdout, stderr };
  const line = [file, ...args].join(" ");
  if (r.startError?.code === "ENOENT") {
    throw new FailedPreconditionError(`${file} is not installed (running \`${line}\`)`);
  }
  const why =
    r.startError?.message ?? (r.timedOut ? `timed out after ${timeoutMs} ms\n${stderr}` : stderr || stdout);
  throw new BackendCommandError(line, why, r.code ?? undefined);
}

/** The first line of `<binary> <versionArg>`, or undefined when it cannot run. */
export async function commandVersion(file: string, versionArg = "--version"): Promise<string | undefined> {
  try {
    const { stdout, stderr } = await runCommand(file, [versionArg], { timeoutMs: 10_000 });
    return (stdout || stderr).trim().split("\n")[0];
  } catch {
    return undefined;
  }
}
