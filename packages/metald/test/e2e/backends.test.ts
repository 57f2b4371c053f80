/**
 * The slow backend suite: QEMU microVMs booting the busybox-httpd rootfs (with user-mode
 * networking, and on a tap device in a network namespace, as metald attaches VMs), then
 * boot → first HTTP response timings for every backend that runs here (median of 3).
 * runc and gVisor run the same conformance suite in the unit project (runc.test.ts, gvisor.test.ts).
 */
import { tempDir } from "@kiln/kit/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  backendConformanceSuite,
  buildSuiteAssets,
  measureBootToHttp,
  median,
  type SuiteAssets,
  type SuiteTarget,
} from "../../src/backends/backend.suite.js";
import { createGvisorBackend } from "../../src/backends/gvisor.js";
import { createQemuBackend } from "../../src/backends/qemu/qemu.js";
import { createRuncBackend } from "../../src/backends/runc.js";

const qemuUser: SuiteTarget = {
  label: "qemu (user networking)",
  backend: () => createQemuBackend(),
  network: "user",
  vm: true,
  bootTimeoutMs: 60_000,
  shutdownTimeoutMs: 15_000,
};
const qemuTap: SuiteTarget = { ...qemuUser, label: "qemu (tap in a network namespace)", network: "tap" };
const runc: SuiteTarget = {
  label: "runc",
  backend: () => createRuncBackend(),
  network: "address",
  vm: false,
  bootTimeoutMs: 10_000,
  shutdownTimeoutMs: 5_000,
};
const gvisor: SuiteTarget = {
  ...runc,
  label: "gvisor",
  backend: () => createGvisorBackend(),
  bootTimeoutMs: 20_000,
};

backendConformanceSuite(qemuUser);
backendConformanceSuite(qemuTap);

describe("boot → first HTTP response", () => {
  let work: { path: string; remove(): void };
  let assets: SuiteAssets;
  beforeAll(async () => {
    work = tempDir("kiln-bt-timing-");
    assets = await buildSuiteAssets(work.path, true);
  });
  afterAll(() => work?.remove());

  it("is measured for every backend that runs here (median of 3)", async () => {
    const rows: string[] = [];
    for (const target of [runc, gvisor, qemuUser, qemuTap]) {
      const times = await measureBootToHttp(target, assets, 3);
      expect(times).toHaveLength(3);
      rows.push(
        `${target.label.padEnd(36)} median ${Math.round(median(times))} ms  (${times.map(Math.round).join(", ")})`,
      );
    }
    console.log(`[backends] boot → first HTTP response\n${rows.join("\n")}`);
  });
});
