import { newId } from "@kiln/kit";
import { captureLogs } from "@kiln/kit/testing";
import pino from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createNetworkAttacher } from "./attach.js";
import { ip } from "./command.js";
import { listKilnResources } from "./leaks.js";
import { networkNamesOf } from "./names.js";
import { listNamespaces } from "./netns.js";
import { createNamespacePool, type NamespacePool } from "./netns-pool.js";
import { createTestNetwork, probeTcp, startTestServer, type TestNetwork } from "./testing.js";

describe("VM namespace pool", () => {
  let net: TestNetwork;
  const log = pino({ level: "warn" }, captureLogs().destination);

  beforeAll(async () => {
    net = await createTestNetwork();
  });
  afterAll(async () => {
    await net?.cleanup();
  });

  const pool = (size: number): NamespacePool =>
    createNamespacePool({
      db: net.testDb.db,
      router: net.router,
      netnsPrefix: net.netnsPrefix,
      size,
      refillDelayMs: 0,
      log,
    });
  const routerLinks = async () => (await net.router.interfaces()).filter((i) => i.startsWith("kv-"));
  const poolRows = async () =>
    (await net.testDb.db.selectFrom("netns_pool").select("short_id").execute()).map((r) => r.short_id).sort();
  const attacherWith = (namespaces: NamespacePool) =>
    createNetworkAttacher({ router: net.router, pool: net.pool, netnsPrefix: net.netnsPrefix, namespaces });
  /** No namespace, router link or pool row of this network is left. */
  async function expectNothingLeft(): Promise<void> {
    expect(await listNamespaces(net.netnsPrefix)).toEqual([]);
    expect(await routerLinks()).toEqual([]);
    expect(await poolRows()).toEqual([]);
  }
  async function refilled(p: NamespacePool, n: number): Promise<void> {
    for (let i = 0; i < 200 && p.idle().length < n; i++) await new Promise((r) => setTimeout(r, 10));
    await p.settled();
  }

  it("keeps namespaces ready; a VM id taken from it gets one that only needs configuring", async () => {
    const namespaces = pool(2);
    await namespaces.start(new Set());
    await refilled(namespaces, 2);
    const idle = namespaces.idle();
    expect(idle).toHaveLength(2);
    expect(await poolRows()).toEqual([...idle].sort());
    for (const short of idle) {
      const names = networkNamesOf(short, net.netnsPrefix);
      expect(await listNamespaces(net.netnsPrefix)).toContain(names.netns);
      expect(await routerLinks()).toContain(names.hostVeth);
      // No address yet, and no route to it: nothing reaches it until a VM's address is set.
      const links = JSON.parse(await ip(names.netns, ["-j", "-4", "addr", "show", "eth0"])) as Array<{
        addr_info?: unknown[];
      }>;
      expect(links.flatMap((l) => l.addr_info ?? [])).toEqual([]);
      expect(await ip(net.router.name, ["route", "show", "dev", names.hostVeth])).toBe("");
    }

    const attacher = attacherWith(namespaces);
    const vmId = attacher.newVmId();
    expect(vmId).toMatch(/^vm_[0-9a-z]{26}$/);
    const short = vmId.slice(-12);
    expect(idle).toContain(short);
    await net.testDb.addVm(vmId);
    const vmNet = await attacher.attach({ vmId, egressAllowed: false }, { mode: "address" });
    expect(vmNet.netnsName).toBe(`${net.netnsPrefix}${short}`);
    const server = await startTestServer(vmNet.netnsName, vmNet.guestIp, 8080, "pooled");
    try {
      expect(await probeTcp(undefined, vmNet.guestIp, 8080)).toEqual({ ok: true, data: "pooled\n" });
    } finally {
      await server.stop();
    }
    // The VM's row names its namespace now; the pool made another.
    await refilled(namespaces, 2);
    expect(namespaces.idle()).not.toContain(short);
    expect(await poolRows()).toEqual([...namespaces.idle()].sort());
    // Leak checks count the VM's namespace, not the pool's.
    const found = await listKilnResources({
      netnsPrefix: net.netnsPrefix,
      router: net.router,
      pooled: attacher.pooled,
    });
    expect(found.netns).toEqual([vmNet.netnsName]);
    expect(found.routerInterfaces).toEqual([vmNet.hostInterface]);

    await attacher.detach(vmId);
    await attacher.stop();
    await expectNothingLeft();
  });

  it("detaching a VM whose creation failed before wiring removes its pooled namespace", async () => {
    const namespaces = pool(1);
    const attacher = attacherWith(namespaces);
    await attacher.start([]);
    await refilled(namespaces, 1);
    const vmId = attacher.newVmId();
    await attacher.detach(vmId);
    await attacher.stop();
    await expectNothingLeft();
  });

  it("a new VM id without a ready namespace is an ordinary one", async () => {
    const attacher = attacherWith(pool(0));
    await attacher.start([]);
    const vmId = attacher.newVmId();
    await net.testDb.addVm(vmId);
    const vmNet = await attacher.attach({ vmId, egressAllowed: false }, { mode: "address" });
    expect(await listNamespaces(net.netnsPrefix)).toEqual([vmNet.netnsName]);
    await attacher.detach(vmId);
    await attacher.stop();
    expect(await listNamespaces(net.netnsPrefix)).toEqual([]);
  });

  it("after a crash, start removes what no VM took and keeps what one did", async () => {
    const crashed = pool(3);
    await crashed.start(new Set());
    await refilled(crashed, 3);
    // A VM took one, and metald died before the pool's row was dropped (nothing stopped).
    const taken = crashed.take()!;
    const vmId = newId("vm", taken);
    await net.testDb.addVm(vmId);
    await refilled(crashed, 3);
    expect(await poolRows()).toEqual([...crashed.idle(), taken].sort());

    const next = pool(1);
    await next.start(new Set([taken]));
    await refilled(next, 1);
    const left = await listNamespaces(net.netnsPrefix);
    expect(left.sort()).toEqual([`${net.netnsPrefix}${taken}`, `${net.netnsPrefix}${next.idle()[0]}`].sort());
    expect(await poolRows()).toEqual(next.idle());
    await next.stop();
    await ip(undefined, ["netns", "del", `${net.netnsPrefix}${taken}`]);
    await ip(net.router.name, ["link", "del", `kv-${taken}`]).catch(() => undefined);
    expect(await listNamespaces(net.netnsPrefix)).toEqual([]);
  });
});
