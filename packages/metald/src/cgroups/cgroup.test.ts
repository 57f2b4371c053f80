import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs/promises";
import { TIER_LIMITS } from "@kiln/kit";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import {
  type CgroupLimits,
  CONTROLLERS,
  cgroupLimits,
  createCgroupManager,
  type VmCgroup,
} from "./cgroup.js";

const MiB = 1024 ** 2;

describe("cgroupLimits", () => {
  it("derives CPU quota, shares, memory and pids from the VM config", () => {
    expect(
      cgroupLimits({ vcpus: 2, memoryBytes: 256 * MiB }, TIER_LIMITS.pro, { memoryOverheadBytes: 64 * MiB }),
    ).toEqual({
      cpuPeriodUs: 100_000,
      cpuQuotaUs: 200_000,
      cpuShares: 2048,
      memoryLimitBytes: 320 * MiB,
      pidsMax: 1024,
    });
  });

  it("refuses more than the tier allows per VM, naming the field", () => {
    expect(() => cgroupLimits({ vcpus: 2, memoryBytes: 128 * MiB }, TIER_LIMITS.free)).toThrow(
      /vcpu count 2 exceeds the tenant's limit of 1 vCPU\(s\) per VM/,
    );
    expect(() => cgroupLimits({ vcpus: 1, memoryBytes: 1024 * MiB }, TIER_LIMITS.free)).toThrow(
      /memory size 1073741824 bytes exceeds the tenant's limit of 536870912 bytes per VM/,
    );
    // 0 means unlimited (dedicated tier).
    expect(cgroupLimits({ vcpus: 64, memoryBytes: 512 * 1024 * MiB }, TIER_LIMITS.dedicated).cpuQuotaUs).toBe(
      6_400_000,
    );
  });
});

describe("VM cgroups (v1)", () => {
  // A root of its own so parallel test files and a running metald never see these.
  const manager = createCgroupManager({ root: `kiln-test-${randomBytes(3).toString("hex")}` });
  const children: ChildProcess[] = [];
  const made: VmCgroup[] = [];
  const limits: CgroupLimits = cgroupLimits({ vcpus: 1, memoryBytes: 64 * MiB }, TIER_LIMITS.free, {
    pidsMax: 64,
  });

  afterEach(async () => {
    for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
    for (const cg of made.splice(0)) await cg.remove();
  });
  afterAll(async () => {
    for (const e of await manager.list()) await manager.get(e.tenantId, e.vmId).remove();
    for (const c of CONTROLLERS) await fs.rmdir(`/sys/fs/cgroup/${c}/${manager.root}`).catch(() => undefined);
  });

  async function create(tenant = "acme"): Promise<VmCgroup> {
    const cg = await manager.create(tenant, `vm_${randomBytes(4).toString("hex")}`, limits);
    made.push(cg);
    return cg;
  }

  function start(script: string): ChildProcess {
    const child = spawn(process.execPath, ["-e", script], { stdio: ["pipe", "ignore", "ignore"] });
    children.push(child);
    return child;
  }

  const read = (cg: VmCgroup, c: (typeof CONTROLLERS)[number], file: string) =>
    fs.readFile(`${cg.path(c)}/${file}`, "utf8").then((s) => s.trim());

  it("creates kiln-style paths in every controller and writes the limits", async () => {
    const cg = await create();
    expect(cg.relativePath).toBe(`${manager.root}/acme/${cg.vmId}`);
    for (const c of CONTROLLERS) expect((await fs.stat(cg.path(c))).isDirectory()).toBe(true);
    expect(await read(cg, "cpu", "cpu.cfs_quota_us")).toBe("100000");
    expect(await read(cg, "cpu", "cpu.cfs_period_us")).toBe("100000");
    expect(await read(cg, "memory", "memory.limit_in_bytes")).toBe(String(64 * MiB));
    expect(await read(cg, "pids", "pids.max")).toBe("64");
    expect((await manager.list()).map((e) => e.relativePath)).toContain(cg.relativePath);
  });

  it("adds a process to every controller", async () => {
    const cg = await create();
    const child = start("setInterval(() => {}, 1000)");
    await cg.add(child.pid!);
    expect(await cg.pids()).toEqual([child.pid]);
    for (const c of CONTROLLERS) expect(await read(cg, c, "cgroup.procs")).toBe(String(child.pid));
  });

  it("freeze stops a busy process's CPU counter and thaw resumes it", async () => {
    const cg = await create();
    const child = start("for (;;) {}");
    await cg.add(child.pid!);
    const usage = async () => BigInt(await read(cg, "cpuacct", "cpuacct.usage"));
    await sleep(200);
    await cg.freeze();
    expect(await cg.freezerState()).toBe("FROZEN");
    const frozenAt = await usage();
    await sleep(300);
    expect(await usage()).toBe(frozenAt);
    await cg.thaw();
    expect(await cg.freezerState()).toBe("THAWED");
    await sleep(300);
    // At least 50 ms of CPU in 300 ms (the quota allows one core; the machine has two, shared).
    expect((await usage()) - frozenAt).toBeGreaterThan(50_000_000n);
  });

  it("kills a memory hog at the memory limit", async () => {
    const cg = await create();
    // Waits for a line on stdin, so it joins the cgroup before allocating.
    const child = start(
      "process.stdin.once('data', () => { const a = []; for (;;) a.push(Buffer.alloc(1 << 20, 1)); })",
    );
    const exited = new Promise<NodeJS.Signals | null>((resolve) =>
      child.once("exit", (_code, signal) => resolve(signal)),
    );
    await cg.add(child.pid!);
    child.stdin!.write("go\n");
    expect(await exited).toBe("SIGKILL");
    expect(await read(cg, "memory", "memory.oom_control")).toMatch(/oom_kill [1-9]/);
  });

  it("enforces pids.max", async () => {
    const cg = await create();
    const child = start("setInterval(() => {}, 1000)");
    await cg.add(child.pid!);
    await cg.apply({ ...limits, pidsMax: 1 });
    const forked = spawnInto(cg);
    await expect(forked).rejects.toThrow(/EAGAIN|Resource temporarily unavailable|fork/i);
  });

  it("remove kills what still runs, leaves nothing behind, and is idempotent", async () => {
    const cg = await create("other");
    const child = start("setInterval(() => {}, 1000)");
    const exited = new Promise((resolve) => child.once("exit", resolve));
    await cg.add(child.pid!);
    await cg.freeze(); // removal must work on a frozen VM too
    await cg.remove();
    await exited;
    expect(await cg.exists()).toBe(false);
    for (const c of CONTROLLERS) {
      await expect(fs.stat(cg.path(c))).rejects.toMatchObject({ code: "ENOENT" });
      // The tenant directory went with its last VM.
      await expect(fs.stat(`/sys/fs/cgroup/${c}/${manager.root}/other`)).rejects.toMatchObject({
        code: "ENOENT",
      });
    }
    await cg.remove();
    expect((await manager.list()).map((e) => e.relativePath)).not.toContain(cg.relativePath);
  });

  it("remove also clears child cgroups a runtime made below the VM's", async () => {
    const cg = await create();
    // What runc does with cgroupsPath under the VM cgroup: a child in every controller.
    for (const c of CONTROLLERS) await fs.mkdir(`${cg.path(c)}/runc-child`);
    const child = start("setInterval(() => {}, 1000)");
    const exited = new Promise((resolve) => child.once("exit", resolve));
    for (const c of CONTROLLERS)
      await fs.writeFile(`${cg.path(c)}/runc-child/cgroup.procs`, String(child.pid));
    expect(await cg.pids()).toEqual([child.pid]);
    // The VM's limits and counters cover the child (v1 hierarchies are hierarchical).
    expect(await read(cg, "pids", "pids.current")).toBe("1");
    await cg.remove();
    await exited;
    expect(await cg.exists()).toBe(false);
  });

  it("refuses ids that would escape the hierarchy", () => {
    expect(() => manager.get("../etc", "vm_1")).toThrow(/tenant id "..\/etc" is not a DNS label/);
    expect(() => manager.get("acme", "../../x")).toThrow(/not usable as a cgroup name/);
  });
});

/** Makes a process in the cgroup (through a shell moved into it) try to fork. */
function spawnInto(cg: VmCgroup): Promise<void> {
  return new Promise((resolve, reject) => {
    // The shell joins the cgroup itself, then tries to start a child: with pids.max reached, fork fails.
    const sh = spawn("sh", ["-c", `echo $$ > ${cg.path("pids")}/cgroup.procs && /bin/true`], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    let err = "";
    sh.stderr.on("data", (d) => {
      err += d;
    });
    sh.once("exit", (code) => (code === 0 ? resolve() : reject(new Error(`exit ${code}: ${err}`))));
  });
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
