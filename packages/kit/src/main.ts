import { ConfigError } from "./config/settings.js";
import { type RunningService, type ServiceDefinition, type StartOptions, startService } from "./service.js";

/**
 * Runs services until SIGTERM/SIGINT, then stops them gracefully (in-flight calls finish up to
 * the shutdown timeout). A second signal exits at once. Start-up errors print one clear message
 * and exit 1 (2 for configuration errors).
 */
export async function runUntilSignal(start: () => Promise<RunningService[]>): Promise<void> {
  let services: RunningService[];
  try {
    services = await start();
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`${err.message}\n`);
      process.exit(2);
    }
    process.stderr.write(`failed to start: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  }
  let stopping = false;
  const stop = async (signal: NodeJS.Signals) => {
    if (stopping) {
      process.stderr.write(`${signal} again: exiting now\n`);
      process.exit(130);
    }
    stopping = true;
    // Stop in reverse start order: the edge first, the services it calls last.
    for (const s of [...services].reverse()) await s.stop();
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

/** The standalone entry of one service (`builderd`, `kiln serve builderd`). */
export function runStandalone<S extends import("./config/settings.js").ConfigSpec>(
  def: ServiceDefinition<S>,
  opts: StartOptions = {},
): Promise<void> {
  return runUntilSignal(async () => [await startService(def, opts)]);
}
