import net from "node:net";
import { AlreadyExistsError, FailedPreconditionError, ResourceExhaustedError } from "@kiln/kit";
import { createTestPostgres } from "@kiln/kit/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { addressLayout, createAddressPool, createPortPool, parsePortRange, portIsFree } from "./pool.js";
import { openTestDb, type TestDb } from "./testing.js";

describe("addressLayout", () => {
  it("reserves the gateway and the host link, and hands out the rest", () => {
    const l = addressLayout("10.213.7.9/16");
    expect(l.cidr.text).toBe("10.213.0.0/16");
    expect(l.gateway).toBe("10.213.0.1");
    expect(l.uplink).toEqual({ host: "10.213.255.253", router: "10.213.255.254", prefixLen: 30 });
    expect(l.cidr.at(l.firstGuestOffset)).toBe("10.213.0.2");
    expect(l.cidr.at(l.lastGuestOffset)).toBe("10.213.255.251");
  });

  it("refuses CIDRs that are not IPv4 or too small, naming the setting", () => {
    expect(() => addressLayout("10.0.0.0")).toThrow(/VM network CIDR "10.0.0.0" is not an IPv4 CIDR/);
    expect(() => addressLayout("10.0.0.0/30")).toThrow(/between \/8 and \/29/);
    expect(() => addressLayout("300.1.1.1/16")).toThrow(/not an IPv4 CIDR/);
  });
});

const dialects = [
  { name: "sqlite", open: async () => ({ testDb: await openTestDb(), drop: async () => {} }) },
  {
    name: "postgres",
    open: async () => {
      const pg = await createTestPostgres();
      return { testDb: await openTestDb(pg.url), drop: () => pg.drop() };
    },
  },
];

describe.each(dialects)("pools on $name", ({ open }) => {
  let testDb: TestDb;
  let drop: () => Promise<void>;

  beforeAll(async () => {
    ({ testDb, drop } = await open());
  });
  afterAll(async () => {
    await testDb?.close();
    await drop?.();
  });

  it("never hands one address to two VMs under concurrent allocation", async () => {
    // A /27 has 26 guest addresses (32 minus network, gateway and the host link's /30);
    // 3 pool objects race for them with 30 VMs.
    const cidr = "10.77.1.0/27";
    const pools = [0, 1, 2].map(() => createAddressPool({ db: testDb.db, cidr }));
    const vms = await Promise.all(Array.from({ length: 30 }, () => testDb.addVm()));
    try {
      const results = await Promise.allSettled(vms.map((vm, i) => pools[i % 3]!.allocate(vm)));
      const granted = results.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
      const refused = results.flatMap((r) => (r.status === "rejected" ? [r.reason] : []));
      expect(granted).toHaveLength(26);
      expect(new Set(granted).size).toBe(26);
      expect(refused).toHaveLength(4);
      for (const err of refused) expect(err).toBeInstanceOf(ResourceExhaustedError);
      const layout = pools[0]!.layout;
      const reserved = [layout.gateway, layout.uplink.host, layout.uplink.router, "10.77.1.0", "10.77.1.31"];
      for (const ip of granted) {
        expect(layout.cidr.contains(ip)).toBe(true);
        expect(reserved).not.toContain(ip);
      }
      expect((await pools[1]!.allocations()).map((a) => a.ipAddress).sort()).toEqual([...granted].sort());
    } finally {
      for (const vm of vms) await pools[0]!.release(vm);
    }
  });

  it("returns a VM's existing address when asked again, concurrently too", async () => {
    const pool = createAddressPool({ db: testDb.db, cidr: "10.77.2.0/24" });
    const vm = await testDb.addVm();
    const all = await Promise.all([pool.allocate(vm), pool.allocate(vm), pool.allocate(vm)]);
    expect(new Set(all).size).toBe(1);
    expect((await pool.allocations()).filter((a) => a.vmId === vm)).toHaveLength(1);
    await pool.release(vm);
  });

  it("releases addresses for reuse, and keeps allocations across a new pool object", async () => {
    const cidr = "10.77.3.0/29"; // two guest addresses
    const pool = createAddressPool({ db: testDb.db, cidr });
    const [a, b, c] = [await testDb.addVm(), await testDb.addVm(), await testDb.addVm()];
    const ipA = await pool.allocate(a);
    const ipB = await pool.allocate(b);
    await expect(pool.allocate(c)).rejects.toThrow(/no free VM address left in 10.77.3.0\/29/);

    // A restarted metald: a new pool object over the same database.
    const restarted = createAddressPool({ db: testDb.db, cidr });
    expect(await restarted.addressOf(a)).toBe(ipA);
    expect(await restarted.allocate(b)).toBe(ipB);
    await restarted.release(a);
    await restarted.release(a); // idempotent
    expect(await restarted.allocate(c)).toBe(ipA);
    await restarted.release(b);
    await restarted.release(c);
    expect(await restarted.allocations()).toEqual([]);
  });

  it("allocates distinct host ports concurrently, skipping ports in use on the host", async () => {
    const first = 40000 + Math.floor(Math.random() * 10000);
    const busy = new Set([first + 1]);
    const range = { first, last: first + 10 }; // 11 ports, one of them busy
    const pools = [0, 1].map(() =>
      createPortPool({ db: testDb.db, range, isFree: async (port) => !busy.has(port) }),
    );
    const vms = await Promise.all(Array.from({ length: 5 }, () => testDb.addVm()));
    const allocs = await Promise.all(
      vms.flatMap((vm, i) => [
        pools[i % 2]!.allocate(vm, { containerPort: 80 }),
        pools[(i + 1) % 2]!.allocate(vm, { containerPort: 443, protocol: "tcp" }),
      ]),
    );
    const hostPorts = allocs.map((a) => a.hostPort);
    expect(new Set(hostPorts).size).toBe(10);
    expect(hostPorts).not.toContain(first + 1);
    for (const p of hostPorts) expect(p >= range.first && p <= range.last).toBe(true);

    const extra = await testDb.addVm();
    await expect(pools[0]!.allocate(extra, { containerPort: 80 })).rejects.toBeInstanceOf(
      ResourceExhaustedError,
    );

    // Asking again for the same VM port returns its allocation; a new pool object sees them all.
    expect(await pools[1]!.allocate(vms[0]!, { containerPort: 80 })).toMatchObject({
      hostPort: allocs[0]!.hostPort,
      containerPort: 80,
      protocol: "tcp",
    });
    const restarted = createPortPool({ db: testDb.db, range, isFree: async (port) => !busy.has(port) });
    expect((await restarted.allocationsOf(vms[0]!)).map((a) => a.containerPort).sort()).toEqual([443, 80]);

    await restarted.release(vms[0]!);
    expect(await restarted.allocationsOf(vms[0]!)).toEqual([]);
    const reused = await restarted.allocate(extra, { containerPort: 80 });
    expect([allocs[0]!.hostPort, allocs[1]!.hostPort]).toContain(reused.hostPort);
    for (const vm of [...vms, extra]) await restarted.release(vm);
    expect(await restarted.allocations()).toEqual([]);
  });

  it("honours a requested host port, and refuses one held by a VM or by another process", async () => {
    const first = 40000 + Math.floor(Math.random() * 10000);
    const busy = new Set([first + 5]);
    const pool = createPortPool({
      db: testDb.db,
      range: { first, last: first + 3 },
      isFree: async (p) => !busy.has(p),
    });
    const [a, b] = [await testDb.addVm(), await testDb.addVm()];
    // Outside the automatic range is fine when asked for explicitly.
    expect(await pool.allocate(a, { containerPort: 80, hostPort: first + 4 })).toMatchObject({
      hostPort: first + 4,
    });
    await expect(pool.allocate(b, { containerPort: 80, hostPort: first + 4 })).rejects.toBeInstanceOf(
      AlreadyExistsError,
    );
    await expect(pool.allocate(b, { containerPort: 80, hostPort: first + 5 })).rejects.toBeInstanceOf(
      FailedPreconditionError,
    );
    await expect(pool.allocate(b, { containerPort: 0 })).rejects.toThrow(/container port 0 is out of range/);
    await pool.release(a);
  });
});

describe("parsePortRange", () => {
  it("reads FIRST-LAST and names the setting when it is wrong", () => {
    expect(parsePortRange("20000-29999")).toEqual({ first: 20000, last: 29999 });
    expect(() => parsePortRange("29999-20000", "UNKEY_METALD_PORT_RANGE")).toThrow(
      /UNKEY_METALD_PORT_RANGE "29999-20000" is invalid: use FIRST-LAST/,
    );
    expect(() => parsePortRange("0-10")).toThrow(/is invalid/);
    expect(() => parsePortRange("80")).toThrow(/is invalid/);
  });
});

describe("portIsFree", () => {
  it("sees a port something on the host listens on", async () => {
    const srv = net.createServer();
    await new Promise<void>((resolve) => srv.listen(0, "127.0.0.1", resolve));
    const port = (srv.address() as { port: number }).port;
    try {
      expect(await portIsFree(port, "tcp")).toBe(false);
    } finally {
      await new Promise((resolve) => srv.close(resolve));
    }
    expect(await portIsFree(port, "tcp")).toBe(true);
  });
});
