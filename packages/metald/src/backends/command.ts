import { execFile } from "node:child_process";
import { FailedPreconditionError, InternalError } from "@kiln/kit";

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
export function runCommand(
  file: string,
  args: readonly string[],
  opts: CommandOptions = {},
): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(
      file,
      args,
      {
        timeout: opts.timeoutMs ?? 30_000,
        killSignal: "SIGKILL",
        maxBuffer: 32 * 1024 * 1024,
        encoding: "utf8",
        env: opts.env ?? process.env,
      },
      (err, stdout, stderr) => {
        if (!err) return resolve({ stdout, stderr });
        if (opts.tolerate?.test(stderr) || opts.tolerate?.test(stdout)) return resolve({ stdout, stderr });
        const e = err as NodeJS.ErrnoException & { killed?: boolean };
        const line = [file, ...args].join(" ");
        if (e.code === "ENOENT") {
          return reject(
            new FailedPreconditionError(`${file} is not installed (running \`${line}\`)`, { cause: err }),
          );
        }
        const code = typeof e.code === "number" ? e.code : undefined;
        const why = e.killed
          ? `timed out after ${opts.timeoutMs ?? 30_000} ms\n${stderr}`
          : stderr || stdout || e.message;
        reject(new BackendCommandError(line, why, code, { cause: err }));
      },
    );
  });
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
