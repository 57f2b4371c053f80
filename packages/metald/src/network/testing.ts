/**
 * Fixtures for tests that need real kernel networking (not part of the service): a router with
 * names and a /24 of its own (so test files and a running metald never collide), a SQLite state
 * DB with metald's migrations, processes started inside namespaces, and an "internet" namespace
 * hanging off the router. Everything is removed by cleanup(), processes by pid; nothing leaves
 * the machine.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import path from "node:path";
import { type Database, migrate, openDatabase } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import type { Kysely } from "kysely";
import { migrations } from "../migrations.js";
import { createNetworkAttacher, type NetworkAttacher } from "./attach.js";
import { overlaps, parseCidr } from "./cidr.js";
import { GONE, ip, netnsPath } from "./command.js";
import { listNamespaces } from "./netns.js";
import type { NamespacePoolTables } from "./netns-pool.js";
import {
  type AddressLayout,
  type AddressPool,
  addressLayout,
  createAddressPool,
  type NetworkTables,
} from "./pool.js";
import { createRouter, type Router } from "./router.js";

interface VmsTable {
  vms: {
    vm_id: string;
    tenant_id: string;
    state: string;
    backend: string;
    config_json: string;
    created_at: number;
    updated_at: number;
  };
}

export type TestSchema = NetworkTables & NamespacePoolTables & VmsTable;

export interface TestDb {
  database: Database<TestSchema>;
  db: Kysely<TestSchema>;
  /** Inserts a VM row (allocations reference vms.vm_id) and returns its id. */
  addVm(vmId?: string, tenantId?: string): Promise<string>;
  close(): Promise<void>;
}

/** metald's migrations on a fresh database: SQLite in a temp dir, or the given PostgreSQL URL. */
export async function openTestDb(postgresUrl?: string): Promise<TestDb> {
  const dir = tempDir("kiln-metald-net-");
  const database = openDatabase<TestSchema>({
    url: postgresUrl ?? "",
    defaultSqlitePath: path.join(dir.path, "metald.sqlite"),
  });
  await migrate(database.db as Kysely<unknown>, "metald", migrations);
  let n = 0;
  return {
    database,
    db: database.db,
    async addVm(
      vmId = `vm_test${(n++).toString().padStart(3, "0")}${randomBytes(4).toString("hex")}`,
      tenantId = "acme",
    ) {
      const now = Date.now();
      await database.db
        .insertInto("vms")
        .values({
          vm_id: vmId,
          tenant_id: tenantId,
          state: "CREATED",
          backend: "runc",
          config_json: "{}",
          created_at: now,
          updated_at: now,
        })
        .execute();
      return vmId;
    },
    async close() {
      await database.close();
      dir.remove();
    },
  };
}

export interface TestNetwork {
  router: Router;
  layout: AddressLayout;
  netnsPrefix: string;
  pool: AddressPool;
  attacher: NetworkAttacher;
  testDb: TestDb;
  cleanup(): Promise<void>;
}

/**
 * A /24 in 10.200.0.0–10.249.255.0 that overlaps no host route (prefix-aware: the platform
 * tests' router routes all of 10.214.0.0/16).
 */
export async function freeTestCidr(): Promise<string> {
  const routes = JSON.parse(await ip(undefined, ["-j", "route", "show", "table", "all"])) as Array<{
    dst?: string;
  }>;
  const used = routes
    .map((r) => r.dst)
    .filter((d): d is string => !!d && /^\d+\.\d+\.\d+\.\d+(\/\d+)?$/.test(d))
    .map((d) => parseCidr(d.includes("/") ? d : `${d}/32`, "host route", { anyLength: true }));
  for (;;) {
    const b = 200 + (randomBytes(1)[0]! % 50);
    const c = randomBytes(1)[0]!;
    const candidate = parseCidr(`10.${b}.${c}.0/24`, "test network", { anyLength: true });
    if (!used.some((u) => overlaps(u, candidate))) return candidate.text;
  }
}

/** A router on its own /24 with unique names, a DB, an address pool and an attacher. */
export async function createTestNetwork(opts: { cidr?: string } = {}): Promise<TestNetwork> {
  const tag = randomBytes(3).toString("hex");
  const layout = addressLayout(opts.cidr ?? (await freeTestCidr()));
  const router = createRouter({
    layout,
    name: `ktr-${tag}`,
    uplinkName: `ktu-${tag}`,
    runDir: `/run/kiln-test-${tag}`,
  });
  const testDb = await openTestDb();
  const netnsPrefix = `ktv-${tag}-`;
  const pool = createAddressPool({ db: testDb.db, cidr: layout.cidr.text });
  try {
    await router.ensure();
  } catch (err) {
    await router.destroy().catch(() => undefined);
    await testDb.close();
    throw err;
  }
  return {
    router,
    layout,
    netnsPrefix,
    pool,
    attacher: createNetworkAttacher({ router, pool, netnsPrefix }),
    testDb,
    async cleanup() {
      // VM namespaces first (their veths die with them), then the router.
      for (const ns of await listNamespaces(netnsPrefix)) {
        await ip(undefined, ["netns", "del", ns], { tolerate: GONE });
      }
      await router.destroy();
      await testDb.close();
    },
  };
}

const running = new Set<ChildProcess>();
process.once("exit", () => {
  for (const child of running) child.kill("SIGKILL");
});

/** Runs `node -e script` inside a named network namespace (nsenter execs, so the pid is node's). */
export function nodeInNetns(netns: string | undefined, script: string, args: string[] = []): ChildProcess {
  const cmd = netns
    ? spawn("nsenter", [`--net=${netnsPath(netns)}`, "--", process.execPath, "-e", script, "--", ...args], {
        stdio: ["ignore", "pipe", "pipe"],
      })
    : spawn(process.execPath, ["-e", script, "--", ...args], { stdio: ["ignore", "pipe", "pipe"] });
  running.add(cmd);
  cmd.once("exit", () => running.delete(cmd));
  return cmd;
}

export interface TestServer {
  pid: number;
  /** The port listened on (useful with port 0). */
  port: number;
  /** Connections accepted so far. */
  readonly connections: number;
  /** Remote address of each connection, in order. */
  readonly peers: string[];
  /**
   * The connection count once the server's output has caught up: as soon as it reaches
   * `atLeast`, or after `timeoutMs` (default 150 ms when no count is expected).
   */
  settled(atLeast?: number, timeoutMs?: number): Promise<number>;
  stop(): Promise<void>;
}

const SERVER = `
const net = require("node:net");
const [host, port, reply] = process.argv.slice(-3);
const srv = net.createServer((s) => { process.stdout.write("conn " + s.remoteAddress + "\\n"); s.on("error", () => {}); s.end(reply + "\\n"); });
srv.listen(Number(port), host, () => process.stdout.write("ready " + srv.address().port + "\\n"));
`;

/** A TCP server in a namespace (or on the host) that answers every connection with `reply`. */
export async function startTestServer(
  netns: string | undefined,
  host: string,
  port: number,
  reply: string,
): Promise<TestServer> {
  const child = nodeInNetns(netns, SERVER, [host, String(port), reply]);
  const peers: string[] = [];
  let listening = 0;
  let stderr = "";
  child.stderr?.on("data", (d) => {
    stderr += d;
  });
  let pending = "";
  await new Promise<void>((resolve, reject) => {
    child.stdout?.on("data", (d: Buffer) => {
      const lines = (pending + d.toString()).split("\n");
      pending = lines.pop() ?? "";
      for (const line of lines) {
        if (line.startsWith("ready ")) {
          listening = Number(line.slice(6));
          resolve();
        }
        if (line.startsWith("conn ")) peers.push(line.slice(5));
      }
    });
    child.once("exit", (code) =>
      reject(new Error(`test server in ${netns ?? "host"} exited (${code}): ${stderr}`)),
    );
  });
  return {
    pid: child.pid!,
    port: listening,
    peers,
    get connections() {
      return peers.length;
    },
    async settled(atLeast, timeoutMs = atLeast === undefined ? 150 : 3000) {
      const deadline = Date.now() + timeoutMs;
      while (Date.now() < deadline && (atLeast === undefined || peers.length < atLeast)) {
        await new Promise((r) => setTimeout(r, 10));
      }
      return peers.length;
    },
    stop: () => killAndWait(child),
  };
}

export type ProbeResult = { ok: true; data: string } | { ok: false; code: string };

const CLIENT = `
const net = require("node:net");
const [host, port, timeout, localAddress] = process.argv.slice(-4);
const s = net.connect({ host, port: Number(port), ...(localAddress ? { localAddress } : {}) });
let data = "";
const done = (r) => { process.stdout.write(JSON.stringify(r)); process.exit(0); };
s.setTimeout(Number(timeout), () => done({ ok: false, code: "TIMEOUT" }));
s.on("data", (d) => { data += d; });
s.on("end", () => done({ ok: true, data }));
s.on("error", (e) => done({ ok: false, code: e.code || e.message }));
`;

/** Connects to host:port from inside a namespace (or the host) and reads until the server closes. */
export async function probeTcp(
  netns: string | undefined,
  host: string,
  port: number,
  timeoutMs = 3000,
  localAddress = "",
): Promise<ProbeResult> {
  const child = nodeInNetns(netns, CLIENT, [host, String(port), String(timeoutMs), localAddress]);
  let out = "";
  let err = "";
  child.stdout?.on("data", (d) => {
    out += d;
  });
  child.stderr?.on("data", (d) => {
    err += d;
  });
  await new Promise((resolve) => child.once("exit", resolve));
  if (!out) throw new Error(`probe from ${netns ?? "host"} to ${host}:${port} printed nothing: ${err}`);
  return JSON.parse(out) as ProbeResult;
}

async function killAndWait(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once("exit", resolve));
  child.kill("SIGKILL");
  await exited;
}

export interface TestInternet {
  netns: string;
  /** An "internet" address routed through the router's extra interface. */
  address: string;
  /** 169.254.169.254, also answering inside the internet namespace. */
  metadataAddress: string;
  remove(): Promise<void>;
}

/**
 * A namespace playing "the internet": linked to the router by its own veth (198.51.100.0/24,
 * TEST-NET-2) and also holding 169.254.169.254, with router routes to both — so a VM's egress
 * can be allowed or refused without any packet leaving the machine.
 */
export async function createTestInternet(router: Router): Promise<TestInternet> {
  const netns = `ktinet-${randomBytes(3).toString("hex")}`;
  const address = "198.51.100.10";
  const metadataAddress = "169.254.169.254";
  await ip(undefined, ["netns", "add", netns]);
  try {
    await ip(netns, ["link", "set", "lo", "up"]);
    await ip(router.name, ["link", "add", "inet0", "type", "veth", "peer", "name", "eth0", "netns", netns]);
    await ip(router.name, ["addr", "add", "198.51.100.1/24", "dev", "inet0"]);
    await ip(router.name, ["link", "set", "inet0", "up"]);
    await ip(netns, ["addr", "add", `${address}/24`, "dev", "eth0"]);
    await ip(netns, ["addr", "add", `${metadataAddress}/32`, "dev", "lo"]);
    await ip(netns, ["link", "set", "eth0", "up"]);
    await ip(router.name, ["route", "add", `${metadataAddress}/32`, "via", address, "dev", "inet0"]);
  } catch (err) {
    await ip(undefined, ["netns", "del", netns], { tolerate: GONE });
    throw err;
  }
  return {
    netns,
    address,
    metadataAddress,
    async remove() {
      await ip(router.name, ["link", "del", "inet0"], { tolerate: GONE });
      await ip(undefined, ["netns", "del", netns], { tolerate: GONE });
    },
  };
}
