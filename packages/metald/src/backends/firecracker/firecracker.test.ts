/**
 * The Firecracker backend against a recording stand-in for Firecracker's API (Firecracker itself
 * needs /dev/kvm). The launcher gets the real jailer command line; it builds nothing the jailer
 * would not (only the cgroup leaf the jailer creates), serves the API socket where Firecracker
 * would create it, and runs a placeholder VMM process, so pids, start times, adopt and kill are
 * real. Every request the backend sends is checked against Firecracker's OpenAPI definition.
 */
import { type ChildProcess, spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, beforeAll, describe, expect, it } from "vitest";
import { NotImplementedError, type VmSpec } from "../backend.js";
import { createTestCgroup, sha256File, type TestCgroup } from "../backend.suite.js";
import { isAlive, sleep } from "../process.js";
import { createFirecrackerBackend, defaultJailUser, type JailerLauncher } from "./firecracker.js";
import { chrootDir, jailerId } from "./jailer.js";
import {
  type FakeFirecracker,
  type FirecrackerSpecValidator,
  loadFirecrackerSpec,
  type RecordedRequest,
  startFakeFirecracker,
} from "./openapi.suite.js";

let validator: FirecrackerSpecValidator;
beforeAll(() => {
  validator = loadFirecrackerSpec();
});

interface Launch {
  args: string[];
  fake?: FakeFirecracker;
  vmm: ChildProcess;
}

interface World {
  dir: { path: string; remove(): void };
  spec: VmSpec;
  exec: string;
  launches: Launch[];
  launch: JailerLauncher;
  cgroup?: TestCgroup;
  /** Every request of every boot, in order. */
  requests(): RecordedRequest[];
}

const worlds: World[] = [];
afterEach(async () => {
  for (const w of worlds.splice(0)) {
    for (const l of w.launches) {
      await l.fake?.close();
      if (l.vmm.exitCode === null && l.vmm.signalCode === null) {
        l.vmm.kill("SIGKILL");
        await new Promise((r) => l.vmm.once("exit", r));
      }
    }
    w.cgroup?.remove();
    w.dir.remove();
  }
});

function flag(args: string[], name: string): string {
  const i = args.indexOf(name);
  if (i < 0) throw new Error(`jailer command line lacks ${name}: ${args.join(" ")}`);
  return args[i + 1]!;
}

function world(over: Partial<VmSpec> = {}, withCgroup = false): World {
  const dir = tempDir("kiln-fc-");
  const vmDir = path.join(dir.path, "vm");
  fs.mkdirSync(vmDir);
  // Stand-ins for the real files: the backend links and copies them, it never runs them here.
  const exec = path.join(dir.path, "bin/firecracker");
  fs.mkdirSync(path.dirname(exec));
  fs.writeFileSync(exec, "#!/bin/false\n", { mode: 0o755 });
  fs.writeFileSync(path.join(dir.path, "vmlinux"), "kernel image", { mode: 0o644 });
  fs.writeFileSync(path.join(dir.path, "initrd.img"), "initramfs", { mode: 0o644 });
  const base = path.join(dir.path, "rootfs.ext4");
  fs.writeFileSync(base, Buffer.alloc(1 << 20, 7), { mode: 0o444 });
  const cgroup = withCgroup ? createTestCgroup() : undefined;
  const spec: VmSpec = {
    vmId: "vm_01jd3xq4zr5m8k2c7b9n6p0t1w",
    tenantId: "acme",
    vcpus: 2,
    memoryBytes: 512 << 20,
    dir: vmDir,
    rootfs: base,
    kernel: path.join(dir.path, "vmlinux"),
    initrd: path.join(dir.path, "initrd.img"),
    kernelArgs: ["kiln.extra=1"],
    workload: { entrypoint: [], cmd: ["httpd"], env: {}, workingDir: "/", user: "" },
    hostname: "web-1",
    network: {
      netnsPath: "/var/run/netns/kiln-3xq4zr5m8k2c",
      guestIp: "10.213.0.7",
      prefixLen: 24,
      gateway: "10.213.0.1",
      dns: "10.213.0.1",
      macAddress: "02:6b:0a:d5:00:07",
      tapName: "tap0",
    },
    ports: [{ guestPort: 8080, hostPort: 40080, protocol: "tcp" }],
    ...(cgroup ? { cgroupParent: cgroup.rel } : {}),
    consoleLog: path.join(dir.path, "console.log"),
    ...over,
  };
  const w: World = {
    dir,
    spec,
    exec,
    launches: [],
    ...(cgroup ? { cgroup } : {}),
    requests: () => w.launches.flatMap((l) => l.fake?.requests ?? []),
    // What the jailer does that the backend relies on: the API socket in the chroot, the cgroup
    // leaf under the parent, and a process (here a placeholder) that ends when the guest stops.
    launch: async (_file, args) => {
      const chroot = chrootDir(
        flag(args, "--chroot-base-dir"),
        flag(args, "--exec-file"),
        flag(args, "--id"),
      );
      const apiSock = args[args.indexOf("--api-sock") + 1]!;
      const vmm = spawn("sleep", ["600"], { stdio: "ignore", detached: true });
      await new Promise((r) => vmm.once("spawn", r));
      // Recorded before anything else can fail, so afterEach always kills it.
      const launched: Launch = { args, vmm };
      w.launches.push(launched);
      if (args.includes("--parent-cgroup")) {
        for (const c of new Set(
          args.filter((_, i) => args[i - 1] === "--cgroup").map((s) => s.split(".")[0]!),
        )) {
          const leaf = path.join("/sys/fs/cgroup", c, flag(args, "--parent-cgroup"), flag(args, "--id"));
          fs.mkdirSync(leaf, { recursive: true });
          fs.writeFileSync(path.join(leaf, "cgroup.procs"), String(vmm.pid));
        }
      }
      launched.fake = await startFakeFirecracker(path.join(chroot, apiSock), validator, {
        instanceId: flag(args, "--id"),
        onCtrlAltDel: () => vmm.kill("SIGTERM"),
      });
      return { pid: vmm.pid! };
    },
  };
  worlds.push(w);
  return w;
}

const backendFor = (w: World) =>
  createFirecrackerBackend({
    firecrackerBinary: w.exec,
    jailerBinary: "/usr/bin/jailer",
    launch: w.launch,
    startTimeoutMs: 3_000,
  });

function expectConforming(w: World): void {
  for (const r of w.requests())
    expect(validator.checkRequest(r), `${r.method} ${r.path} ${JSON.stringify(r.body)}`).toEqual([]);
  for (const l of w.launches) expect(l.fake?.ownViolations).toEqual([]);
}

describe("firecracker backend", () => {
  it("create + boot + pause + resume + shutdown send only requests Firecracker's API defines", async () => {
    const w = world();
    const b = backendFor(w);
    expect(await b.create(w.spec)).toBeUndefined();
    const h = await b.boot(w.spec);
    await b.pause(w.spec, h);
    expect(await backendFor(w).adopt(w.spec, h)).toBe("paused");
    await b.resume(w.spec, h);
    expect(await backendFor(w).adopt(w.spec, h)).toBe("running");
    expect(await b.shutdown(w.spec, h, { timeoutMs: 5_000 })).toEqual({ forced: false });
    expect(await isAlive({ pid: h.pid, startTime: h.pidStartTime })).toBe(false);

    expectConforming(w);
    const calls = w.requests().map((r) => `${r.method} ${r.path}`);
    expect(calls.filter((c) => c !== "GET /")).toEqual([
      "PUT /logger",
      "PUT /metrics",
      "PUT /machine-config",
      "PUT /boot-source",
      "PUT /drives/rootfs",
      "PUT /network-interfaces/eth0",
      "PUT /serial",
      "PUT /actions",
      "PATCH /vm",
      "PATCH /vm",
      "PUT /actions",
    ]);
    const body = (p: string) => w.requests().find((r) => `${r.method} ${r.path}` === p)!.body;
    expect(body("PUT /machine-config")).toEqual({ vcpu_count: 2, mem_size_mib: 512, smt: false });
    expect(body("PUT /drives/rootfs")).toEqual({
      drive_id: "rootfs",
      path_on_host: "/rootfs.ext4",
      is_root_device: true,
      is_read_only: false,
    });
    expect(body("PUT /network-interfaces/eth0")).toEqual({
      iface_id: "eth0",
      host_dev_name: "tap0",
      guest_mac: "02:6b:0a:d5:00:07",
    });
    expect(body("PUT /boot-source")).toEqual({
      kernel_image_path: "/vmlinux",
      initrd_path: "/initrd.img",
      boot_args:
        "console=ttyS0 reboot=k panic=1 pci=off quiet sysctl.kernel.ctrl-alt-del=0 kiln.hostname=web-1 kiln.ip=10.213.0.7/24 kiln.gw=10.213.0.1 kiln.dns=10.213.0.1 kiln.extra=1",
    });
    const actions = w
      .requests()
      .filter((r) => r.path === "/actions")
      .map((r) => r.body);
    expect(actions).toEqual([{ action_type: "InstanceStart" }, { action_type: "SendCtrlAltDel" }]);
    expect(
      w
        .requests()
        .filter((r) => r.path === "/vm")
        .map((r) => r.body),
    ).toEqual([{ state: "Paused" }, { state: "Resumed" }]);
  });

  it("launches through the jailer with a jail of its own: uid/gid, chroot, netns, linked files", async () => {
    const w = world();
    const b = backendFor(w);
    const h = await b.boot(w.spec);
    const args = w.launches[0]!.args;
    const id = jailerId(w.spec.vmId);
    const user = defaultJailUser(w.spec);
    expect(flag(args, "--id")).toBe(id);
    expect(flag(args, "--exec-file")).toBe(w.exec);
    expect([flag(args, "--uid"), flag(args, "--gid")]).toEqual([String(user.uid), String(user.gid)]);
    expect(user.uid).toBeGreaterThanOrEqual(900_000);
    expect(flag(args, "--netns")).toBe("/var/run/netns/kiln-3xq4zr5m8k2c");
    expect(args).toContain("--daemonize");
    expect(args).not.toContain("--cgroup");

    const chroot = h.details.chroot!;
    expect(chroot).toBe(chrootDir(path.join(w.spec.dir, "firecracker/jail"), w.exec, id));
    const ino = (p: string) => fs.statSync(p).ino;
    expect(ino(path.join(chroot, "vmlinux"))).toBe(ino(w.spec.kernel!));
    expect(ino(path.join(chroot, "initrd.img"))).toBe(ino(w.spec.initrd!));
    // The disk is the VM's own copy (never the shared base), owned by the jail's user.
    const disk = path.join(chroot, "rootfs.ext4");
    expect(ino(disk)).toBe(ino(path.join(w.spec.dir, "firecracker/rootfs.ext4")));
    expect(ino(disk)).not.toBe(ino(w.spec.rootfs));
    expect(fs.statSync(disk).uid).toBe(user.uid);
    expect(sha256File(disk)).toBe(sha256File(w.spec.rootfs));
    // The serial console writes into the caller's console log.
    expect(ino(path.join(chroot, "console.log"))).toBe(ino(w.spec.consoleLog));
    expect(fs.statSync(path.join(chroot, "firecracker.log")).uid).toBe(user.uid);
    await b.delete(w.spec, h);
  });

  it("puts the VM in a child of metald's cgroup with its size, and removes that child on delete", async () => {
    const w = world({}, true);
    const b = backendFor(w);
    const h = await b.boot(w.spec);
    const args = w.launches[0]!.args;
    expect(flag(args, "--parent-cgroup")).toBe(w.cgroup!.rel);
    expect(flag(args, "--cgroup-version")).toBe("1");
    const settings = args.filter((_, i) => args[i - 1] === "--cgroup");
    expect(settings).toEqual([
      "cpu.cfs_period_us=100000",
      "cpu.cfs_quota_us=200000",
      "cpuacct.usage=0",
      `memory.limit_in_bytes=${(512 << 20) + (64 << 20)}`,
      "pids.max=max",
    ]);
    const leaf = path.join("/sys/fs/cgroup/cpuacct", w.cgroup!.rel, jailerId(w.spec.vmId));
    expect(fs.existsSync(leaf)).toBe(true);
    await b.delete(w.spec, h);
    expect(fs.existsSync(leaf), "the jailer's cgroup is removed").toBe(false);
    expect(fs.existsSync(path.dirname(leaf)), "metald's cgroup stays").toBe(true);
  });

  it("forces a guest that ignores Ctrl-Alt-Del, reboots into a new process, and deletes everything", async () => {
    const w = world();
    const b = backendFor(w);
    const h = await b.boot(w.spec);
    const h2 = await b.reboot(w.spec, h);
    expect(h2.pid).not.toBe(h.pid);
    expect(await isAlive({ pid: h.pid, startTime: h.pidStartTime })).toBe(false);
    expect(w.launches).toHaveLength(2);

    // This guest ignores Ctrl-Alt-Del: the stand-in VMM is stopped, so the SIGTERM the fake sends
    // stays pending and the process lives on.
    w.launches[1]!.vmm.kill("SIGSTOP");
    const { forced } = await b.shutdown(w.spec, h2, { timeoutMs: 300 });
    expect(forced).toBe(true);
    expect(await isAlive({ pid: h2.pid, startTime: h2.pidStartTime })).toBe(false);

    await b.delete(w.spec, h2);
    expect(fs.readdirSync(w.spec.dir)).toEqual([]);
    expect(fs.existsSync(w.spec.consoleLog), "the console log is the caller's").toBe(true);
    expectConforming(w);
  });

  it("adopts: gone after kill -9, and delete without a handle still kills a running VM", async () => {
    const w = world();
    const b = backendFor(w);
    const h = await b.boot(w.spec);
    expect(await backendFor(w).adopt(w.spec, h)).toBe("running");
    process.kill(h.pid, "SIGKILL");
    await sleep(100);
    expect(await backendFor(w).adopt(w.spec, h)).toBe("gone");

    const h2 = await b.boot(w.spec);
    await backendFor(w).delete(w.spec);
    expect(await isAlive({ pid: h2.pid, startTime: h2.pidStartTime })).toBe(false);
    expect(fs.readdirSync(w.spec.dir)).toEqual([]);
  });

  it("refuses what Firecracker cannot do, naming why", async () => {
    const w = world({ network: undefined });
    const b = backendFor(w);
    await expect(b.create(w.spec)).rejects.toBeInstanceOf(NotImplementedError);
    await expect(b.create({ ...w.spec, ports: [], vcpus: 33 })).rejects.toThrow(/vcpus 33 must be 1–32/);
    await expect(b.create({ ...w.spec, ports: [], kernel: undefined })).rejects.toThrow(/needs a kernel/);
  });

  it("probes unavailable without KVM or without the binaries", async () => {
    const noKvm = createFirecrackerBackend({ kvmAvailable: async () => false });
    expect(await noKvm.probe()).toMatchObject({ available: false, isolation: "hardware-vm" });
    expect((await noKvm.probe()).reason).toMatch(/kvm/i);
    const noBinary = createFirecrackerBackend({
      kvmAvailable: async () => true,
      firecrackerBinary: "/nonexistent/firecracker",
    });
    expect(await noBinary.probe()).toMatchObject({ available: false });
    expect((await noBinary.probe()).reason).toMatch(/not installed/);
  });
});
