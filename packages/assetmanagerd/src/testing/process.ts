import { type ChildProcess, spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../..");
const MAIN = path.join(REPO, "packages/assetmanagerd/src/main.ts");

export interface ChildService {
  readonly pid: number;
  readonly baseUrl: string;
  readonly token: string;
  /** Log lines (JSON) the process wrote so far. */
  readonly logs: Array<Record<string, unknown>>;
  /** Sends a signal; resolves when the process has exited. */
  kill(signal: NodeJS.Signals): Promise<void>;
}

/**
 * assetmanagerd as its own process (`node --conditions=kiln-source --import tsx src/main.ts`),
 * like the standalone binary, on free ports and the given data dir. Resolves once it listens.
 * The caller must `kill` it (tests do so in `finally`).
 */
export async function spawnAssetmanagerd(opts: {
  dataDir: string;
  env?: Record<string, string>;
  timeoutMs?: number;
}): Promise<ChildService> {
  const child: ChildProcess = spawn(process.execPath, ["--conditions=kiln-source", "--import", "tsx", MAIN], {
    cwd: REPO,
    env: {
      PATH: process.env.PATH,
      HOME: process.env.HOME,
      UNKEY_ASSETMANAGERD_PORT: "0",
      UNKEY_ASSETMANAGERD_METRICS_PORT: "0",
      UNKEY_ASSETMANAGERD_DATA_DIR: opts.dataDir,
      // info at least: start-up is detected from the "listening" log line.
      UNKEY_ASSETMANAGERD_LOG_LEVEL: "info",
      // The builderd peer is not running; nothing here calls it.
      UNKEY_ASSETMANAGERD_BUILDERD_URL: "http://127.0.0.1:9",
      ...opts.env,
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  const logs: Array<Record<string, unknown>> = [];
  let stderr = "";
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  const listening = new Promise<string>((resolve, reject) => {
    let buf = "";
    child.stdout!.on("data", (d: Buffer) => {
      buf += d.toString();
      let nl = buf.indexOf("\n");
      while (nl >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        nl = buf.indexOf("\n");
        try {
          const entry = JSON.parse(line) as Record<string, unknown>;
          logs.push(entry);
          if (entry.msg === "assetmanagerd listening") resolve(String(entry.api));
        } catch {
          // not a log line
        }
      }
    });
    child.stderr!.on("data", (d: Buffer) => {
      stderr += d.toString();
    });
    child.once("exit", (code) =>
      reject(new Error(`assetmanagerd exited (${code}) before listening: ${stderr.trim()}`)),
    );
  });
  const timeout = opts.timeoutMs ?? 30_000;
  let timer: NodeJS.Timeout | undefined;
  try {
    const api = await Promise.race([
      listening,
      new Promise<never>((_, reject) => {
        timer = setTimeout(
          () => reject(new Error(`assetmanagerd did not listen within ${timeout} ms: ${stderr}`)),
          timeout,
        );
      }),
    ]);
    return {
      pid: child.pid!,
      baseUrl: `http://${api}`,
      token: fs.readFileSync(path.join(opts.dataDir, "service-token"), "utf8").trim(),
      logs,
      async kill(signal) {
        if (child.exitCode === null && child.signalCode === null) child.kill(signal);
        await exited;
      },
    };
  } catch (err) {
    child.kill("SIGKILL");
    await exited;
    throw err;
  } finally {
    clearTimeout(timer);
  }
}
