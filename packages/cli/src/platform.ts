import type { Transport } from "@connectrpc/connect";
import {
  createCheckpointer,
  createLazyTransport,
  type RunningService,
  type ServiceName,
  startService,
} from "@kiln/kit";
import type { DestinationStream } from "pino";
import { SERVICES } from "./services.js";

export interface PlatformOptions {
  /** Base environment; `UNKEY_<SVC>_DATA_DIR` defaults to `dataDir` for every service. */
  env?: Record<string, string | undefined>;
  dataDir?: string;
  logDestination?: DestinationStream;
}

/**
 * Starts all six services in this process (`kiln up`): the same code as the standalone
 * processes, but services call each other through in-process transports. If one fails to start,
 * those already started are stopped again.
 */
export async function startPlatform(opts: PlatformOptions = {}): Promise<RunningService[]> {
  const env: Record<string, string | undefined> = { ...(opts.env ?? process.env) };
  if (opts.dataDir) {
    for (const def of SERVICES) env[`UNKEY_${def.name.toUpperCase()}_DATA_DIR`] ??= opts.dataDir;
  }
  const running = new Map<ServiceName, RunningService>();
  // Peers are resolved at call time: assetmanagerd and builderd call each other.
  const peerTransport = (peer: ServiceName): Transport =>
    createLazyTransport(() => {
      const target = running.get(peer);
      if (!target) throw new Error(`${peer} is not running in this process`);
      return target.transport;
    });
  // One thread checkpoints all six SQLite databases (it ends with the last service stopped).
  const checkpointer = createCheckpointer();
  try {
    for (const def of SERVICES) {
      running.set(
        def.name,
        await startService(def, { env, peerTransport, logDestination: opts.logDestination, checkpointer }),
      );
    }
  } catch (err) {
    for (const s of [...running.values()].reverse()) await s.stop();
    throw err;
  }
  return [...running.values()];
}
