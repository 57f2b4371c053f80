/**
 * Test helpers shared by every package's tests (not part of the build): temporary data dirs,
 * throwaway PostgreSQL databases on the local server, captured logs, and services started on
 * free ports. Every helper cleans up after itself.
 */
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Writable } from "node:stream";
import pg from "pg";
import type { ConfigSpec } from "../config/settings.js";
import { type RunningService, type ServiceDefinition, type StartOptions, startService } from "../service.js";

export function tempDir(prefix = "kiln-test-"): { path: string; remove(): void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  return { path: dir, remove: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

/** The local PostgreSQL server the machines run (trust auth); override with KILN_TEST_POSTGRES_URL. */
export const TEST_POSTGRES_URL =
  process.env.KILN_TEST_POSTGRES_URL ?? "postgres://postgres@127.0.0.1:5432/postgres";

/** Creates a fresh database for one test file and drops it afterwards. */
export async function createTestPostgres(): Promise<{ url: string; drop(): Promise<void> }> {
  const name = `kiln_test_${randomBytes(6).toString("hex")}`;
  const admin = new pg.Client({ connectionString: TEST_POSTGRES_URL });
  await admin.connect();
  try {
    await admin.query(`CREATE DATABASE ${name}`);
  } finally {
    await admin.end();
  }
  const u = new URL(TEST_POSTGRES_URL);
  u.pathname = `/${name}`;
  return {
    url: u.toString(),
    async drop() {
      const c = new pg.Client({ connectionString: TEST_POSTGRES_URL });
      await c.connect();
      try {
        await c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      } finally {
        await c.end();
      }
    },
  };
}

/** A pino destination that keeps parsed log lines in memory. */
export function captureLogs(): { destination: Writable; lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const destination = new Writable({
    write(chunk, _enc, cb) {
      for (const line of String(chunk).split("\n")) if (line.trim()) lines.push(JSON.parse(line));
      cb();
    },
  });
  return { destination, lines };
}

export interface TestService {
  service: RunningService;
  dataDir: string;
  logs: Array<Record<string, unknown>>;
  token: string;
  baseUrl: string;
  stop(): Promise<void>;
}

/**
 * Starts a service on free ports with a temporary data dir (and SQLite, unless `env` sets a
 * database URL). `stop()` stops it and removes the directory.
 */
export async function startTestService<S extends ConfigSpec>(
  def: ServiceDefinition<S>,
  opts: { env?: Record<string, string>; peerTransport?: StartOptions["peerTransport"] } = {},
): Promise<TestService> {
  const dir = tempDir(`kiln-${def.name}-`);
  const prefix = `UNKEY_${def.name.toUpperCase()}_`;
  const env = {
    [`${prefix}PORT`]: "0",
    [`${prefix}METRICS_PORT`]: "0",
    [`${prefix}DATA_DIR`]: dir.path,
    [`${prefix}LOG_LEVEL`]: "debug",
    [`${prefix}SHUTDOWN_TIMEOUT`]: "2s",
    ...opts.env,
  };
  const logs = captureLogs();
  let service: RunningService;
  try {
    service = await startService(def, {
      env,
      logDestination: logs.destination,
      peerTransport: opts.peerTransport,
    });
  } catch (err) {
    dir.remove();
    throw err;
  }
  const token =
    env[`${prefix}SERVICE_TOKEN`] ??
    fs.readFileSync(path.join(service.dataDir, "service-token"), "utf8").trim();
  return {
    service,
    dataDir: service.dataDir,
    logs: logs.lines,
    token,
    baseUrl: `http://127.0.0.1:${service.api.port}`,
    async stop() {
      await service.stop();
      dir.remove();
    },
  };
}
