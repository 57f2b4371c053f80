import http from "node:http";
import net from "node:net";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import { BuilderService, builderd } from "@kiln/api";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { requestContext, requireTenant } from "./auth/tenant.js";
import { NotFoundError } from "./errors.js";
import { defineService, type ServiceDefinition } from "./service.js";
import { createTestPostgres, startTestService, type TestService } from "./testing/index.js";
import { notImplemented } from "./unimplemented.js";

/** A gate a handler waits on, so tests can hold a call in flight. */
function gate() {
  let open!: () => void;
  const opened = new Promise<void>((r) => (open = r));
  return { open, opened };
}

let holdGetBuild: ReturnType<typeof gate> | undefined;
let enteredGetBuild: (() => void) | undefined;

/** A small service on builderd's contract whose handlers exercise the kit. */
const testService: ServiceDefinition = defineService({
  name: "builderd",
  summary: "kit test service",
  settings: {},
  peers: [],
  migrations: {},
  create() {
    return {
      routes(router) {
        router.service(BuilderService, {
          ...notImplemented(BuilderService, "test plan"),
          async getBuild(req, ctx) {
            const tenant = requireTenant(ctx);
            requestContext(ctx).log.info({ build_id: req.buildId }, "handler saw the call");
            if (holdGetBuild) {
              enteredGetBuild?.();
              await holdGetBuild.opened;
            }
            if (req.buildId === "missing") throw new NotFoundError(`build ${req.buildId} not found`);
            if (req.buildId === "boom") throw new Error("secret internal detail");
            return { build: { buildId: req.buildId, tenantId: tenant.tenantId } };
          },
          async *streamBuildLogs(req) {
            for (let i = 0; i < 3; i++) yield { entry: { message: `${req.buildId} line ${i}` } };
          },
        });
      },
    };
  },
});

function clients(svc: TestService) {
  const transports = {
    connectJson: createConnectTransport({ baseUrl: svc.baseUrl, httpVersion: "1.1" }),
    connectBinary: createConnectTransport({
      baseUrl: svc.baseUrl,
      httpVersion: "1.1",
      useBinaryFormat: true,
    }),
    grpcH2c: createGrpcTransport({ baseUrl: svc.baseUrl }),
    grpcWeb: createGrpcWebTransport({ baseUrl: svc.baseUrl, httpVersion: "1.1" }),
  };
  return Object.fromEntries(
    Object.entries(transports).map(([k, t]) => [k, createClient(BuilderService, t)]),
  ) as Record<keyof typeof transports, ReturnType<typeof createClient<typeof BuilderService>>>;
}

const as = (token: string, tenant?: string) => ({
  headers: { "x-kiln-service-token": token, ...(tenant ? { "x-kiln-tenant-id": tenant } : {}) },
});

describe("a kit service", () => {
  let svc: TestService;
  beforeAll(async () => {
    svc = await startTestService(testService);
  });
  afterAll(async () => {
    await svc.stop();
  });

  it.each(["connectJson", "connectBinary", "grpcH2c", "grpcWeb"] as const)(
    "answers over %s on one port, with the tenant from the internal headers",
    async (protocol) => {
      const res = await clients(svc)[protocol].getBuild({ buildId: "bld_1" }, as(svc.token, "acme"));
      expect(res.build?.buildId).toBe("bld_1");
      expect(res.build?.tenantId).toBe("acme");
    },
  );

  it("answers HTTP/2 calls without waiting for the client's delayed ACK (no Nagle)", async () => {
    // With Nagle on the server's sockets every h2c call took ≥ 40 ms (the client's delayed ACK
    // releasing the response's last frame); without it, about a millisecond here.
    const client = clients(svc).grpcH2c;
    await client.getBuild({ buildId: "warm" }, as(svc.token, "acme"));
    const took: number[] = [];
    for (let i = 0; i < 15; i++) {
      const t = performance.now();
      await client.getBuild({ buildId: `nagle_${i}` }, as(svc.token, "acme"));
      took.push(performance.now() - t);
    }
    took.sort((a, b) => a - b);
    expect(took[7]).toBeLessThan(20);
  });

  it("serves plain JSON for curl", async () => {
    const res = await fetch(`${svc.baseUrl}/kiln.builderd.v1.BuilderService/GetBuild`, {
      method: "POST",
      headers: {
        "content-type": "application/json",
        "x-kiln-service-token": svc.token,
        "x-kiln-tenant-id": "acme",
      },
      body: JSON.stringify({ buildId: "bld_2" }),
    });
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ build: { buildId: "bld_2", tenantId: "acme" } });
    expect(res.headers.get("x-request-id")).toMatch(/^[0-9a-f-]{36}$/);
  });

  it("streams server-streaming responses", async () => {
    const lines: string[] = [];
    for await (const m of clients(svc).connectBinary.streamBuildLogs(
      { buildId: "bld_3" },
      as(svc.token, "acme"),
    )) {
      lines.push(m.entry?.message ?? "");
    }
    expect(lines).toEqual(["bld_3 line 0", "bld_3 line 1", "bld_3 line 2"]);
  });

  it("answers unimplemented with a message saying where the behaviour comes from", async () => {
    const err = await clients(svc)
      .connectJson.createBuild(
        { config: { source: { sourceType: { case: "dockerImage", value: { imageUri: "alpine" } } } } },
        as(svc.token, "acme"),
      )
      .catch((e) => ConnectError.from(e));
    expect(err).toBeInstanceOf(ConnectError);
    expect((err as ConnectError).code).toBe(Code.Unimplemented);
    expect((err as ConnectError).rawMessage).toBe(
      "BuilderService.CreateBuild is not implemented yet (test plan)",
    );
  });

  describe("internal auth", () => {
    const call = (headers: Record<string, string>) =>
      clients(svc)
        .connectJson.getBuild({ buildId: "bld_1" }, { headers })
        .then(
          () => undefined,
          (e) => ConnectError.from(e),
        );

    it("refuses a tenant header from a caller without the service token", async () => {
      const err = await call({ "x-kiln-tenant-id": "acme" });
      expect(err?.code).toBe(Code.Unauthenticated);
      expect(err?.rawMessage).toMatch(
        /x-kiln-tenant-id is only accepted from internal callers presenting x-kiln-service-token/,
      );
    });

    it("refuses a wrong service token", async () => {
      const err = await call({ "x-kiln-service-token": "not-the-token", "x-kiln-tenant-id": "acme" });
      expect(err?.code).toBe(Code.Unauthenticated);
      expect(err?.rawMessage).toBe("invalid service token");
    });

    it("refuses calls with no credentials at all", async () => {
      expect((await call({}))?.code).toBe(Code.Unauthenticated);
    });

    it("refuses a tenant-scoped call from an internal caller that names no tenant", async () => {
      const err = await call({ "x-kiln-service-token": svc.token });
      expect(err?.code).toBe(Code.Unauthenticated);
      expect(err?.rawMessage).toMatch(/tenant-scoped/);
    });

    it("refuses malformed tenant ids and tiers", async () => {
      expect((await call({ "x-kiln-service-token": svc.token, "x-kiln-tenant-id": "../etc" }))?.code).toBe(
        Code.InvalidArgument,
      );
      const err = await call({
        "x-kiln-service-token": svc.token,
        "x-kiln-tenant-id": "acme",
        "x-kiln-tenant-tier": "gold",
      });
      expect(err?.rawMessage).toMatch(/x-kiln-tenant-tier: expected one of free, pro, enterprise, dedicated/);
    });
  });

  it("rejects an invalid request with invalid_argument naming the field, before the handler runs", async () => {
    const before = svc.logs.filter((l) => l.msg === "handler saw the call").length;
    const err = await clients(svc)
      .connectJson.getBuild({ buildId: "Not An Id" }, as(svc.token, "acme"))
      .catch((e) => ConnectError.from(e));
    expect((err as ConnectError).code).toBe(Code.InvalidArgument);
    expect((err as ConnectError).rawMessage).toMatch(
      /^invalid GetBuildRequest: build_id: "Not An Id" is not an id/,
    );
    expect(svc.logs.filter((l) => l.msg === "handler saw the call").length).toBe(before);
  });

  it("maps domain errors to their code and hides unexpected ones", async () => {
    const c = clients(svc).connectJson;
    const notFound = await c
      .getBuild({ buildId: "missing" }, as(svc.token, "acme"))
      .catch((e) => ConnectError.from(e));
    expect((notFound as ConnectError).code).toBe(Code.NotFound);
    expect((notFound as ConnectError).rawMessage).toBe("build missing not found");
    const boom = await c
      .getBuild({ buildId: "boom" }, as(svc.token, "acme"))
      .catch((e) => ConnectError.from(e));
    expect((boom as ConnectError).code).toBe(Code.Internal);
    expect((boom as ConnectError).rawMessage).not.toMatch(/secret/);
    // …but the log keeps the detail, with the request and tenant ids.
    const line = svc.logs.find((l) => l.msg === "rpc failed");
    expect(JSON.stringify(line)).toMatch(/secret internal detail/);
    expect(line).toMatchObject({ tenant_id: "acme", code: "internal", service: "builderd" });
    expect(line?.request_id).toBeTypeOf("string");
  });

  it("keeps a caller's request id and logs it with the tenant", async () => {
    const res = await fetch(`${svc.baseUrl}/kiln.builderd.v1.BuilderService/GetBuild`, {
      method: "POST",
      headers: {
        "content-type": "application/json",
        "x-kiln-service-token": svc.token,
        "x-kiln-tenant-id": "acme",
        "x-request-id": "req-abc-123",
      },
      body: JSON.stringify({ buildId: "bld_9" }),
    });
    expect(res.headers.get("x-request-id")).toBe("req-abc-123");
    const line = svc.logs.find((l) => l.msg === "handler saw the call" && l.build_id === "bld_9");
    expect(line).toMatchObject({
      request_id: "req-abc-123",
      tenant_id: "acme",
      rpc: "kiln.builderd.v1.BuilderService/GetBuild",
    });
  });

  it("serves /health, /health/ready and /metrics on the API port and the metrics port", async () => {
    const c = clients(svc).connectJson;
    await c.getBuild({ buildId: "bld_m" }, as(svc.token, "acme"));
    await c.getBuild({ buildId: "bld_m" }).catch(() => {});
    for (const port of [svc.service.api.port, svc.service.metricsEndpoint.port]) {
      const health = await fetch(`http://127.0.0.1:${port}/health`);
      expect(health.status).toBe(200);
      expect(await health.json()).toEqual({ status: "ok" });
      const ready = await fetch(`http://127.0.0.1:${port}/health/ready`);
      expect(ready.status).toBe(200);
      expect(await ready.json()).toMatchObject({ status: "ready", checks: { database: { ok: true } } });
      const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
      expect(metrics).toMatch(/builderd_rpc_requests_total\{method="GetBuild",code="ok"\} \d+/);
      expect(metrics).toMatch(/builderd_rpc_requests_total\{method="GetBuild",code="unauthenticated"\} \d+/);
      expect(metrics).toMatch(/kiln_process_resident_memory_bytes/);
    }
    const other = await fetch(
      `http://127.0.0.1:${svc.service.metricsEndpoint.port}/kiln.builderd.v1.BuilderService/GetBuild`,
    );
    expect(other.status).toBe(404);
  });
});

/** A TCP proxy in front of PostgreSQL that a test can cut and restore. */
async function cuttableProxy(target: { host: string; port: number }) {
  const sockets = new Set<net.Socket>();
  let server: net.Server | undefined;
  let port = 0;
  const up = () =>
    new Promise<void>((resolve) => {
      server = net.createServer((client) => {
        const upstream = net.connect(target.port, target.host);
        for (const s of [client, upstream]) {
          sockets.add(s);
          s.on("close", () => sockets.delete(s));
          s.on("error", () => {});
        }
        client.pipe(upstream).pipe(client);
      });
      server.listen(port, "127.0.0.1", () => {
        port = (server!.address() as net.AddressInfo).port;
        resolve();
      });
    });
  await up();
  return {
    get port() {
      return port;
    },
    async cut() {
      await new Promise<void>((resolve) => server!.close(() => resolve()));
      for (const s of sockets) s.destroy();
    },
    up,
  };
}

describe("readiness follows the database", () => {
  it("is not ready while PostgreSQL is unreachable and ready again once it is back", async () => {
    const pg = await createTestPostgres();
    const proxy = await cuttableProxy({ host: "127.0.0.1", port: 5432 });
    const url = new URL(pg.url);
    url.host = `127.0.0.1:${proxy.port}`;
    const svc = await startTestService(testService, { env: { UNKEY_BUILDERD_DATABASE_URL: url.toString() } });
    try {
      const ready = async () => {
        const res = await fetch(`${svc.baseUrl}/health/ready`);
        return {
          status: res.status,
          body: (await res.json()) as { checks: { database: { ok: boolean; error?: string } } },
        };
      };
      expect((await ready()).status).toBe(200);
      await proxy.cut();
      const down = await ready();
      expect(down.status).toBe(503);
      expect(down.body.checks.database.ok).toBe(false);
      expect(down.body.checks.database.error).toBeTruthy();
      // Liveness is unaffected: the process is fine, its dependency is not.
      expect((await fetch(`${svc.baseUrl}/health`)).status).toBe(200);
      await proxy.up();
      let back = await ready();
      for (let i = 0; i < 20 && back.status !== 200; i++) {
        await new Promise((r) => setTimeout(r, 100));
        back = await ready();
      }
      expect(back.status).toBe(200);
    } finally {
      await svc.stop();
      await proxy.cut();
      await pg.drop();
    }
  });
});

describe("graceful shutdown", () => {
  afterEach(() => {
    holdGetBuild = undefined;
    enteredGetBuild = undefined;
  });

  it("finishes a call in flight, refuses new connections, then stops", async () => {
    const svc = await startTestService(testService);
    holdGetBuild = gate();
    const entered = new Promise<void>((r) => (enteredGetBuild = r));
    const client = clients(svc).connectJson;
    const inFlight = client.getBuild({ buildId: "bld_slow" }, as(svc.token, "acme"));
    await entered;

    const stopped = svc.stop();
    // The listener is closed: a new connection is refused while the old call is still running.
    await new Promise((r) => setTimeout(r, 50));
    const refused = await new Promise<string>((resolve) => {
      const req = http.get(`${svc.baseUrl}/health`, () => resolve("answered"));
      req.on("error", (e: NodeJS.ErrnoException) => resolve(e.code ?? "error"));
    });
    expect(refused).toBe("ECONNREFUSED");

    holdGetBuild.open();
    const res = await inFlight;
    expect(res.build?.buildId).toBe("bld_slow");
    await stopped;
    expect(svc.logs.some((l) => l.msg === "builderd stopped")).toBe(true);
  });

  it("cancels calls still running at the deadline", async () => {
    const svc = await startTestService(testService, { env: { UNKEY_BUILDERD_SHUTDOWN_TIMEOUT: "200ms" } });
    holdGetBuild = gate(); // never opened
    const entered = new Promise<void>((r) => (enteredGetBuild = r));
    const inFlight = clients(svc)
      .connectJson.getBuild({ buildId: "bld_stuck" }, as(svc.token, "acme"))
      .catch((e) => ConnectError.from(e));
    await entered;
    const started = Date.now();
    await svc.stop();
    expect(Date.now() - started).toBeLessThan(5_000);
    expect(await inFlight).toBeInstanceOf(ConnectError);
    expect(svc.logs.some((l) => l.msg === "shutdown deadline reached, cancelling calls")).toBe(true);
  });
});

describe("start-up", () => {
  it("gives up on an unreachable database with a clear error", async () => {
    await expect(
      startTestService(testService, {
        env: {
          UNKEY_BUILDERD_DATABASE_URL: "postgres://postgres:hunter2@127.0.0.1:1/kiln",
          UNKEY_BUILDERD_DATABASE_CONNECT_TIMEOUT: "300ms",
        },
      }),
    ).rejects.toThrow(
      /cannot reach the database at postgres:\/\/postgres:\*\*\*@127.0.0.1:1\/kiln after \d+s: .*ECONNREFUSED/,
    );
  });

  it("refuses bad configuration before touching anything", async () => {
    await expect(startTestService(testService, { env: { UNKEY_BUILDERD_PORT: "eighty" } })).rejects.toThrow(
      /UNKEY_BUILDERD_PORT="eighty": expected a TCP port/,
    );
  });
});

describe("tracing", () => {
  it("exports a server span per call over OTLP/HTTP when enabled", async () => {
    const bodies: string[] = [];
    const collector = http.createServer((req, res) => {
      let body = "";
      req.on("data", (c) => (body += c));
      req.on("end", () => {
        if (req.url === "/v1/traces") bodies.push(body);
        res.writeHead(200, { "content-type": "application/json" }).end("{}");
      });
    });
    await new Promise<void>((r) => collector.listen(0, "127.0.0.1", r));
    const endpoint = `http://127.0.0.1:${(collector.address() as net.AddressInfo).port}`;
    const svc = await startTestService(testService, {
      env: { UNKEY_BUILDERD_OTEL_ENABLED: "true", UNKEY_BUILDERD_OTEL_ENDPOINT: endpoint },
    });
    try {
      await clients(svc).connectJson.getBuild({ buildId: "bld_traced" }, as(svc.token, "acme"));
    } finally {
      await svc.stop(); // flushes the exporter
      collector.close();
    }
    const all = bodies.join("\n");
    expect(all).toContain("kiln.builderd.v1.BuilderService/GetBuild");
    expect(all).toContain("acme");
  });
});

it("request messages are created from the generated schema", () => {
  // Guards the test service above against contract drift: GetBuild must stay unary.
  expect(create(builderd.GetBuildRequestSchema, { buildId: "x" }).buildId).toBe("x");
});
