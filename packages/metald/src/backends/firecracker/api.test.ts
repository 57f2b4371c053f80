import path from "node:path";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, beforeAll, describe, expect, it } from "vitest";
import {
  describeInstance,
  FirecrackerApiError,
  firecrackerConnection,
  getMachineConfig,
  getVersion,
  getVmConfig,
  patchDrive,
  patchVm,
  putAction,
  putBootSource,
  putDrive,
  putLogger,
  putMachineConfig,
  putMetrics,
  putNetworkInterface,
  putSerial,
} from "./api.js";
import {
  type FakeFirecracker,
  type FirecrackerSpecValidator,
  loadFirecrackerSpec,
  startFakeFirecracker,
} from "./openapi.suite.js";

let spec: FirecrackerSpecValidator;
beforeAll(() => {
  spec = loadFirecrackerSpec();
});

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function fake(): Promise<{ fc: FakeFirecracker; socket: string }> {
  const d = tempDir("kiln-fcapi-");
  cleanups.push(() => d.remove());
  const socket = path.join(d.path, "api.sock");
  const fc = await startFakeFirecracker(socket, spec);
  cleanups.push(() => fc.close());
  return { fc, socket };
}

describe("Firecracker's OpenAPI definition as a validator", () => {
  it("is the published 1.17.0-dev definition", () => {
    expect(spec.version).toBe("1.17.0-dev");
  });

  it("accepts requests Firecracker accepts", () => {
    expect(
      spec.checkRequest({
        method: "PUT",
        path: "/machine-config",
        body: { vcpu_count: 2, mem_size_mib: 512 },
      }),
    ).toEqual([]);
    expect(
      spec.checkRequest({
        method: "PUT",
        path: "/drives/rootfs",
        body: { drive_id: "rootfs", path_on_host: "/rootfs.ext4", is_root_device: true, is_read_only: false },
      }),
    ).toEqual([]);
    expect(spec.checkRequest({ method: "GET", path: "/", body: undefined })).toEqual([]);
  });

  it.each([
    [
      "an unknown field",
      { method: "PUT", path: "/machine-config", body: { vcpu_count: 1, mem_size_mib: 128, vcpus: 1 } },
    ],
    ["a missing required field", { method: "PUT", path: "/machine-config", body: { vcpu_count: 1 } }],
    [
      "an out-of-range value",
      { method: "PUT", path: "/machine-config", body: { vcpu_count: 0, mem_size_mib: 128 } },
    ],
    ["a wrong type", { method: "PUT", path: "/boot-source", body: { kernel_image_path: 7 } }],
    ["an unknown action", { method: "PUT", path: "/actions", body: { action_type: "Reboot" } }],
    ["an unknown VM state", { method: "PATCH", path: "/vm", body: { state: "Stopped" } }],
    [
      "a body id that differs from the path",
      { method: "PUT", path: "/drives/rootfs", body: { drive_id: "data", is_root_device: false } },
    ],
    ["an undefined method", { method: "GET", path: "/vm", body: undefined }],
    ["an unknown path", { method: "PUT", path: "/reboot", body: {} }],
    ["a missing required body", { method: "PUT", path: "/actions", body: undefined }],
    ["a body where none is taken", { method: "GET", path: "/version", body: { x: 1 } }],
  ])("rejects %s", (_what, req) => {
    expect(spec.checkRequest(req)).not.toEqual([]);
  });
});

describe("api", () => {
  it("sends a conforming request from every function, to the path and with the method the definition gives", async () => {
    const { fc, socket } = await fake();
    const c = firecrackerConnection(socket, 2_000);
    await putLogger(c, {
      log_path: "/firecracker.log",
      level: "Info",
      show_level: true,
      show_log_origin: false,
    });
    await putMetrics(c, { metrics_path: "/metrics.json" });
    await putMachineConfig(c, { vcpu_count: 2, mem_size_mib: 256, smt: false });
    await putBootSource(c, {
      kernel_image_path: "/vmlinux",
      boot_args: "console=ttyS0",
      initrd_path: "/initrd.img",
    });
    await putDrive(c, {
      drive_id: "rootfs",
      path_on_host: "/rootfs.ext4",
      is_root_device: true,
      is_read_only: false,
    });
    await putNetworkInterface(c, { iface_id: "eth0", host_dev_name: "tap0", guest_mac: "02:6b:00:00:00:01" });
    await putSerial(c, { serial_out_path: "/console.log" });
    await putAction(c, { action_type: "InstanceStart" });
    await patchDrive(c, { drive_id: "rootfs", path_on_host: "/rootfs.ext4" });
    await patchVm(c, { state: "Paused" });
    expect((await describeInstance(c)).state).toBe("Paused");
    await patchVm(c, { state: "Resumed" });
    expect(await getVersion(c)).toEqual({ firecracker_version: "1.17.0-dev" });
    expect(await getMachineConfig(c)).toEqual({ vcpu_count: 2, mem_size_mib: 256, smt: false });
    expect(await getVmConfig(c)).toHaveProperty("machine-config");
    await putAction(c, { action_type: "SendCtrlAltDel" });

    for (const r of fc.requests) expect(spec.checkRequest(r), `${r.method} ${r.path}`).toEqual([]);
    expect(fc.ownViolations).toEqual([]);
    expect(fc.requests.map((r) => spec.operationOf(r))).toEqual([
      "PUT /logger",
      "PUT /metrics",
      "PUT /machine-config",
      "PUT /boot-source",
      "PUT /drives/{drive_id}",
      "PUT /network-interfaces/{iface_id}",
      "PUT /serial",
      "PUT /actions",
      "PATCH /drives/{drive_id}",
      "PATCH /vm",
      "GET /",
      "PATCH /vm",
      "GET /version",
      "GET /machine-config",
      "GET /vm/config",
      "PUT /actions",
    ]);
  });

  it("turns Firecracker's 400 into an error carrying its fault message", async () => {
    const { socket } = await fake();
    const err = await patchVm(firecrackerConnection(socket, 2_000), { state: "Paused" }).catch(
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(FirecrackerApiError);
    expect((err as FirecrackerApiError).status).toBe(400);
    expect((err as FirecrackerApiError).message).toContain("The microVM has not been started.");
  });

  it("reaches a socket whose path is longer than a socket address can hold", async () => {
    const d = tempDir("kiln-fcapi-");
    cleanups.push(() => d.remove());
    const deep = path.join(
      d.path,
      "vms/vm_01jd3xq4zr5m8k2c7b9n6p0t1w/firecracker/jail/firecracker/vm-01jd3xq4zr5m8k2c7b9n6p0t1w-0a1b2c3d/root",
    );
    const socket = path.join(deep, "api.sock");
    expect(Buffer.byteLength(socket)).toBeGreaterThan(107);
    const fc = await startFakeFirecracker(socket, spec);
    cleanups.push(() => fc.close());
    expect((await describeInstance(firecrackerConnection(socket, 2_000))).state).toBe("Not started");
  });

  it("says which socket it cannot reach", async () => {
    const err = await describeInstance(firecrackerConnection("/nonexistent/api.sock", 500)).catch(
      (e: unknown) => e,
    );
    expect((err as Error).message).toContain("/nonexistent/api.sock");
  });
});
