import { TIER_LIMITS } from "@kiln/kit";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import type { VmNetwork } from "./attach.js";
import { inNetns, ip } from "./command.js";
import { ALWAYS_BLOCKED, EGRESS_GROUP } from "./egress.js";
import {
  createTestInternet,
  createTestNetwork,
  probeTcp,
  startTestServer,
  type TestInternet,
  type TestNetwork,
  type TestServer,
} from "./testing.js";

describe("egress by tier", () => {
  let net: TestNetwork;
  let internet: TestInternet;
  let server: TestServer;
  const vms: string[] = [];

  beforeAll(async () => {
    net = await createTestNetwork();
    internet = await createTestInternet(net.router);
    // Listens on every address of the "internet": its public address and 169.254.169.254.
    server = await startTestServer(internet.netns, "0.0.0.0", 80, "internet");
  });
  afterEach(async () => {
    for (const vm of vms.splice(0)) await net.attacher.detach(vm);
  });
  afterAll(async () => {
    await server?.stop();
    await internet?.remove();
    await net?.cleanup();
  });

  async function vmOnTier(tier: "free" | "pro" | "enterprise"): Promise<VmNetwork> {
    const vmId = await net.testDb.addVm();
    vms.push(vmId);
    return net.attacher.attach({ vmId, egressAllowed: TIER_LIMITS[tier].egressAllowed }, { mode: "address" });
  }

  it("the internet and the metadata address answer when nothing filters (router itself)", async () => {
    // Sanity check for the tests below: both addresses are live, so a refusal is the policy's.
    expect(await probeTcp(net.router.name, internet.address, 80)).toEqual({ ok: true, data: "internet\n" });
    expect(await probeTcp(net.router.name, internet.metadataAddress, 80)).toEqual({
      ok: true,
      data: "internet\n",
    });
  });

  it("refuses a FREE VM's outbound connection; the server never sees it", async () => {
    const vm = await vmOnTier("free");
    const before = server.connections;
    expect(await probeTcp(vm.netnsName, internet.address, 80)).toEqual({ ok: false, code: "ECONNREFUSED" });
    expect(await server.settled()).toBe(before);
  });

  it("lets a PRO VM connect out, leaving with the router's address", async () => {
    const vm = await vmOnTier("pro");
    const before = server.connections;
    expect(await probeTcp(vm.netnsName, internet.address, 80)).toEqual({ ok: true, data: "internet\n" });
    expect(await server.settled(before + 1)).toBe(before + 1);
    expect(server.peers.at(-1)).toBe("198.51.100.1");
  });

  it.each(["free", "pro", "enterprise"] as const)("blocks 169.254.169.254 for a %s VM", async (tier) => {
    const vm = await vmOnTier(tier);
    const before = server.connections;
    expect(await probeTcp(vm.netnsName, internet.metadataAddress, 80)).toEqual({
      ok: false,
      code: "ECONNREFUSED",
    });
    expect(await server.settled()).toBe(before);
  });

  it("blocks the host's own addresses even for PRO", async () => {
    const vm = await vmOnTier("pro");
    // A host server on Kiln's own uplink address, reachable from the host itself.
    const host = await startTestServer(undefined, net.layout.uplink.host, 0, "host");
    try {
      expect(await probeTcp(undefined, net.layout.uplink.host, host.port)).toMatchObject({ ok: true });
      expect(await probeTcp(vm.netnsName, net.layout.uplink.host, host.port)).toEqual({
        ok: false,
        code: "ECONNREFUSED",
      });
      expect(await host.settled()).toBe(1);
    } finally {
      await host.stop();
    }
    // Every other host address is in the block list too.
    const hostAddrs = (
      JSON.parse(await ip(undefined, ["-j", "-4", "addr", "show"])) as Array<{
        addr_info: Array<{ local: string }>;
      }>
    )
      .flatMap((l) => l.addr_info.map((a) => a.local))
      .filter((a) => !net.layout.cidr.contains(a));
    expect(hostAddrs.length).toBeGreaterThan(0);
    for (const a of hostAddrs) expect(net.router.egress().blocked).toContain(`${a}/32`);
  });

  it("drops a PRO VM's traffic sent from an address that is not its own", async () => {
    const vm = await vmOnTier("pro");
    // Another VM's address (or any other) added inside the VM: the router's reverse-path
    // filter drops what it sends, so no reply ever comes.
    const spoofed = net.layout.cidr.at(net.layout.lastGuestOffset);
    await ip(vm.netnsName, ["addr", "add", `${spoofed}/32`, "dev", "eth0"]);
    const before = server.connections;
    expect(await probeTcp(vm.netnsName, internet.address, 80, 1000, spoofed)).toEqual({
      ok: false,
      code: "TIMEOUT",
    });
    expect(await server.settled()).toBe(before);
    expect(await probeTcp(vm.netnsName, internet.address, 80, 3000, vm.guestIp)).toMatchObject({ ok: true });
  });

  it("switches a VM's egress when its tier changes", async () => {
    const vm = await vmOnTier("free");
    const vmId = vms.at(-1)!;
    expect(await probeTcp(vm.netnsName, internet.address, 80)).toMatchObject({ ok: false });
    await net.attacher.setEgress(vmId, true);
    expect(await probeTcp(vm.netnsName, internet.address, 80)).toMatchObject({ ok: true });
    await net.attacher.setEgress(vmId, false);
    expect(await probeTcp(vm.netnsName, internet.address, 80)).toMatchObject({ ok: false });
  });

  it("keeps rules in the router's own namespace, one for all VMs, and reinstalling keeps VMs' egress", async () => {
    const vm = await vmOnTier("pro");
    await vmOnTier("free");
    const rules = await inNetns(net.router.name, "iptables", ["-S"]);
    for (const cidr of ALWAYS_BLOCKED) expect(rules).toContain(`-A KILN-BLOCK -d ${cidr} -p tcp -j REJECT`);
    expect(rules.split("\n").filter((r) => r.startsWith("-A KILN-ALLOW"))).toEqual([
      `-A KILN-ALLOW -m devgroup --src-group 0x${EGRESS_GROUP.toString(16)} -j ACCEPT`,
    ]);
    expect(await net.router.egress().allowedInterfaces()).toEqual([vm.hostInterface]);
    await net.router.ensure();
    expect(await net.router.egress().allowedInterfaces()).toEqual([vm.hostInterface]);
    expect(await probeTcp(vm.netnsName, internet.address, 80)).toMatchObject({ ok: true });
  });
});
