import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { services as apiServices } from "@kiln/api";
import { migrateService, type RunningService } from "@kiln/kit";
import { createTestPostgres, tempDir } from "@kiln/kit/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startPlatform } from "./platform.js";
import { SERVICES } from "./services.js";

/** Ports 0: the OS picks free ones, so the suite can run beside a real `kiln up`. */
function freePortEnv(): Record<string, string> {
  const env: Record<string, string> = {};
  for (const def of SERVICES) {
    const p = `UNKEY_${def.name.toUpperCase()}_`;
    env[`${p}PORT`] = "0";
    env[`${p}METRICS_PORT`] = "0";
    env[`${p}LOG_LEVEL`] = "warn";
  }
  // Tests get their own VM router and network, apart from a real metald on this host.
  env.UNKEY_METALD_ROUTER_NAME = "kiln-test";
  env.UNKEY_METALD_NETWORK_CIDR = "10.214.0.0/16";
  return env;
}

describe("kiln up (all services in one process)", () => {
  const dir = tempDir();
  let running: RunningService[];
  let token: string;

  beforeAll(async () => {
    running = await startPlatform({ env: freePortEnv(), dataDir: dir.path });
    const fs = await import("node:fs");
    token = fs.readFileSync(`${dir.path}/service-token`, "utf8").trim();
  });
  afterAll(async () => {
    for (const s of [...running].reverse()) await s.stop();
    dir.remove();
  });

  it("starts all six services, each on its own port with /health", async () => {
    expect(running.map((s) => s.name).sort()).toEqual(
      ["assetmanagerd", "billaged", "billing", "builderd", "gatewayd", "metald"].sort(),
    );
    for (const s of running) {
      const res = await fetch(`http://127.0.0.1:${s.api.port}/health`);
      expect(res.status, s.name).toBe(200);
      const ready = await fetch(`http://127.0.0.1:${s.metricsEndpoint.port}/health/ready`);
      expect(ready.status, s.name).toBe(200);
    }
  });

  // Every RPC of every service, in JSON and in binary: not one is left unrouted or crashes.
  for (const format of ["json", "binary"] as const) {
    it(`answers every RPC of every service over Connect ${format}, never with an internal error`, async () => {
      for (const s of running) {
        const transport = createConnectTransport({
          baseUrl: `http://127.0.0.1:${s.api.port}`,
          httpVersion: "1.1",
          useBinaryFormat: format === "binary",
        });
        for (const desc of apiServices[s.name]) {
          const client = createClient(desc, transport) as unknown as Record<
            string,
            (...a: unknown[]) => unknown
          >;
          const headers = { "x-kiln-service-token": token, "x-kiln-tenant-id": "acme" };
          for (const method of desc.methods) {
            let err: ConnectError | undefined;
            try {
              if (method.methodKind === "unary") await client[method.localName]!({}, { headers });
              else if (method.methodKind === "server_streaming") {
                for await (const _ of client[method.localName]!({}, { headers }) as AsyncIterable<unknown>) {
                }
              } else {
                await client[method.localName]!((async function* () {})(), { headers });
              }
            } catch (e) {
              err = ConnectError.from(e);
            }
            // Empty requests succeed (lists), fail validation, find nothing, or reach a handler of a
            // later issue — but never crash.
            if (!err) continue;
            expect(
              [Code.Unimplemented, Code.InvalidArgument, Code.NotFound, Code.FailedPrecondition],
              `${desc.name}.${method.name}: ${err.message}`,
            ).toContain(err.code);
            if (err.code === Code.Unimplemented)
              expect(err.rawMessage).toMatch(/is not implemented yet \(.+\)/);
          }
        }
      }
    });
  }

  it("wires services to each other in-process, through the same interceptors", async () => {
    const builderd = running.find((s) => s.name === "builderd")!;
    const client = createClient(apiServices.builderd[0], builderd.transport);
    const err = await client
      .getBuild({ buildId: "bld_1" }, { headers: { "x-kiln-tenant-id": "acme" } })
      .catch((e) => ConnectError.from(e));
    // The in-process transport carries the service token, so auth passes and the handler answers.
    expect((err as ConnectError).code).toBe(Code.NotFound);
    expect((err as ConnectError).rawMessage).toBe("build bld_1 not found");
  });
});

describe("migrations of every service", () => {
  it.each(SERVICES.map((s) => s.name))(
    "%s migrates on SQLite and on PostgreSQL, idempotently",
    async (name) => {
      const def = SERVICES.find((s) => s.name === name)!;
      const dir = tempDir();
      const pg = await createTestPostgres();
      const prefix = `UNKEY_${name.toUpperCase()}_`;
      try {
        for (const env of [{ [`${prefix}DATA_DIR`]: dir.path }, { [`${prefix}DATABASE_URL`]: pg.url }]) {
          const first = await migrateService(def, { env });
          expect(first.applied.length).toBeGreaterThan(0);
          expect(first.applied).toEqual(Object.keys(def.migrations).sort());
          expect((await migrateService(def, { env })).applied).toEqual([]);
        }
      } finally {
        await pg.drop();
        dir.remove();
      }
    },
  );
});

describe("the kiln command", () => {
  const run = promisify(execFile);
  const kiln = (...args: string[]) =>
    run(
      process.execPath,
      [
        "--conditions=kiln-source",
        "--import",
        "tsx",
        new URL("./main.ts", import.meta.url).pathname,
        ...args,
      ],
      {
        env: { ...process.env, ...freePortEnv() },
      },
    );

  it("lists its commands in --help", async () => {
    const { stdout } = await kiln("--help");
    for (const cmd of ["up", "serve", "status", "migrate", "config"])
      expect(stdout).toMatch(new RegExp(`\\n  ${cmd}\\b`));
  });

  it("prints config as JSON with --json, secrets masked", async () => {
    const { stdout } = await kiln("config", "builderd", "--json");
    const rows = JSON.parse(stdout) as Array<{ name: string; value: string }>;
    expect(rows.find((r) => r.name === "UNKEY_BUILDERD_PORT")?.value).toBe("0");
    expect(rows.find((r) => r.name === "UNKEY_BUILDERD_ASSETMANAGERD_URL")?.value).toBe(
      "http://127.0.0.1:8083",
    );
  });

  it("stops with the variable's name on bad configuration", async () => {
    const err = await run(
      process.execPath,
      [
        "--conditions=kiln-source",
        "--import",
        "tsx",
        new URL("./main.ts", import.meta.url).pathname,
        "config",
      ],
      {
        env: { ...process.env, UNKEY_METALD_PORT: "nope" },
      },
    ).catch((e) => e as { code: number; stderr: string });
    expect(err).toMatchObject({ code: 2 });
    expect((err as { stderr: string }).stderr).toMatch(/UNKEY_METALD_PORT="nope": expected a TCP port/);
  });
});
