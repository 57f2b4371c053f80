import path from "node:path";
import {
  type ConnectRouter,
  createRouterTransport,
  type Interceptor,
  type Transport,
} from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { SERVICE_PORTS } from "@kiln/api";
import { ExponentialBackoff, handleAll, retry } from "cockatiel";
import type { DestinationStream } from "pino";
import { resolveServiceToken } from "./auth/service-token.js";
import { commonSettings, resolveDataDir } from "./config/common.js";
import { type ConfigOf, type ConfigSpec, loadConfig, url } from "./config/settings.js";
import type { Checkpointer } from "./db/checkpointer.js";
import { type Database, openDatabase } from "./db/database.js";
import { type Migrations, migrate } from "./db/migrate.js";
import { createLogger, type Logger } from "./log.js";
import { createMetrics, renderMetrics, type ServiceMetrics } from "./metrics.js";
import { checkReadiness, type ReadinessCheck } from "./server/health.js";
import { type HttpServer, listen, type RequestHandler } from "./server/http-server.js";
import { authInterceptor, type ExternalAuthenticator } from "./server/interceptors/auth.js";
import { errorInterceptor } from "./server/interceptors/errors.js";
import { observeInterceptor } from "./server/interceptors/observe.js";
import { validateInterceptor } from "./server/interceptors/validate.js";
import { startTracing, type Tracing } from "./tracing.js";
import { createPeerTransport, internalClientInterceptor } from "./transport.js";

export const SERVICE_NAMES = [
  "gatewayd",
  "builderd",
  "assetmanagerd",
  "metald",
  "billaged",
  "billing",
] as const;
export type ServiceName = (typeof SERVICE_NAMES)[number];

/** Seed API ports (the contract package's table); metrics ports are the API port + 1000. */
export const DEFAULT_PORTS: Readonly<Record<ServiceName, number>> = SERVICE_PORTS;

/** What a service's factory receives: everything it needs, nothing global. */
export interface ServiceDeps<C> {
  readonly name: ServiceName;
  readonly config: C & ConfigOf<ReturnType<typeof commonSettings>>;
  readonly dataDir: string;
  readonly log: Logger;
  readonly metrics: ServiceMetrics;
  readonly db: Database<unknown>;
  /** Transports to the services this one calls, with internal auth applied. */
  readonly peers: Readonly<Partial<Record<ServiceName, Transport>>>;
}

/** A constructed service: its RPC implementations plus optional lifecycle hooks. */
export interface ServiceInstance {
  routes(router: ConnectRouter): void;
  /** Extra readiness checks beyond the database and peers. */
  readiness?: ReadinessCheck[];
  /** Authenticates callers without the service token (gatewayd's API keys). */
  external?: ExternalAuthenticator;
  /** Starts background work (after the servers listen). */
  start?(): Promise<void>;
  /** Stops background work (after in-flight calls finished). */
  stop?(): Promise<void>;
}

export interface ServiceDefinition<S extends ConfigSpec = ConfigSpec> {
  readonly name: ServiceName;
  readonly summary: string;
  /** Service-specific settings, read from `UNKEY_<NAME>_*` next to the common ones. */
  readonly settings: S;
  /** Services this one calls; each gets a `<PEER>_URL` setting. */
  readonly peers: readonly ServiceName[];
  readonly migrations: Migrations;
  create(deps: ServiceDeps<ConfigOf<S>>): ServiceInstance | Promise<ServiceInstance>;
}

export function defineService<S extends ConfigSpec>(def: ServiceDefinition<S>): ServiceDefinition<S> {
  return def;
}

/** Every setting a service reads: common ones, one URL per peer, then its own. */
export function serviceSettings(def: ServiceDefinition) {
  const port = DEFAULT_PORTS[def.name];
  const peerUrls: ConfigSpec = {};
  for (const peer of def.peers) {
    peerUrls[`${peer}Url`] = url({
      default: `http://127.0.0.1:${DEFAULT_PORTS[peer]}`,
      schemes: ["http", "https"],
      doc: `Base URL of ${peer}, which ${def.name} calls.`,
    });
  }
  return { ...commonSettings({ port, metricsPort: port + 1000 }), ...peerUrls, ...def.settings };
}

export interface RunningService {
  readonly name: ServiceName;
  readonly api: { host: string; port: number };
  readonly metricsEndpoint: { host: string; port: number };
  readonly dataDir: string;
  readonly log: Logger;
  /** An in-process transport to this service, through the same interceptors as the network. */
  readonly transport: Transport;
  readiness(): Promise<import("./server/health.js").ReadinessReport>;
  /** Graceful stop; safe to call twice. */
  stop(): Promise<void>;
}

export interface StartOptions {
  env?: Record<string, string | undefined>;
  /** Peer transports to use instead of HTTP (kiln up wires services in-process). */
  peerTransport?: (peer: ServiceName) => Transport;
  /** Where log lines go (default stdout). */
  logDestination?: DestinationStream;
  /** The thread for SQLite checkpoints (default: the service's own; kiln up shares one). */
  checkpointer?: Checkpointer;
}

/**
 * Starts one service: config → logger → tracing → DB + migrations → service factory → API and
 * metrics servers. `kiln serve <name>`, the `<name>` bins and `kiln up` all come through here.
 */
export async function startService<S extends ConfigSpec>(
  def: ServiceDefinition<S>,
  opts: StartOptions = {},
): Promise<RunningService> {
  const spec = serviceSettings(def as ServiceDefinition);
  const config = loadConfig(def.name, spec, opts.env ?? process.env) as ServiceDeps<ConfigOf<S>>["config"];
  const dataDir = resolveDataDir(config.dataDir);
  const log = createLogger({ service: def.name, level: config.logLevel, destination: opts.logDestination });
  const cleanups: Array<() => Promise<void>> = [];
  const cleanup = async () => {
    for (const fn of cleanups.reverse()) await fn().catch((err) => log.error({ err }, "cleanup failed"));
    cleanups.length = 0;
  };

  try {
    let tracing: Tracing | undefined;
    if (config.otelEnabled) {
      tracing = startTracing({ serviceName: def.name, endpoint: config.otelEndpoint });
      cleanups.push(() => tracing!.shutdown());
    }
    const serviceToken = resolveServiceToken(config.serviceToken, dataDir);

    const db = openServiceDatabase(def.name, config, dataDir, log, opts.checkpointer);
    cleanups.push(() => db.close());
    await waitForDatabase(db, config.databaseConnectTimeout, log);
    const applied = await migrate(db.db, def.name, def.migrations);
    if (applied.length > 0) log.info({ migrations: applied, database: db.location }, "migrations applied");

    const metrics = createMetrics(def.name);
    const peers: Partial<Record<ServiceName, Transport>> = {};
    for (const peer of def.peers) {
      peers[peer] =
        opts.peerTransport?.(peer) ??
        createPeerTransport(String((config as Record<string, unknown>)[`${peer}Url`]), serviceToken);
    }

    const instance = await def.create({ name: def.name, config, dataDir, log, metrics, db, peers });
    cleanups.push(async () => instance.stop?.());

    const interceptors: Interceptor[] = [
      observeInterceptor({ service: def.name, log, metrics }),
      errorInterceptor(),
      authInterceptor({ serviceToken, external: instance.external }),
      validateInterceptor(),
    ];
    const shutdown = new AbortController();
    const rpcHandler = connectNodeAdapter({
      routes: instance.routes,
      interceptors,
      shutdownSignal: shutdown.signal,
    });
    const transport = createRouterTransport(instance.routes, {
      router: { interceptors },
      transport: { interceptors: [internalClientInterceptor(serviceToken)] },
    });

    const checks: ReadinessCheck[] = [
      { name: "database", check: () => db.ping() },
      ...def.peers.map((peer) => ({
        name: peer,
        check: () =>
          opts.peerTransport
            ? Promise.resolve()
            : probeHealth(String((config as Record<string, unknown>)[`${peer}Url`])),
      })),
      ...(instance.readiness ?? []),
    ];
    const readiness = () => checkReadiness(checks);
    const ops = opsHandler(metrics, readiness);

    const api = await listen({
      host: config.host,
      port: config.port,
      handler: (req, res) => {
        if (!ops(req, res)) rpcHandler(req as never, res as never);
      },
    });
    cleanups.push(() => api.close());
    const metricsServer: HttpServer = await listen({
      host: config.host,
      port: config.metricsPort,
      handler: (req, res) => {
        if (!ops(req, res)) {
          res.statusCode = 404;
          res.end("not found: this port serves /metrics, /health and /health/ready\n");
        }
      },
    });
    cleanups.push(() => metricsServer.close());

    await instance.start?.();
    log.info(
      {
        api: `${config.host}:${api.address.port}`,
        metrics: `${config.host}:${metricsServer.address.port}`,
        database: db.location,
        data_dir: dataDir,
      },
      `${def.name} listening`,
    );

    let stopping: Promise<void> | undefined;
    return {
      name: def.name,
      api: api.address,
      metricsEndpoint: metricsServer.address,
      dataDir,
      log,
      transport,
      readiness,
      stop() {
        stopping ??= (async () => {
          log.info({ in_flight: api.inFlight(), timeout_ms: config.shutdownTimeout }, `${def.name} stopping`);
          // Stop accepting; in-flight calls get until the deadline, then their signals abort
          // (so streams such as log tails end cleanly) and the remaining connections close.
          const drained = await api.drain(config.shutdownTimeout);
          if (!drained)
            log.warn({ in_flight: api.inFlight() }, "shutdown deadline reached, cancelling calls");
          shutdown.abort();
          await api.drain(Math.min(1_000, config.shutdownTimeout));
          await cleanup();
          log.info(`${def.name} stopped`);
        })();
        return stopping;
      },
    };
  } catch (err) {
    await cleanup();
    throw err;
  }
}

/**
 * Opens a service's database and applies its migrations without starting it (`kiln migrate`).
 * Returns the migrations applied now (empty when already current).
 */
export async function migrateService(
  def: ServiceDefinition,
  opts: { env?: Record<string, string | undefined>; log?: Logger } = {},
): Promise<{ location: string; applied: string[] }> {
  const config = loadConfig(def.name, serviceSettings(def), opts.env ?? process.env) as ConfigOf<
    ReturnType<typeof commonSettings>
  >;
  const dataDir = resolveDataDir(config.dataDir);
  const log = opts.log ?? createLogger({ service: def.name, level: config.logLevel });
  const db = openServiceDatabase(def.name, config, dataDir, log);
  try {
    await waitForDatabase(db, config.databaseConnectTimeout, log);
    return { location: db.location, applied: await migrate(db.db, def.name, def.migrations) };
  } finally {
    await db.close();
  }
}

function openServiceDatabase(
  name: ServiceName,
  config: { databaseUrl: string },
  dataDir: string,
  log: Logger,
  checkpointer?: Checkpointer,
) {
  return openDatabase<unknown>({
    url: config.databaseUrl,
    defaultSqlitePath: path.join(dataDir, "db", `${name}.sqlite`),
    onCheckpointError: (message) => log.warn({ err: message }, "SQLite WAL checkpoint failed"),
    checkpointer,
  });
}

async function waitForDatabase(db: Database<unknown>, timeoutMs: number, log: Logger): Promise<void> {
  const started = Date.now();
  const policy = retry(handleAll, {
    maxAttempts: Number.MAX_SAFE_INTEGER,
    backoff: new ExponentialBackoff({ initialDelay: 200, maxDelay: 5_000 }),
  });
  policy.onRetry(({ delay }) =>
    log.warn({ database: db.location, retry_in_ms: Math.round(delay) }, "database unreachable, retrying"),
  );
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  try {
    await policy.execute(() => db.ping(5_000), abort.signal);
  } catch (err) {
    const reason = err instanceof Error ? err.message : String(err);
    throw new Error(
      `cannot reach the database at ${db.location} after ${Math.round((Date.now() - started) / 1000)}s: ${reason}`,
      { cause: err },
    );
  } finally {
    clearTimeout(timer);
  }
}

async function probeHealth(baseUrl: string): Promise<void> {
  const res = await fetch(new URL("/health", baseUrl), { signal: AbortSignal.timeout(2_000) });
  if (!res.ok) throw new Error(`${baseUrl}/health answered ${res.status}`);
}

/** /health (liveness), /health/ready (readiness) and /metrics. Returns false for other paths. */
function opsHandler(
  metrics: ServiceMetrics,
  readiness: () => Promise<import("./server/health.js").ReadinessReport>,
) {
  return (req: Parameters<RequestHandler>[0], res: Parameters<RequestHandler>[1]): boolean => {
    const pathname = (req.url ?? "/").split("?")[0];
    if (req.method !== "GET" && req.method !== "HEAD") return false;
    const send = (status: number, type: string, body: string) => {
      res.writeHead(status, { "content-type": type, "cache-control": "no-store" });
      if (req.method === "HEAD") res.end();
      else res.end(body);
    };
    switch (pathname) {
      case "/health":
      case "/health/live":
        send(200, "application/json", `${JSON.stringify({ status: "ok" })}\n`);
        return true;
      case "/health/ready":
        readiness().then(
          (r) =>
            send(
              r.ready ? 200 : 503,
              "application/json",
              `${JSON.stringify({ status: r.ready ? "ready" : "not_ready", ...r })}\n`,
            ),
          (err) => send(500, "text/plain", String(err)),
        );
        return true;
      case "/metrics":
        renderMetrics(metrics).then(
          (m) => send(200, m.contentType, m.body),
          (err) => send(500, "text/plain", String(err)),
        );
        return true;
      default:
        return false;
    }
  };
}
