import os from "node:os";
import path from "node:path";
import { bool, duration, oneOf, port, str, url } from "./settings.js";

export const LOG_LEVELS = ["trace", "debug", "info", "warn", "error", "fatal", "silent"] as const;

/** Settings every service has. `ports` are the service's seed ports. */
export function commonSettings(ports: { port: number; metricsPort: number }) {
  return {
    host: str({
      default: "127.0.0.1",
      doc: "Address the API and metrics servers listen on (0.0.0.0 for all).",
    }),
    port: port({
      default: ports.port,
      doc: "API port: Connect, gRPC and gRPC-Web over HTTP/1.1 and h2c, plus /health, /health/ready and /metrics.",
    }),
    metricsPort: port({
      default: ports.metricsPort,
      doc: "Port serving only /metrics, /health and /health/ready.",
    }),
    logLevel: oneOf(LOG_LEVELS, {
      default: "info",
      doc: "Minimum level of the JSON log lines written to stdout.",
    }),
    dataDir: str({
      default: "",
      doc: "Data directory. Empty: /var/lib/kiln when running as root, ~/.kiln otherwise.",
    }),
    databaseUrl: url({
      default: "",
      schemes: ["postgres", "postgresql", "sqlite"],
      doc: "State database. Empty: SQLite at <data dir>/db/<service>.sqlite. postgres://user:pass@host:5432/db for PostgreSQL; sqlite:///abs/path.sqlite for another SQLite file.",
    }),
    databaseConnectTimeout: duration({
      default: 30_000,
      doc: "How long start-up keeps retrying an unreachable database before giving up.",
    }),
    otelEnabled: bool({ default: false, doc: "Export OpenTelemetry traces over OTLP/HTTP." }),
    otelEndpoint: url({
      default: "http://127.0.0.1:4318",
      schemes: ["http", "https"],
      doc: "OTLP/HTTP collector base URL; traces go to <endpoint>/v1/traces.",
    }),
    serviceToken: str({
      default: "",
      secret: true,
      doc: "Shared secret that internal callers present in x-kiln-service-token. Empty: read <data dir>/service-token, creating it (mode 0600) on first start.",
    }),
    shutdownTimeout: duration({
      default: 10_000,
      doc: "On SIGTERM/SIGINT, how long in-flight calls may run before connections are closed.",
    }),
  };
}

export function resolveDataDir(configured: string): string {
  if (configured !== "") return path.resolve(configured);
  if (process.getuid?.() === 0) return "/var/lib/kiln";
  return path.join(os.homedir(), ".kiln");
}
