import { randomBytes } from "node:crypto";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { ip } from "./command.js";
import { countResources, listKilnResources } from "./leaks.js";
import { addressLayout } from "./pool.js";
import { createRouter } from "./router.js";
import {
  createTestNetwork,
  probeTcp,
  startTestServer,
  type TestNetwork,
  type TestServer,
} from "./testing.js";

describe("VM network attach", () => {
  let net: TestNetwork;
  const servers: TestServer[] = [];
  const vms: string[] = [];

  beforeAll(async () => {
    net = await createTestNetwork();
  });
  afterEach(async () => {
    for (const s of servers.splice(0)) await s.stop();
    for (const vm of vms.splice(0)) await net.attacher.detach(vm);
  });
  afterAll(async () => {
    await net?.cleanup();
  });

  const resources = () =>
    listKilnResources({ netnsPrefix: net.netnsPrefix, router: net.router, addressPool: net.pool });

  async function newVm(): Promise<string> {
    const vmId = await net.testDb.addVm();
    vms.push(vmId);
    return vmId;
  }

  it("gives the VM a namespace whose server answers from the host at the guest address", async () => {
    const vmId = await newVm();
    const vmNet = await net.attacher.attach({ vmId, egressAllowed: false }, { mode: "address" });
    expect(vmNet).toMatchObject({
      netnsPath: `/var/run/netns/${vmNet.netnsName}`,
      prefixLen: 24,
      gateway: net.layout.gateway,
      mode: "address",
    });
    expect(net.layout.cidr.contains(vmNet.guestIp)).toBe(true);
    expect(vmNet.macAddress).toMatch(/^02(:[0-9a-f]{2}){5}$/);
    expect(vmNet.hostInterface.length).toBeLessThanOrEqual(15);
    expect(vmNet.tapName).toBeUndefined();

    const inside = await ip(vmNet.netnsName, ["-j", "addr", "show", "eth0"]);
    expect(inside).toContain(vmNet.guestIp);
    expect(inside).toContain(vmNet.macAddress);
    expect(await ip(vmNet.netnsName, ["route", "show", "default"])).toContain(`via ${net.layout.gateway}`);

    servers.push(await startTestServer(vmNet.netnsName, vmNet.guestIp, 8080, "hello from the vm"));
    expect(await probeTcp(undefined, vmNet.guestIp, 8080)).toEqual({ ok: true, data: "hello from the vm\n" });
  });

  it("re-attaching returns the same network and keeps a running workload reachable", async () => {
    const vmId = await newVm();
    const first = await net.attacher.attach({ vmId, egressAllowed: false }, { mode: "address" });
    servers.push(await startTestServer(first.netnsName, first.guestIp, 8080, "still here"));
    const again = await net.attacher.attach({ vmId, egressAllowed: false }, { mode: "address" });
    expect(again).toEqual(first);
    expect(await probeTcp(undefined, first.guestIp, 8080)).toEqual({ ok: true, data: "still here\n" });
  });

  it("re-attaching repairs a namespace that lost its link to the router, in both modes", async () => {
    for (const mode of ["address", "tap"] as const) {
      const vmId = await newVm();
      const first = await net.attacher.attach({ vmId, egressAllowed: true }, { mode });
      // As if a crash (or an operator) removed the VM's veth pair: both ends go together.
      await ip(net.router.name, ["link", "del", first.hostInterface]);
      const again = await net.attacher.attach({ vmId, egressAllowed: true }, { mode });
      expect(again).toEqual(first);
      if (mode === "tap") {
        await ip(first.netnsName, ["addr", "add", `${first.guestIp}/${first.prefixLen}`, "dev", "br0"]);
        expect(await ip(first.netnsName, ["-j", "link", "show", "eth0"])).toContain('"master":"br0"');
      }
      servers.push(await startTestServer(first.netnsName, first.guestIp, 8080, mode));
      expect(await probeTcp(undefined, first.guestIp, 8080)).toEqual({ ok: true, data: `${mode}\n` });
      expect(await net.router.egress().allowedInterfaces()).toContain(first.hostInterface);
    }
  });

  it("gives two VMs different addresses and keeps them from reaching each other", async () => {
    const a = await net.attacher.attach({ vmId: await newVm(), egressAllowed: true }, { mode: "address" });
    const b = await net.attacher.attach({ vmId: await newVm(), egressAllowed: true }, { mode: "address" });
    expect(a.guestIp).not.toBe(b.guestIp);
    expect(a.netnsName).not.toBe(b.netnsName);
    const server = await startTestServer(b.netnsName, b.guestIp, 8080, "b");
    servers.push(server);
    expect(await probeTcp(undefined, b.guestIp, 8080)).toMatchObject({ ok: true });
    expect(await probeTcp(a.netnsName, b.guestIp, 8080)).toEqual({ ok: false, code: "ECONNREFUSED" });
    expect(await server.settled()).toBe(1);
  });

  it("in tap mode bridges a tap device to the router without an address in the namespace", async () => {
    const vmId = await newVm();
    const vmNet = await net.attacher.attach({ vmId, egressAllowed: false }, { mode: "tap" });
    expect(vmNet.tapName).toBe("tap0");
    const links = JSON.parse(await ip(vmNet.netnsName, ["-j", "addr", "show"])) as Array<{
      ifname: string;
      master?: string;
      addr_info: Array<{ family: string; local: string }>;
    }>;
    const byName = new Map(links.map((l) => [l.ifname, l]));
    expect(byName.get("tap0")?.master).toBe("br0");
    expect(byName.get("eth0")?.master).toBe("br0");
    expect(
      links.flatMap((l) => l.addr_info.filter((a) => a.family === "inet" && a.local !== "127.0.0.1")),
    ).toEqual([]);

    // Stand in for the guest: its address on the bridge, answering through the same layer-2 path.
    await ip(vmNet.netnsName, ["addr", "add", `${vmNet.guestIp}/${vmNet.prefixLen}`, "dev", "br0"]);
    servers.push(await startTestServer(vmNet.netnsName, vmNet.guestIp, 8080, "guest"));
    expect(await probeTcp(undefined, vmNet.guestIp, 8080)).toEqual({ ok: true, data: "guest\n" });
  });

  it("refuses a VM network that overlaps one the host already routes", async () => {
    const other = createRouter({
      layout: addressLayout(net.layout.cidr.text),
      name: `ktr-${randomBytes(3).toString("hex")}`,
      uplinkName: `ktu-${randomBytes(3).toString("hex")}`,
      runDir: `/run/kiln-test-${randomBytes(3).toString("hex")}`,
    });
    try {
      await expect(other.ensure()).rejects.toThrow(
        new RegExp(
          `VM network ${net.layout.cidr.text.replace(/\./g, "\\.")} overlaps .* already routes via ${net.router.uplinkName}`,
        ),
      );
      expect(await other.exists()).toBe(false);
    } finally {
      await other.destroy();
    }
  });

  it("detach removes namespace, interfaces (with their egress) and address, and is idempotent", async () => {
    const before = countResources(await resources());
    const vmId = await newVm();
    const vmNet = await net.attacher.attach({ vmId, egressAllowed: true }, { mode: "address" });
    const during = await resources();
    expect(during.netns).toContain(vmNet.netnsName);
    expect(during.routerInterfaces).toContain(vmNet.hostInterface);
    expect(await net.router.egress().allowedInterfaces()).toContain(vmNet.hostInterface);
    expect(during.addresses).toContain(`${vmId}=${vmNet.guestIp}`);
    expect(countResources(during)).toBe(before + 3);

    await net.attacher.detach(vmId);
    await net.attacher.detach(vmId);
    vms.splice(vms.indexOf(vmId), 1);
    expect(countResources(await resources())).toBe(before);
    expect(await probeTcp(undefined, vmNet.guestIp, 8080, 1000)).toMatchObject({ ok: false });
  });
});
