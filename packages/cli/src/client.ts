import fs from "node:fs";
import path from "node:path";
import type { Transport } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import {
  DEFAULT_PORTS,
  HEADERS,
  internalClientInterceptor,
  resolveDataDir,
  type ServiceName,
} from "@kiln/kit";

/** Global options every command that calls a service accepts (see program.ts). */
export interface GlobalOptions {
  tenant?: string;
  tier?: string;
  dataDir?: string;
  json?: boolean;
}

/**
 * How the CLI reaches services. Until gatewayd authenticates API keys, the CLI acts as an
 * operator on the same machine: it presents the service token (KILN_SERVICE_TOKEN, or
 * <data dir>/service-token) and names the tenant (--tenant, KILN_TENANT, default "default").
 * Service addresses: KILN_<SERVICE>_URL, else 127.0.0.1 and UNKEY_<SERVICE>_PORT or the seed port.
 */
export interface CliContext {
  readonly tenant: string;
  readonly tier: string;
  readonly json: boolean;
  transport(service: ServiceName): Transport;
  /**
   * Where a service listens and the headers a call to it carries (tenant and service token), for
   * clients that speak the protocol themselves (`uploadAssetFile`).
   */
  endpoint(service: ServiceName): { baseUrl: string; headers: Record<string, string> };
  /** Call options acting for the tenant. */
  readonly callOptions: { headers: Record<string, string> };
}

export function createCliContext(
  opts: GlobalOptions,
  env: Record<string, string | undefined> = process.env,
): CliContext {
  const dataDir = resolveDataDir(opts.dataDir ?? env.KILN_DATA_DIR ?? "");
  const tenant = opts.tenant ?? env.KILN_TENANT ?? "default";
  const tier = opts.tier ?? env.KILN_TIER ?? "pro";
  let token = env.KILN_SERVICE_TOKEN;
  const tokenFile = path.join(dataDir, "service-token");
  const transports = new Map<ServiceName, Transport>();
  const callOptions = { headers: { [HEADERS.tenantId]: tenant, [HEADERS.tenantTier]: tier } };
  const serviceToken = () => {
    if (!token) {
      try {
        token = fs.readFileSync(tokenFile, "utf8").trim();
      } catch {
        throw new Error(
          `no service token: ${tokenFile} is missing. Start Kiln first (\`kiln up\`), pass --data-dir, or set KILN_SERVICE_TOKEN`,
        );
      }
    }
    return token;
  };
  const baseUrl = (service: ServiceName) => {
    const port = env[`UNKEY_${service.toUpperCase()}_PORT`] ?? String(DEFAULT_PORTS[service]);
    return env[`KILN_${service.toUpperCase()}_URL`] ?? `http://127.0.0.1:${port}`;
  };
  return {
    tenant,
    tier,
    json: opts.json === true,
    callOptions,
    transport(service) {
      let t = transports.get(service);
      if (!t) {
        t = createConnectTransport({
          baseUrl: baseUrl(service),
          httpVersion: "1.1",
          interceptors: [internalClientInterceptor(serviceToken())],
        });
        transports.set(service, t);
      }
      return t;
    },
    endpoint(service) {
      const headers = { ...callOptions.headers, [HEADERS.serviceToken]: serviceToken() };
      return { baseUrl: baseUrl(service), headers };
    },
  };
}

/** The context for a command's action: `contextOf(this)` inside `.action(function () {…})`. */
export function contextOf(command: { optsWithGlobals(): Record<string, unknown> }): CliContext {
  return createCliContext(command.optsWithGlobals() as GlobalOptions);
}
