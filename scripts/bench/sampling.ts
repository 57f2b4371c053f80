/**
 * `npm run bench -- sampling [--vms N] [--seconds S]`: the cost of metald's 100 ms sampler.
 *
 * Sets up N VMs the way metald does — a cgroup each (cpu, cpuacct, memory, pids, freezer,
 * blkio) and a network namespace attached to a router of its own (veth pair, address,
 * egress) — then samples all of them every 100 ms for S seconds and reports the CPU the
 * process used, as a percentage of one core (process.cpuUsage() deltas), next to the same
 * process idling for the same time. Target (issue #5): under 5% of one core at 100 VMs.
 * Everything it creates is removed at the end, also on failure.
 */
import { randomBytes } from "node:crypto";
import fs from "node:fs/promises";
import { TIER_LIMITS } from "@kiln/kit";
import {
  CONTROLLERS,
  cgroupLimits,
  createCgroupManager,
  type VmCgroup,
} from "../../packages/metald/src/cgroups/cgroup.js";
import { createSampler } from "../../packages/metald/src/metering/sampler.js";
import type { VmNetwork } from "../../packages/metald/src/network/attach.js";
import { countResources, listKilnResources } from "../../packages/metald/src/network/leaks.js";
import { createTestNetwork, type TestNetwork } from "../../packages/metald/src/network/testing.js";
import { option } from "./util.js";

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** CPU used by this process over `ms`, in % of one core. */
async function cpuPercentOver(ms: number): Promise<number> {
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  await sleep(ms);
  const c = process.cpuUsage(c0);
  return ((c.user + c.system) / 1000 / (performance.now() - t0)) * 100;
}

export async function run(args: string[] = []): Promise<void> {
  const vms = option(args, "--vms", 100);
  const seconds = option(args, "--seconds", 10);
  const cgroups = createCgroupManager({ root: `kiln-bench-${randomBytes(3).toString("hex")}` });
  const limits = cgroupLimits({ vcpus: 1, memoryBytes: 128 * 1024 ** 2 }, TIER_LIMITS.pro);
  const made: VmCgroup[] = [];
  const attached: Array<{ vmId: string; net: VmNetwork }> = [];
  let network: TestNetwork | undefined;
  try {
    const t0 = performance.now();
    network = await createTestNetwork();
    const net = network;
    // Four at a time: setup is `ip` commands, and the machine has two cores.
    const ids = await Promise.all(Array.from({ length: vms }, () => net.testDb.addVm()));
    for (let i = 0; i < ids.length; i += 4) {
      await Promise.all(
        ids.slice(i, i + 4).map(async (vmId) => {
          const vmNet = await net.attacher.attach({ vmId, egressAllowed: true }, { mode: "address" });
          attached.push({ vmId, net: vmNet });
          made.push(await cgroups.create("bench", vmId, limits));
        }),
      );
    }
    process.stdout.write(
      `set up ${vms} VMs (cgroup + netns + veth + egress) in ${((performance.now() - t0) / 1000).toFixed(1)} s\n`,
    );

    const idle = await cpuPercentOver(seconds * 1000);
    const sampler = createSampler();
    for (const { vmId, net: vmNet } of attached) {
      const cg = made.find((c) => c.vmId === vmId)!;
      sampler.add({
        vmId,
        cgroup: {
          cpuacct: cg.path("cpuacct"),
          memory: cg.path("memory"),
          blkio: cg.path("blkio"),
          pids: cg.path("pids"),
        },
        netStatsDir: vmNet.statsDir,
      });
    }
    sampler.start();
    const sampling = await cpuPercentOver(seconds * 1000);
    const stats = sampler.stats();
    sampler.stop();
    const expected = Math.floor(seconds * 10) * vms;
    process.stdout.write(
      [
        `sampling ${vms} VMs every 100 ms for ${seconds} s:`,
        `  samples taken        ${stats.samples} (${((stats.samples / expected) * 100).toFixed(1)}% of ${expected}), ticks ${stats.ticks}, overruns ${stats.overruns}, read errors ${stats.errors}`,
        `  one tick (all VMs)   ${(stats.busyMs / Math.max(1, stats.ticks)).toFixed(2)} ms on the event loop`,
        `  process CPU idle     ${idle.toFixed(2)}% of one core`,
        `  process CPU sampling ${sampling.toFixed(2)}% of one core`,
        `  sampler's share      ${(sampling - idle).toFixed(2)}% of one core (target < 5%)`,
        "",
      ].join("\n"),
    );
  } finally {
    for (const cg of made) await cg.remove().catch(() => undefined);
    for (const c of CONTROLLERS) await fs.rmdir(`/sys/fs/cgroup/${c}/${cgroups.root}`).catch(() => undefined);
    if (network) {
      for (const { vmId } of attached) await network.attacher.detach(vmId).catch(() => undefined);
      const left = await listKilnResources({
        netnsPrefix: network.netnsPrefix,
        router: network.router,
        cgroups,
      });
      await network.cleanup();
      process.stdout.write(`leaked after cleanup: ${countResources(left)} objects\n`);
    }
  }
}
