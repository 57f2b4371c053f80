/**
 * The conformance suite every runnable backend runs (as containerd's SnapshotterSuite), plus the
 * fixtures it needs: a busybox-httpd rootfs built the way builderd builds one, a throwaway
 * network namespace, a throwaway cgroup parent. Used by runc.test.ts and gvisor.test.ts (unit
 * project) and test/e2e/backends.test.ts (QEMU, timings).
 *
 * Each case boots its own VM and cleans up in afterEach even when it fails: the backend's delete,
 * then by hand whatever is left (processes by pid and start time, mounts, the netns, cgroups).
 */
import { execFileSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { FailedPreconditionError } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it, onTestFailed } from "vitest";
import { findHostKernel } from "../../../assetmanagerd/src/kernel/host-kernel.js";
import { buildInitramfs } from "../../../assetmanagerd/src/kernel/initramfs.js";
import { buildExt4 } from "../../../builderd/src/rootfs/ext4.js";
import { injectInit } from "../../../builderd/src/rootfs/init.js";
import { httpGet, httpOutcome } from "../testing/http.js";
import type { Backend, BackendHandle, VmNetworkSpec, VmSpec, WorkloadConfig } from "./backend.js";
import { mountsUnder, unmountUnder } from "./mounts.js";
import { isAlive, processStartTime, sleep } from "./process.js";

// ---------------------------------------------------------------------------------------------
// Fixtures

export const INDEX_HTML = "<h1>hello from a kiln backend</h1>\n";
export const GUEST_PORT = 8080;

/** The workload: count boots in a file the VM writes, then serve /www as the image's `www` user. */
export const WORKLOAD: WorkloadConfig = {
  entrypoint: [],
  cmd: ["/bin/sh", "-c", `echo boot >> /www/boots.txt && exec httpd -f -v -p ${GUEST_PORT} -h /www`],
  env: { PATH: "/usr/sbin:/usr/bin:/sbin:/bin", GREETING: "hi" },
  workingDir: "/www",
  user: "www",
};

export interface RootfsFixture {
  image: string;
  sha256: string;
}

/**
 * A busybox-httpd rootfs, as builderd's e2e boot test makes it: host busybox + applet links, a
 * `www` user owning /www, Kiln's init injected (injectInit), packed with mkfs.ext4 (buildExt4).
 */
export async function buildBusyboxRootfs(workDir: string): Promise<RootfsFixture> {
  const root = path.join(workDir, "rootfs");
  for (const d of ["bin", "etc", "www"]) fs.mkdirSync(path.join(root, d), { recursive: true });
  fs.copyFileSync("/bin/busybox", path.join(root, "bin/busybox"));
  fs.chmodSync(path.join(root, "bin/busybox"), 0o755);
  const applets = execFileSync("/bin/busybox", ["--list"], { encoding: "utf8" }).split("\n").filter(Boolean);
  for (const a of applets) if (a !== "busybox") fs.symlinkSync("busybox", path.join(root, "bin", a));
  fs.writeFileSync(
    path.join(root, "etc/passwd"),
    "root:x:0:0:root:/root:/bin/sh\nwww:x:1000:1000:www:/www:/bin/sh\n",
  );
  fs.writeFileSync(path.join(root, "etc/group"), "root:x:0:\nwww:x:1000:\n");
  fs.writeFileSync(path.join(root, "www/index.html"), INDEX_HTML);
  // Reports who and where the workload runs: user, hostname and environment from the VM spec.
  fs.mkdirSync(path.join(root, "www/cgi-bin"));
  fs.writeFileSync(
    path.join(root, "www/cgi-bin/whoami"),
    '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n"\necho "uid=$(id -u) gid=$(id -g) host=$(hostname) greeting=$GREETING"\n',
    { mode: 0o755 },
  );
  fs.chownSync(path.join(root, "www"), 1000, 1000);
  await injectInit(root, WORKLOAD);
  const image = path.join(workDir, "rootfs.ext4");
  await buildExt4(root, image, { headroomBytes: 16 << 20 });
  fs.chmodSync(image, 0o444); // as the asset store keeps it
  fs.rmSync(root, { recursive: true, force: true });
  return { image, sha256: sha256File(image) };
}

/** The host's cloud kernel and Kiln's initramfs for it (QEMU). */
export async function buildVmAssets(workDir: string): Promise<{ kernel: string; initrd: string }> {
  const host = await findHostKernel();
  const initrd = path.join(workDir, "initrd.img");
  await buildInitramfs({ modulesDir: host.modulesDir, out: initrd });
  return { kernel: host.vmlinuz, initrd };
}

export function sha256File(file: string): string {
  return createHash("sha256").update(fs.readFileSync(file)).digest("hex");
}

function ip(args: string[], tolerate = false): void {
  try {
    execFileSync("ip", args, { stdio: ["ignore", "ignore", "pipe"] });
  } catch (err) {
    if (!tolerate) throw err;
  }
}

export interface TestNetwork {
  spec: VmNetworkSpec;
  remove(): void;
}

/**
 * A network namespace wired to the host by a veth pair on a link-local /30 (HOST-FACTS: test
 * traffic stays on addresses inside namespaces the test created). The host end has .1 and is
 * the gateway; the guest address .2 lives on the namespace's eth0 (`address`, container
 * backends), or in a guest behind tap0 bridged to eth0 (`tap`, QEMU) — metald's two modes.
 */
export function createTestNetwork(mode: "address" | "tap"): TestNetwork {
  const tag = randomBytes(3).toString("hex");
  const netns = `kiln-bt-${tag}`;
  const hostIf = `kbt${tag}`;
  const used = execFileSync("ip", ["-4", "-o", "addr"], { encoding: "utf8" });
  let a = 0;
  let b = 0;
  do {
    a = 150 + Math.floor(Math.random() * 100);
    b = 4 * Math.floor(Math.random() * 63);
  } while (used.includes(`169.254.${a}.${b + 1}/`));
  const gateway = `169.254.${a}.${b + 1}`;
  const guestIp = `169.254.${a}.${b + 2}`;
  const mac = `02:6b:${randomBytes(4).toString("hex").match(/../g)!.join(":")}`;
  const remove = () => {
    ip(["link", "del", hostIf], true);
    ip(["netns", "del", netns], true);
  };
  try {
    ip(["netns", "add", netns]);
    ip(["-n", netns, "link", "set", "lo", "up"]);
    ip(["link", "add", hostIf, "type", "veth", "peer", "name", "eth0", "netns", netns]);
    ip(["addr", "add", `${gateway}/30`, "dev", hostIf]);
    ip(["link", "set", hostIf, "up"]);
    if (mode === "address") {
      ip(["-n", netns, "link", "set", "eth0", "address", mac]);
      ip(["-n", netns, "addr", "add", `${guestIp}/30`, "dev", "eth0"]);
      ip(["-n", netns, "link", "set", "eth0", "up"]);
      ip(["-n", netns, "route", "add", "default", "via", gateway]);
    } else {
      ip(["-n", netns, "link", "add", "br0", "type", "bridge"]);
      ip(["-n", netns, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
      ip(["-n", netns, "link", "set", "eth0", "master", "br0"]);
      ip(["-n", netns, "link", "set", "tap0", "master", "br0"]);
      for (const dev of ["eth0", "tap0", "br0"]) ip(["-n", netns, "link", "set", dev, "up"]);
    }
  } catch (err) {
    remove();
    throw err;
  }
  return {
    spec: {
      netnsPath: `/var/run/netns/${netns}`,
      guestIp,
      prefixLen: 30,
      gateway,
      macAddress: mac,
      ...(mode === "tap" ? { tapName: "tap0" } : {}),
    },
    remove,
  };
}

/** Controllers a test cgroup parent is made in (metald's cgroup code makes these, too). */
const TEST_CONTROLLERS = ["cpu", "cpuacct", "memory", "pids", "freezer", "blkio"];

export interface TestCgroup {
  /** Relative path, as VmSpec.cgroupParent. */
  rel: string;
  /** Absolute directories made, one per controller. */
  dirs: string[];
  remove(): void;
}

export function createTestCgroup(): TestCgroup {
  const rel = `kiln-bt-${randomBytes(3).toString("hex")}`;
  const dirs: string[] = [];
  for (const c of TEST_CONTROLLERS) {
    const dir = path.join("/sys/fs/cgroup", c, rel);
    if (!fs.existsSync(path.dirname(dir))) continue;
    fs.mkdirSync(dir);
    dirs.push(dir);
  }
  return {
    rel,
    dirs,
    remove() {
      // Whatever a runtime left below, deepest first (rmdir is the only way to remove a cgroup).
      for (const root of fs.readdirSync("/sys/fs/cgroup"))
        removeCgroupTree(path.join("/sys/fs/cgroup", root, rel));
    },
  };
}

function removeCgroupTree(dir: string): void {
  let entries: fs.Dirent[];
  try {
    entries = fs.readdirSync(dir, { withFileTypes: true });
  } catch {
    return;
  }
  for (const e of entries) if (e.isDirectory()) removeCgroupTree(path.join(dir, e.name));
  try {
    fs.rmdirSync(dir);
  } catch {
    // still has processes: the cleanup killed what it could
  }
}

/** Pids in a cgroup and all its children, in one hierarchy. */
export function cgroupPids(dir: string): number[] {
  if (!fs.existsSync(dir)) return [];
  const out = fs.readFileSync(path.join(dir, "cgroup.procs"), "utf8").split("\n").filter(Boolean).map(Number);
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    if (e.isDirectory()) out.push(...cgroupPids(path.join(dir, e.name)));
  }
  return out;
}

/** Live processes whose command line mentions `needle` (the VM directory): what a backend left running. */
export function processesMentioning(needle: string): number[] {
  const out: number[] = [];
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      const cmdline = fs.readFileSync(`/proc/${entry}/cmdline`, "utf8");
      if (cmdline.includes(needle)) out.push(Number(entry));
    } catch {
      // exited meanwhile
    }
  }
  return out;
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

/** Polls until the URL answers 200; undefined on timeout. */
export async function waitForHttp(
  url: string,
  timeoutMs: number,
  alive?: () => Promise<boolean>,
): Promise<{ body: string; ms: number } | undefined> {
  const started = performance.now();
  while (performance.now() - started < timeoutMs) {
    const res = await httpGet(url, 1_000);
    if (res?.status === 200) return { body: res.body, ms: performance.now() - started };
    if (alive && !(await alive())) return undefined;
    await sleep(50);
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// The suite

export interface SuiteTarget {
  /** Label in test names, e.g. "runc" or "qemu (tap)". */
  label: string;
  /** A fresh backend object; adopt is tested with a second one, as after a metald restart. */
  backend(): Backend;
  /** How the host reaches the guest: a test netns (`address`/`tap` mode) or QEMU user networking. */
  network: "address" | "tap" | "user";
  /** Needs a kernel and initramfs (VM backends). */
  vm: boolean;
  bootTimeoutMs: number;
  /** Graceful shutdown budget. */
  shutdownTimeoutMs: number;
}

/** One VM under test, with everything needed to clean it up. */
export interface VmFixture {
  spec: VmSpec;
  url: string;
  handles: BackendHandle[];
  network?: TestNetwork;
  cgroup: TestCgroup;
  dir: { path: string; remove(): void };
}

export interface SuiteAssets {
  rootfs: RootfsFixture;
  vm?: { kernel: string; initrd: string };
}

/** Builds the rootfs (and kernel assets) once per file. */
export async function buildSuiteAssets(workDir: string, vm: boolean): Promise<SuiteAssets> {
  const rootfs = await buildBusyboxRootfs(workDir);
  return vm ? { rootfs, vm: await buildVmAssets(workDir) } : { rootfs };
}

export async function newVmFixture(target: SuiteTarget, assets: SuiteAssets): Promise<VmFixture> {
  const dir = tempDir("kiln-bt-");
  const vmDir = path.join(dir.path, "vm");
  fs.mkdirSync(vmDir);
  const cgroup = createTestCgroup();
  let network: TestNetwork | undefined;
  try {
    network = target.network === "user" ? undefined : createTestNetwork(target.network);
  } catch (err) {
    cgroup.remove();
    dir.remove();
    throw err;
  }
  const hostPort = target.network === "user" ? await freePort() : 0;
  const spec: VmSpec = {
    vmId: `vm_${randomBytes(6).toString("hex")}`,
    tenantId: "acme",
    vcpus: 1,
    memoryBytes: 256 << 20,
    dir: vmDir,
    rootfs: assets.rootfs.image,
    ...(assets.vm ? { kernel: assets.vm.kernel, initrd: assets.vm.initrd } : {}),
    kernelArgs: [],
    workload: WORKLOAD,
    hostname: "kiln-suite",
    ...(network ? { network: network.spec } : {}),
    ports: target.network === "user" ? [{ guestPort: GUEST_PORT, hostPort, protocol: "tcp" }] : [],
    cgroupParent: cgroup.rel,
    consoleLog: path.join(dir.path, "console.log"),
  };
  const url =
    target.network === "user"
      ? `http://127.0.0.1:${hostPort}`
      : `http://${network!.spec.guestIp}:${GUEST_PORT}`;
  return { spec, url, handles: [], cgroup, dir, ...(network ? { network } : {}) };
}

/** Removes everything a VM fixture may have left, whatever state the test stopped in. */
export async function cleanupVmFixture(target: SuiteTarget, vm: VmFixture): Promise<void> {
  const errors: unknown[] = [];
  try {
    await target.backend().delete(vm.spec, vm.handles.at(-1));
  } catch (err) {
    errors.push(err);
  }
  // By hand, in case delete failed: processes we started (by pid + start time), then mounts.
  for (const h of vm.handles) {
    if (await isAlive({ pid: h.pid, startTime: h.pidStartTime })) process.kill(h.pid, "SIGKILL");
  }
  for (const pid of processesMentioning(vm.spec.dir)) {
    const st = await processStartTime(pid);
    if (st !== undefined) process.kill(pid, "SIGKILL");
  }
  await sleep(50);
  await unmountUnder(vm.dir.path).catch((err: unknown) => errors.push(err));
  vm.network?.remove();
  vm.cgroup.remove();
  vm.dir.remove();
  if (errors.length > 0) console.error(`[${target.label}] cleanup of ${vm.spec.vmId}:`, ...errors);
}

function consoleOf(vm: VmFixture): string {
  try {
    return fs.readFileSync(vm.spec.consoleLog, "utf8");
  } catch {
    return "(no console log)";
  }
}

/** Whether each process of the VM's handle sits in metald's cgroup (in cpuacct and memory). */
function inCgroup(pid: number, rel: string): boolean {
  const text = fs.readFileSync(`/proc/${pid}/cgroup`, "utf8");
  const want = ["cpuacct", "memory"];
  return want.every((c) =>
    text
      .split("\n")
      .some((l) => l.split(":")[1]?.split(",").includes(c) && (l.split(":")[2] ?? "").startsWith(`/${rel}`)),
  );
}

export function backendConformanceSuite(target: SuiteTarget): void {
  describe(`${target.label} backend`, () => {
    let work: { path: string; remove(): void };
    let assets: SuiteAssets;
    let vm: VmFixture;

    beforeAll(async () => {
      work = tempDir("kiln-bt-assets-");
      assets = await buildSuiteAssets(work.path, target.vm);
    });
    afterAll(() => work?.remove());

    beforeEach(async () => {
      vm = await newVmFixture(target, assets);
      onTestFailed(() => {
        console.error(
          `[${target.label}] ${vm.spec.vmId} in ${vm.spec.dir}\n--- console ---\n${consoleOf(vm)}--- end ---`,
        );
      });
    });
    afterEach(async () => {
      if (vm) await cleanupVmFixture(target, vm);
    });

    async function boot(b: Backend): Promise<BackendHandle> {
      await b.create(vm.spec);
      const h = await b.boot(vm.spec);
      vm.handles.push(h);
      return h;
    }

    async function answers(h: BackendHandle): Promise<string> {
      const alive = () => isAlive({ pid: h.pid, startTime: h.pidStartTime });
      const res = await waitForHttp(`${vm.url}/`, target.bootTimeoutMs, alive);
      expect(res, `no HTTP answer from ${vm.url} within ${target.bootTimeoutMs} ms`).toBeDefined();
      return res!.body;
    }

    it("boots the rootfs and answers HTTP; the shared base image is never written", async () => {
      const b = target.backend();
      expect((await b.probe()).available).toBe(true);
      const h = await boot(b);
      expect(h.backend).toBe(b.name);
      expect(await isAlive({ pid: h.pid, startTime: h.pidStartTime })).toBe(true);
      expect(inCgroup(h.pid, vm.cgroup.rel), "the VM's process is in metald's cgroup").toBe(true);

      expect(await answers(h)).toBe(INDEX_HTML);
      // The image's unprivileged user, the VM's hostname and the workload's environment.
      expect((await httpGet(`${vm.url}/cgi-bin/whoami`, 10_000))?.body.trim()).toBe(
        "uid=1000 gid=1000 host=kiln-suite greeting=hi",
      );
      if (b.stats) {
        const stats = await b.stats(vm.spec, h);
        expect(stats.cpuTimeNanos, "CPU time").toBeGreaterThan(0);
        expect(stats.memoryBytes, "memory").toBeGreaterThan(0);
      }
      // The workload wrote /www/boots.txt into the VM's own writable layer…
      expect((await httpGet(`${vm.url}/boots.txt`, 2_000))?.body).toBe("boot\n");
      await b.shutdown(vm.spec, h, { timeoutMs: target.shutdownTimeoutMs });
      // …and not into the image every VM of this build shares.
      expect(sha256File(vm.spec.rootfs)).toBe(assets.rootfs.sha256);
    });

    it("refuses to boot a VM that is already running, and leaves it running", async () => {
      const b = target.backend();
      const h = await boot(b);
      await answers(h);
      await expect(b.boot(vm.spec)).rejects.toBeInstanceOf(FailedPreconditionError);
      expect(await isAlive({ pid: h.pid, startTime: h.pidStartTime })).toBe(true);
      expect((await httpGet(`${vm.url}/`, 5_000))?.body).toBe(INDEX_HTML);
    });

    it("pause stops the workload answering and resume brings it back", async () => {
      const b = target.backend();
      const h = await boot(b);
      await answers(h);
      await b.pause(vm.spec, h);
      expect(await httpOutcome(`${vm.url}/`, 1_000), "a request to a paused VM does not complete").toBe(
        "timeout",
      );
      expect(await target.backend().adopt(vm.spec, h)).toBe("paused");
      await b.resume(vm.spec, h);
      expect((await httpGet(`${vm.url}/`, 5_000))?.body).toBe(INDEX_HTML);
      expect(await target.backend().adopt(vm.spec, h)).toBe("running");
    });

    it("reboot runs the workload again on the same writable layer", async () => {
      const b = target.backend();
      const h = await boot(b);
      await answers(h);
      const h2 = await b.reboot(vm.spec, h);
      vm.handles.push(h2);
      await answers(h2);
      expect((await httpGet(`${vm.url}/boots.txt`, 2_000))?.body).toBe("boot\nboot\n");
    });

    it("shutdown is graceful, leaves no process, and the VM boots again with its data (also after its mounts went)", async () => {
      const b = target.backend();
      const h = await boot(b);
      await answers(h);
      const { forced } = await b.shutdown(vm.spec, h, { timeoutMs: target.shutdownTimeoutMs });
      expect(forced, "the workload stopped on the graceful signal").toBe(false);
      expect(await isAlive({ pid: h.pid, startTime: h.pidStartTime })).toBe(false);
      expect(processesMentioning(vm.spec.dir)).toEqual([]);
      expect(await target.backend().adopt(vm.spec, h)).toBe("gone");

      // As after a host reboot: every mount is gone, the VM's files stay; boot mounts again.
      await unmountUnder(vm.dir.path);
      const h2 = await b.boot(vm.spec);
      vm.handles.push(h2);
      await answers(h2);
      expect((await httpGet(`${vm.url}/boots.txt`, 2_000))?.body).toBe("boot\nboot\n");
    });

    it("delete leaves nothing behind: no process, mount, loop device, runtime state or cgroup", async () => {
      const b = target.backend();
      const before = cgroupDirsNamed(vm.cgroup.rel);
      const h = await boot(b);
      await answers(h);
      await b.delete(vm.spec, h);

      expect(await isAlive({ pid: h.pid, startTime: h.pidStartTime })).toBe(false);
      expect(processesMentioning(vm.spec.dir)).toEqual([]);
      for (const d of vm.cgroup.dirs) expect(cgroupPids(d), `${d} holds no process`).toEqual([]);
      expect(await mountsUnder(vm.dir.path)).toEqual([]); // the VM and the shared image mounts
      expect(execFileSync("losetup", ["-j", vm.spec.rootfs], { encoding: "utf8" }).trim()).toBe("");
      expect(fs.readdirSync(vm.spec.dir), "the VM directory is empty again").toEqual([]);
      expect(cgroupDirsNamed(vm.cgroup.rel), "only metald's own cgroup directories remain").toEqual(before);
      expect(sha256File(vm.spec.rootfs)).toBe(assets.rootfs.sha256);
      // Idempotent, also without a handle.
      await b.delete(vm.spec, h);
      await b.delete(vm.spec);
    });

    it.skipIf(target.network === "user")(
      "delete cleans up even when the VM's network namespace was removed first",
      async () => {
        const b = target.backend();
        const h = await boot(b);
        await answers(h);
        vm.network!.remove();
        await b.delete(vm.spec, h);
        expect(processesMentioning(vm.spec.dir)).toEqual([]);
        for (const d of vm.cgroup.dirs) expect(cgroupPids(d), `${d} holds no process`).toEqual([]);
        expect(await mountsUnder(vm.dir.path)).toEqual([]); // the VM and the shared image mounts
        expect(fs.readdirSync(vm.spec.dir)).toEqual([]);
      },
    );

    it("a fresh backend adopts a running VM after a restart, and reports it gone after kill -9", async () => {
      const h = await boot(target.backend());
      await answers(h);
      const restarted = target.backend();
      expect(await restarted.adopt(vm.spec, h)).toBe("running");
      // Still controllable through the new object.
      await restarted.pause(vm.spec, h);
      await restarted.resume(vm.spec, h);
      expect((await httpGet(`${vm.url}/`, 5_000))?.body).toBe(INDEX_HTML);

      process.kill(h.pid, "SIGKILL");
      await sleep(200);
      expect(await restarted.adopt(vm.spec, h)).toBe("gone");
      await restarted.delete(vm.spec, h);
      expect(processesMentioning(vm.spec.dir)).toEqual([]);
      expect(await mountsUnder(vm.dir.path)).toEqual([]); // the VM and the shared image mounts
      expect(fs.readdirSync(vm.spec.dir)).toEqual([]);
    });
  });
}

/** Every directory named like the test cgroup's path (or below it) in any cgroup hierarchy. */
function cgroupDirsNamed(rel: string): string[] {
  const out: string[] = [];
  for (const root of fs.readdirSync("/sys/fs/cgroup")) {
    const walk = (dir: string) => {
      if (!fs.existsSync(dir)) return;
      out.push(dir);
      for (const e of fs.readdirSync(dir, { withFileTypes: true }))
        if (e.isDirectory()) walk(path.join(dir, e.name));
    };
    walk(path.join("/sys/fs/cgroup", root, rel));
  }
  return out.sort();
}

/** `runs` boots of a fresh VM each: boot() called → first HTTP 200 from the workload (ms); create is not timed. */
export async function measureBootToHttp(
  target: SuiteTarget,
  assets: SuiteAssets,
  runs = 3,
): Promise<number[]> {
  const times: number[] = [];
  for (let i = 0; i < runs; i++) {
    const vm = await newVmFixture(target, assets);
    try {
      const b = target.backend();
      await b.create(vm.spec);
      const started = performance.now();
      const h = await b.boot(vm.spec);
      vm.handles.push(h);
      const res = await waitForHttp(`${vm.url}/`, target.bootTimeoutMs);
      if (!res)
        throw new Error(
          `${target.label}: no HTTP answer within ${target.bootTimeoutMs} ms\n${consoleOf(vm)}`,
        );
      times.push(performance.now() - started);
    } finally {
      await cleanupVmFixture(target, vm);
    }
  }
  return times;
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}
