import { describe, expect, it } from "vitest";
import type { VmSpec } from "../backend.js";
import { bundleLayout, containerCgroupPath, parseRuntimeStats } from "./runtime-backend.js";

describe("OCI runtime backend helpers", () => {
  it("reads runc/runsc `events --stats` output", () => {
    const out = JSON.stringify({
      type: "stats",
      id: "vm_1",
      data: {
        cpu: { usage: { total: 123456789, user: 1, kernel: 2 } },
        memory: { usage: { usage: 4096000, max: 1 } },
        blkio: {
          ioServiceBytesRecursive: [
            { major: 7, minor: 0, op: "Read", value: 100 },
            { major: 7, minor: 0, op: "Write", value: 50 },
            { major: 7, minor: 1, op: "read", value: 1 },
            { major: 7, minor: 0, op: "Total", value: 151 },
          ],
        },
      },
    });
    expect(parseRuntimeStats(`${out}\n`)).toEqual({
      cpuTimeNanos: 123456789,
      memoryBytes: 4096000,
      diskReadBytes: 101,
      diskWriteBytes: 50,
    });
    expect(parseRuntimeStats(JSON.stringify({ type: "stats", data: {} }))).toEqual({});
  });

  it("keeps everything under <dir>/<backend> and nests the runtime's cgroup in metald's", () => {
    const l = bundleLayout("/vms/vm_1", "gvisor");
    for (const p of Object.values(l)) expect(p === l.root || p.startsWith(`${l.root}/`), p).toBe(true);
    expect(l.root).toBe("/vms/vm_1/gvisor");
    expect(l.merged).toBe("/vms/vm_1/gvisor/bundle/rootfs");
    const spec = { vmId: "vm_1", cgroupParent: "kiln/acme/vm_1" } as VmSpec;
    expect(containerCgroupPath(spec, "runc")).toBe("/kiln/acme/vm_1/runc");
    expect(containerCgroupPath({ ...spec, cgroupParent: undefined }, "runc")).toBe("/kiln-runc-vm_1");
  });
});
