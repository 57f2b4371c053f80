import { randomBytes } from "node:crypto";
import fs from "node:fs/promises";
import { TIER_LIMITS } from "@kiln/kit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CONTROLLERS, cgroupLimits, createCgroupManager } from "../cgroups/cgroup.js";
import { createNetworkAttacher } from "./attach.js";
import { countResources, type LeakSources, listKilnResources } from "./leaks.js";
import { createAddressPool, createPortPool } from "./pool.js";
import { createPortForwarder } from "./port-forward.js";
import { createRouter } from "./router.js";
import {
  createTestNetwork,
  probeTcp,
  startTestServer,
  type TestNetwork,
  type TestServer,
} from "./testing.js";

describe("leak accounting over a VM's life and a metald crash", () => {
  let net: TestNetwork;
  let server: TestServer | undefined;
  const cgroupRoot = `kiln-test-${randomBytes(3).toString("hex")}`;

  beforeAll(async () => {
    net = await createTestNetwork();
  });
  afterAll(async () => {
    await server?.stop();
    const cgroups = createCgroupManager({ root: cgroupRoot });
    for (const e of await cgroups.list()) await cgroups.get(e.tenantId, e.vmId).remove();
    for (const c of CONTROLLERS) await fs.rmdir(`/sys/fs/cgroup/${c}/${cgroupRoot}`).catch(() => undefined);
    await net?.cleanup();
  });

  it("lists every per-VM object while the VM lives, finds them again after a crash, and none after delete", async () => {
    const portRange = { first: 30000 + Math.floor(Math.random() * 20000), last: 0 };
    portRange.last = portRange.first + 20;
    // The first metald process.
    const cgroups = createCgroupManager({ root: cgroupRoot });
    const ports = createPortPool({ db: net.testDb.db, range: portRange });
    const forwarder = createPortForwarder();
    const sources = (over: Partial<LeakSources> = {}): LeakSources => ({
      netnsPrefix: net.netnsPrefix,
      router: net.router,
      cgroups,
      forwarder,
      addressPool: net.pool,
      portPool: ports,
      ...over,
    });
    const empty = countResources(await listKilnResources(sources()));
    expect(empty).toBe(0);

    const vmId = await net.testDb.addVm(undefined, "acme");
    const vmNet = await net.attacher.attach(
      { vmId, egressAllowed: TIER_LIMITS.pro.egressAllowed },
      { mode: "address" },
    );
    const cg = await cgroups.create(
      "acme",
      vmId,
      cgroupLimits({ vcpus: 1, memoryBytes: 128 << 20 }, TIER_LIMITS.pro),
    );
    server = await startTestServer(vmNet.netnsName, vmNet.guestIp, 8080, "workload");
    await cg.add(server.pid);
    const port = await ports.allocate(vmId, { containerPort: 8080 });
    await forwarder.forward(vmId, { hostPort: port.hostPort, guestIp: vmNet.guestIp, containerPort: 8080 });
    expect(await probeTcp(undefined, "127.0.0.1", port.hostPort)).toEqual({ ok: true, data: "workload\n" });

    expect(await listKilnResources(sources())).toEqual({
      netns: [vmNet.netnsName],
      routerInterfaces: [vmNet.hostInterface],
      cgroups: [cg.relativePath],
      forwards: [`${vmId}:${port.hostPort}/tcp`],
      addresses: [`${vmId}=${vmNet.guestIp}`],
      ports: [`${vmId}=${port.hostPort}/tcp`],
    });

    // kill -9 of metald: its forwarders die with it; everything in the kernel and the DB stays.
    await forwarder.close();
    const router2 = createRouter({
      layout: net.layout,
      name: net.router.name,
      uplinkName: net.router.uplinkName,
      runDir: net.router.runDir,
    });
    await router2.ensure();
    const pool2 = createAddressPool({ db: net.testDb.db, cidr: net.layout.cidr.text });
    const ports2 = createPortPool({ db: net.testDb.db, range: portRange });
    const forwarder2 = createPortForwarder();
    const cgroups2 = createCgroupManager({ root: cgroupRoot });
    const attacher2 = createNetworkAttacher({ router: router2, pool: pool2, netnsPrefix: net.netnsPrefix });
    const after = () =>
      listKilnResources({
        netnsPrefix: net.netnsPrefix,
        router: router2,
        cgroups: cgroups2,
        forwarder: forwarder2,
        addressPool: pool2,
        portPool: ports2,
      });
    const found = await after();
    expect(found.forwards).toEqual([]);
    expect(countResources(found)).toBe(5);

    // Recovery re-adopts the running VM: attach again changes nothing, forwards come back.
    expect(await attacher2.attach({ vmId, egressAllowed: true }, { mode: "address" })).toEqual(vmNet);
    for (const p of await ports2.allocationsOf(vmId)) {
      await forwarder2.forward(vmId, {
        hostPort: p.hostPort,
        guestIp: vmNet.guestIp,
        containerPort: p.containerPort,
      });
    }
    expect(await probeTcp(undefined, "127.0.0.1", port.hostPort)).toEqual({ ok: true, data: "workload\n" });

    // DeleteVm: forwards, ports, cgroup (kills the workload), network.
    await forwarder2.stop(vmId);
    await ports2.release(vmId);
    await cgroups2.get("acme", vmId).remove();
    await attacher2.detach(vmId);
    expect(await after()).toEqual({
      netns: [],
      routerInterfaces: [],
      cgroups: [],
      forwards: [],
      addresses: [],
      ports: [],
    });
    expect(await probeTcp(undefined, "127.0.0.1", port.hostPort)).toEqual({
      ok: false,
      code: "ECONNREFUSED",
    });
  });
});
