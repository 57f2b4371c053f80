import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { TIER_LIMITS } from "@kiln/kit";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { CONTROLLERS, cgroupLimits, createCgroupManager, type VmCgroup } from "../cgroups/cgroup.js";
import { createTestNetwork, probeTcp, startTestServer, type TestNetwork } from "../network/testing.js";
import { createSampler, parseBlkio, type Sampler, type SamplerTarget, type VmSample } from "./sampler.js";

const manager = createCgroupManager({ root: `kiln-test-${randomBytes(3).toString("hex")}` });
const limits = cgroupLimits({ vcpus: 1, memoryBytes: 256 * 1024 ** 2 }, TIER_LIMITS.pro);

function targetOf(cg: VmCgroup, extra: Partial<SamplerTarget> = {}): SamplerTarget {
  return {
    vmId: cg.vmId,
    cgroup: {
      cpuacct: cg.path("cpuacct"),
      memory: cg.path("memory"),
      blkio: cg.path("blkio"),
      pids: cg.path("pids"),
    },
    ...extra,
  };
}

afterAll(async () => {
  for (const c of CONTROLLERS) await fs.rmdir(`/sys/fs/cgroup/${c}/${manager.root}`).catch(() => undefined);
});

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe("sampler", () => {
  const children: ChildProcess[] = [];
  const cgroups: VmCgroup[] = [];
  let sampler: Sampler | undefined;

  afterEach(async () => {
    sampler?.stop();
    sampler = undefined;
    for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
    for (const cg of cgroups.splice(0)) await cg.remove();
  });
  async function vmCgroup(): Promise<VmCgroup> {
    const cg = await manager.create("acme", `vm_${randomBytes(4).toString("hex")}`, limits);
    cgroups.push(cg);
    return cg;
  }

  async function runIn(cg: VmCgroup, cmd: string, args: string[]): Promise<ChildProcess> {
    // The shell moves itself into the cgroup, then execs the workload (same pid, nothing escapes).
    const child = spawn(
      "sh",
      [
        "-c",
        `for c in ${CONTROLLERS.map((c) => cg.path(c)).join(" ")}; do echo $$ > $c/cgroup.procs; done; exec "$@"`,
        "sh",
        cmd,
        ...args,
      ],
      {
        stdio: "ignore",
      },
    );
    children.push(child);
    const deadline = Date.now() + 3000;
    while (!(await cg.pids()).includes(child.pid!)) {
      // A short workload (dd) may be done already: it joined before exec, so that is fine.
      if (child.exitCode !== null || child.signalCode !== null) break;
      if (Date.now() > deadline) throw new Error("workload did not join its cgroup");
      await sleep(10);
    }
    return child;
  }

  it("sees a busy process's CPU time, memory and pids grow", async () => {
    const cg = await vmCgroup();
    await runIn(cg, process.execPath, ["-e", "const keep = Buffer.alloc(32 << 20, 1); for (;;) {}"]);
    sampler = createSampler();
    sampler.add(targetOf(cg));
    sampler.start();
    await sleep(600);
    const history = sampler.history(cg.vmId);
    expect(history.length).toBeGreaterThanOrEqual(3);
    const first = history[0]!;
    const last = history.at(-1)!;
    expect(last.cpuTimeNanos).toBeGreaterThan(first.cpuTimeNanos);
    expect(last.cpuTimeNanos - first.cpuTimeNanos).toBeGreaterThan(100_000_000n); // ≥ 100 ms of CPU in ~500 ms
    expect(last.memoryUsageBytes).toBeGreaterThan(16 << 20);
    expect(last.memoryPeakBytes).toBeGreaterThanOrEqual(last.memoryUsageBytes);
    expect(last.memoryLimitBytes).toBe(256 * 1024 ** 2);
    expect(last.pids).toBeGreaterThanOrEqual(1);
    expect(sampler.latest(cg.vmId)).toEqual(last);
  });

  it("counts the VM's direct disk I/O", async () => {
    const cg = await vmCgroup();
    const file = path.join(os.tmpdir(), `kiln-sampler-${randomBytes(4).toString("hex")}`);
    try {
      const dd = await runIn(cg, "dd", ["if=/dev/zero", `of=${file}`, "bs=1M", "count=8", "oflag=direct"]);
      // dd may already have exited while runIn waited for it to join the cgroup.
      if (dd.exitCode === null && dd.signalCode === null)
        await new Promise((resolve) => dd.once("exit", resolve));
      sampler = createSampler();
      sampler.add(targetOf(cg));
      sampler.start();
      await sleep(250);
      expect(sampler.latest(cg.vmId)?.diskWriteBytes).toBeGreaterThanOrEqual(8 << 20);
    } finally {
      await fs.rm(file, { force: true });
    }
  });

  it("keeps a bounded ring, oldest first, with contiguous sequence numbers", async () => {
    const cg = await vmCgroup();
    sampler = createSampler({ intervalMs: 20, ringSize: 5 });
    sampler.add(targetOf(cg));
    sampler.start();
    await sleep(400);
    const h = sampler.history(cg.vmId);
    expect(h).toHaveLength(5);
    expect(h.map((s) => s.seq)).toEqual([0, 1, 2, 3, 4].map((i) => h[0]!.seq + i));
    expect(h[0]!.seq).toBeGreaterThan(5);
    expect(h.at(-1)).toEqual(sampler.latest(cg.vmId));
  });

  it("samples every 100 ms, one timer for all VMs", async () => {
    const cgs = [await vmCgroup(), await vmCgroup(), await vmCgroup()];
    const seen: VmSample[] = [];
    sampler = createSampler({ onSample: (s) => seen.push(s) });
    for (const cg of cgs) sampler.add(targetOf(cg));
    sampler.start();
    await sleep(1050);
    sampler.stop();
    for (const cg of cgs) {
      const n = seen.filter((s) => s.vmId === cg.vmId).length;
      expect(n).toBeGreaterThanOrEqual(7); // 10 expected; a loaded machine may lose a few
      expect(n).toBeLessThanOrEqual(12);
    }
    const stats = sampler.stats();
    expect(stats.ticks).toBeGreaterThanOrEqual(7);
    expect(stats.samples).toBe(seen.length);
    expect(stats.errors).toBe(0);
  });

  it("lets a backend's extra reader replace and add values, without piling up when slow", async () => {
    const cg = await vmCgroup();
    let calls = 0;
    sampler = createSampler({ intervalMs: 20 });
    sampler.add(
      targetOf(cg, {
        extraReaders: [
          async () => {
            calls++;
            await sleep(100); // slower than the interval
            return { diskReadBytes: 4242, extra: { qmpCalls: calls } };
          },
        ],
      }),
    );
    sampler.start();
    await sleep(450);
    const last = sampler.latest(cg.vmId)!;
    expect(last.diskReadBytes).toBe(4242);
    expect(last.extra.qmpCalls).toBeGreaterThan(0);
    // ~4 reads in 450 ms at 100 ms each, not one per 20 ms tick.
    expect(calls).toBeLessThanOrEqual(6);
  });

  it("stops sampling a removed VM and survives a failing hook and a vanished cgroup", async () => {
    const [a, b] = [await vmCgroup(), await vmCgroup()];
    sampler = createSampler({
      intervalMs: 20,
      onSample: () => {
        throw new Error("hook failure");
      },
    });
    sampler.add(targetOf(a));
    sampler.add(targetOf(b));
    sampler.start();
    await sleep(100);
    sampler.remove(a.vmId);
    expect(sampler.latest(a.vmId)).toBeUndefined();
    await b.remove(); // deleted under the sampler: reads fail, sampling goes on
    cgroups.splice(cgroups.indexOf(b), 1);
    await sleep(100);
    expect(sampler.vmIds()).toEqual([b.vmId]);
    expect(sampler.stats().errors).toBeGreaterThan(0);
  });
});

describe("sampler network counters", () => {
  let net: TestNetwork;
  let vmId: string;

  beforeAll(async () => {
    net = await createTestNetwork();
    vmId = await net.testDb.addVm();
  });
  afterAll(async () => {
    await net?.attacher.detach(vmId);
    await net?.cleanup();
  });

  it("reads the VM's traffic from its router-side interface", async () => {
    const vmNet = await net.attacher.attach({ vmId, egressAllowed: false }, { mode: "address" });
    const cg = await manager.create("acme", vmId, limits);
    const server = await startTestServer(vmNet.netnsName, vmNet.guestIp, 8080, "x".repeat(100_000));
    const sampler = createSampler({ intervalMs: 50 });
    try {
      sampler.add({ ...targetOf(cg), netStatsDir: vmNet.statsDir });
      sampler.start();
      await sleep(120);
      const before = sampler.latest(vmId)!;
      expect(await probeTcp(undefined, vmNet.guestIp, 8080)).toMatchObject({ ok: true });
      await sleep(150);
      const after = sampler.latest(vmId)!;
      // The VM sent the 100 kB reply and received the request's packets.
      expect(after.networkTxBytes - before.networkTxBytes).toBeGreaterThan(100_000);
      expect(after.networkRxBytes).toBeGreaterThan(before.networkRxBytes);
    } finally {
      sampler.stop();
      await server.stop();
      await cg.remove();
    }
  });
});

describe("parseBlkio", () => {
  it("sums reads and writes over devices and ignores the other lines", () => {
    const text = [
      "254:0 Read 8388608",
      "254:0 Write 4096",
      "254:0 Sync 8392704",
      "254:0 Total 8392704",
      "8:16 Read 512",
      "8:16 Write 1024",
      "Total 8394240",
      "",
    ].join("\n");
    expect(parseBlkio(text)).toEqual({ read: 8389120, write: 5120 });
    expect(parseBlkio("Total 0\n")).toEqual({ read: 0, write: 0 });
  });
});
