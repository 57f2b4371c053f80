import fs from "node:fs/promises";
import path from "node:path";
import { InvalidArgumentError, TENANT_ID_PATTERN, type TenantLimits, UnavailableError } from "@kiln/kit";

/**
 * Per-VM cgroups (v1 hierarchies, as on Kiln's hosts). Path convention, shared with the backends:
 *
 *     /sys/fs/cgroup/<controller>/<root>/<tenant>/<vm>        root = "kiln" by default
 *
 * in each of cpu, cpuacct, memory, pids, freezer and blkio. `VmCgroup.relativePath`
 * (`kiln/<tenant>/<vm>`) is what a backend hands its runtime: runc's and runsc's `cgroupsPath`
 * (`/kiln/<tenant>/<vm>` in config.json), the jailer's `--cgroup` parent — or it adds the VMM's
 * pid itself with `add(pid)`. metald creates the cgroup and writes its limits before the
 * backend starts anything, and removes it after the VM is deleted.
 */
export const CONTROLLERS = ["cpu", "cpuacct", "memory", "pids", "freezer", "blkio"] as const;
export type Controller = (typeof CONTROLLERS)[number];

export interface CgroupLimits {
  /** CFS period (µs). */
  cpuPeriodUs: number;
  /** CFS quota (µs per period) = vCPUs × period; -1 = unlimited. */
  cpuQuotaUs: number;
  /** Relative weight under contention (1024 per vCPU). */
  cpuShares: number;
  /** memory.limit_in_bytes (and memsw, so swap cannot extend it); 0 = unlimited. */
  memoryLimitBytes: number;
  /** pids.max; 0 = unlimited. */
  pidsMax: number;
}

export interface VmResources {
  vcpus: number;
  memoryBytes: number;
}

export interface LimitOptions {
  /** Added to the VM's memory for the VMM's own use (e.g. QEMU's ~64 MiB); default 0. */
  memoryOverheadBytes?: number;
  /** Processes and threads the VM may have (default 1024: fork bombs stop there). */
  pidsMax?: number;
}

export const CPU_PERIOD_US = 100_000;
export const DEFAULT_PIDS_MAX = 1024;

/**
 * The cgroup limits for a VM, checked against its tenant's tier: asking for more vCPUs or memory
 * than the tier allows per VM is refused, never silently reduced.
 */
export function cgroupLimits(vm: VmResources, tenant: TenantLimits, opts: LimitOptions = {}): CgroupLimits {
  if (!Number.isInteger(vm.vcpus) || vm.vcpus < 1) {
    throw new InvalidArgumentError(`vcpu count ${vm.vcpus} is invalid: use a whole number ≥ 1`, {
      field: "config.cpu.vcpu_count",
    });
  }
  if (tenant.maxVcpusPerVm > 0 && vm.vcpus > tenant.maxVcpusPerVm) {
    throw new InvalidArgumentError(
      `vcpu count ${vm.vcpus} exceeds the tenant's limit of ${tenant.maxVcpusPerVm} vCPU(s) per VM: ask for fewer or upgrade the tier`,
      { field: "config.cpu.vcpu_count" },
    );
  }
  if (!Number.isInteger(vm.memoryBytes) || vm.memoryBytes <= 0) {
    throw new InvalidArgumentError(
      `memory size ${vm.memoryBytes} is invalid: use a positive number of bytes`,
      {
        field: "config.memory.size_bytes",
      },
    );
  }
  if (tenant.maxMemoryBytesPerVm > 0 && vm.memoryBytes > tenant.maxMemoryBytesPerVm) {
    throw new InvalidArgumentError(
      `memory size ${vm.memoryBytes} bytes exceeds the tenant's limit of ${tenant.maxMemoryBytesPerVm} bytes per VM: ask for less or upgrade the tier`,
      { field: "config.memory.size_bytes" },
    );
  }
  return {
    cpuPeriodUs: CPU_PERIOD_US,
    cpuQuotaUs: vm.vcpus * CPU_PERIOD_US,
    cpuShares: 1024 * vm.vcpus,
    memoryLimitBytes: vm.memoryBytes + (opts.memoryOverheadBytes ?? 0),
    pidsMax: opts.pidsMax ?? DEFAULT_PIDS_MAX,
  };
}

export type FreezerState = "THAWED" | "FREEZING" | "FROZEN";

export interface VmCgroup {
  readonly tenantId: string;
  readonly vmId: string;
  /** `<root>/<tenant>/<vm>`: the path backends pass to their runtime. */
  readonly relativePath: string;
  /** Absolute directory in one controller's hierarchy. */
  path(controller: Controller): string;
  /** Writes limits (also to change them later). */
  apply(limits: CgroupLimits): Promise<void>;
  /** Moves a process (and its future children) into the cgroup in every controller. */
  add(pid: number): Promise<void>;
  /** Processes in the cgroup and its child cgroups (union over the controllers). */
  pids(): Promise<number[]>;
  freeze(): Promise<void>;
  thaw(): Promise<void>;
  freezerState(): Promise<FreezerState>;
  /** Kills whatever still runs in it or in child cgroups, then removes its directories bottom-up. Idempotent. */
  remove(): Promise<void>;
  exists(): Promise<boolean>;
}

export interface CgroupEntry {
  tenantId: string;
  vmId: string;
  relativePath: string;
  controllers: Controller[];
}

export interface CgroupManager {
  readonly root: string;
  /** Creates (or reuses) the VM's cgroup in every controller and writes its limits. */
  create(tenantId: string, vmId: string, limits: CgroupLimits): Promise<VmCgroup>;
  /** A handle to the VM's cgroup, without touching the file system. */
  get(tenantId: string, vmId: string): VmCgroup;
  /** Every VM cgroup under the root, in any controller (leak checks, recovery). */
  list(): Promise<CgroupEntry[]>;
}

export interface CgroupManagerOptions {
  /** Directory under each controller (default `kiln`). */
  root?: string;
  /** Where the v1 controllers are mounted (default `/sys/fs/cgroup`). */
  mountPoint?: string;
  /** How long remove() waits for killed processes to leave (default 5 s). */
  removeTimeoutMs?: number;
}

const NAME = /^[A-Za-z0-9_-]{1,64}$/;

export function createCgroupManager(opts: CgroupManagerOptions = {}): CgroupManager {
  const root = opts.root ?? "kiln";
  const mountPoint = opts.mountPoint ?? "/sys/fs/cgroup";
  const removeTimeoutMs = opts.removeTimeoutMs ?? 5_000;
  if (
    !/^[A-Za-z0-9_.-]+(\/[A-Za-z0-9_.-]+)*$/.test(root) ||
    root.split("/").some((p) => p === ".." || p === ".")
  ) {
    throw new InvalidArgumentError(
      `cgroup root ${JSON.stringify(root)} must be a relative path such as "kiln"`,
    );
  }

  function get(tenantId: string, vmId: string): VmCgroup {
    if (!TENANT_ID_PATTERN.test(tenantId)) {
      throw new InvalidArgumentError(`tenant id ${JSON.stringify(tenantId)} is not a DNS label`, {
        field: "tenant_id",
      });
    }
    if (!NAME.test(vmId)) {
      throw new InvalidArgumentError(
        `vm id ${JSON.stringify(vmId)} is not usable as a cgroup name: use [A-Za-z0-9_-]`,
        {
          field: "vm_id",
        },
      );
    }
    const relativePath = `${root}/${tenantId}/${vmId}`;
    const dir = (c: Controller) => path.join(mountPoint, c, relativePath);
    const file = (c: Controller, name: string) => path.join(dir(c), name);

    // Runtimes (runc, runsc, the jailer) given this cgroup as parent make their own child
    // cgroups in it: processes and directories are looked for in the whole subtree.
    async function pids(): Promise<number[]> {
      const all = new Set<number>();
      for (const c of CONTROLLERS) {
        for (const d of await subtree(dir(c))) {
          const text = await fs.readFile(path.join(d, "cgroup.procs"), "utf8").catch(() => "");
          for (const line of text.split("\n")) if (line.trim()) all.add(Number(line));
        }
      }
      return [...all];
    }

    async function freezerState(): Promise<FreezerState> {
      return (await fs.readFile(file("freezer", "freezer.state"), "utf8")).trim() as FreezerState;
    }

    async function setFreezer(target: "FROZEN" | "THAWED"): Promise<void> {
      await fs.writeFile(file("freezer", "freezer.state"), target);
      // FREEZING is transitional: tasks in uninterruptible sleep freeze when they wake.
      const deadline = Date.now() + 5_000;
      for (;;) {
        const state = await freezerState();
        if (state === target) return;
        if (Date.now() > deadline) {
          throw new UnavailableError(
            `cgroup ${relativePath} is still ${state} 5 s after writing ${target}: retry`,
          );
        }
        await fs.writeFile(file("freezer", "freezer.state"), target);
        await sleep(5);
      }
    }

    async function applyMemory(limits: CgroupLimits): Promise<void> {
      const mem = limits.memoryLimitBytes > 0 ? String(limits.memoryLimitBytes) : "-1";
      // memsw (memory + swap) must stay ≥ the memory limit: when growing, raise memsw first;
      // when shrinking, lower the memory limit first.
      const memsw = file("memory", "memory.memsw.limit_in_bytes");
      const hasMemsw = await fs.access(memsw).then(
        () => true,
        () => false,
      );
      const current = Number((await fs.readFile(file("memory", "memory.limit_in_bytes"), "utf8")).trim());
      const target = limits.memoryLimitBytes > 0 ? limits.memoryLimitBytes : Number.POSITIVE_INFINITY;
      if (hasMemsw && target > current) await fs.writeFile(memsw, mem);
      await fs.writeFile(file("memory", "memory.limit_in_bytes"), mem);
      if (hasMemsw) await fs.writeFile(memsw, mem);
    }

    const exists = () =>
      fs.access(dir("freezer")).then(
        () => true,
        () => false,
      );

    return {
      tenantId,
      vmId,
      relativePath,
      path: dir,
      exists,
      pids,
      freezerState,
      async apply(limits) {
        // Controllers are independent: each one's files are written in order, the four at once.
        await Promise.all([
          (async () => {
            await fs.writeFile(file("cpu", "cpu.cfs_period_us"), String(limits.cpuPeriodUs));
            await fs.writeFile(file("cpu", "cpu.cfs_quota_us"), String(limits.cpuQuotaUs));
            await fs.writeFile(file("cpu", "cpu.shares"), String(limits.cpuShares));
          })(),
          applyMemory(limits),
          fs.writeFile(file("pids", "pids.max"), limits.pidsMax > 0 ? String(limits.pidsMax) : "max"),
          enableIoAccounting(dir("blkio")),
        ]);
      },
      async add(pid) {
        for (const c of CONTROLLERS) await fs.writeFile(file(c, "cgroup.procs"), String(pid));
      },
      freeze: () => setFreezer("FROZEN"),
      thaw: () => setFreezer("THAWED"),
      async remove() {
        const present: Controller[] = [];
        for (const c of CONTROLLERS) if (await isDir(dir(c))) present.push(c);
        if (present.length === 0) return;
        // Freeze first so nothing forks while being killed; SIGKILL lands on thaw.
        const freezable = present.includes("freezer");
        if (freezable) await setFreezer("FROZEN").catch(() => undefined);
        for (const pid of await pids()) {
          try {
            process.kill(pid, "SIGKILL");
          } catch {
            // already gone
          }
        }
        if (freezable) await setFreezer("THAWED").catch(() => undefined);
        const deadline = Date.now() + removeTimeoutMs;
        for (;;) {
          const left = await pids();
          if (left.length === 0) break;
          if (Date.now() > deadline) {
            throw new UnavailableError(
              `cgroup ${relativePath} still holds processes ${left.join(", ")} ${removeTimeoutMs} ms after SIGKILL: retry the delete`,
            );
          }
          for (const pid of left) {
            try {
              process.kill(pid, "SIGKILL");
            } catch {
              // gone meanwhile
            }
          }
          await sleep(10);
        }
        for (const c of present) {
          // Deepest first: a cgroup directory can only be removed once it has no children.
          for (const d of (await subtree(dir(c))).reverse()) await rmdirRetry(d);
          // The tenant directory goes with its last VM; the root stays.
          await fs.rmdir(path.join(mountPoint, c, root, tenantId)).catch(() => undefined);
        }
      },
    };
  }

  return {
    root,
    get,
    async create(tenantId, vmId, limits) {
      const cg = get(tenantId, vmId);
      await Promise.all(CONTROLLERS.map((c) => fs.mkdir(cg.path(c), { recursive: true })));
      await cg.apply(limits);
      return cg;
    },
    async list() {
      const found = new Map<string, CgroupEntry>();
      for (const c of CONTROLLERS) {
        const base = path.join(mountPoint, c, root);
        for (const tenantId of await subdirs(base)) {
          for (const vmId of await subdirs(path.join(base, tenantId))) {
            const relativePath = `${root}/${tenantId}/${vmId}`;
            const entry = found.get(relativePath) ?? { tenantId, vmId, relativePath, controllers: [] };
            entry.controllers.push(c);
            found.set(relativePath, entry);
          }
        }
      }
      return [...found.values()].sort((a, b) => a.relativePath.localeCompare(b.relativePath));
    },
  };
}

/**
 * blkio.throttle.io_service_bytes only counts I/O on devices that have a throttle rule in the
 * cgroup (measured: 0 bytes after 16 MiB of direct I/O without one, exact with one), so every
 * whole disk gets a rule too high to ever bite (1 TiB/s). Devices that refuse rules are skipped.
 */
const NO_LIMIT_BPS = String(2 ** 40);

async function enableIoAccounting(blkioDir: string): Promise<void> {
  for (const dev of await blockDevices()) {
    for (const f of ["blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device"]) {
      await fs.writeFile(path.join(blkioDir, f), `${dev} ${NO_LIMIT_BPS}`).catch(() => undefined);
    }
  }
}

let devicesCache: Promise<string[]> | undefined;

/** major:minor of the host's whole disks (/sys/block without loop, ram and zram devices). */
function blockDevices(): Promise<string[]> {
  devicesCache ??= (async () => {
    const names = await fs.readdir("/sys/block").catch(() => [] as string[]);
    const devs: string[] = [];
    for (const name of names) {
      if (/^(loop|ram|zram)/.test(name)) continue;
      const dev = await fs.readFile(path.join("/sys/block", name, "dev"), "utf8").catch(() => "");
      if (/^\d+:\d+$/.test(dev.trim())) devs.push(dev.trim());
    }
    return devs;
  })();
  return devicesCache;
}

/** `dir` and every cgroup directory below it, parents before children; [] when absent. */
async function subtree(dir: string): Promise<string[]> {
  if (!(await isDir(dir))) return [];
  const out = [dir];
  for (let i = 0; i < out.length; i++) {
    for (const name of await subdirs(out[i]!)) out.push(path.join(out[i]!, name));
  }
  return out;
}

async function subdirs(dir: string): Promise<string[]> {
  const entries = await fs.readdir(dir, { withFileTypes: true }).catch(() => []);
  return entries.filter((e) => e.isDirectory()).map((e) => e.name);
}

async function isDir(dir: string): Promise<boolean> {
  return fs.stat(dir).then(
    (s) => s.isDirectory(),
    () => false,
  );
}

/** rmdir of a cgroup can briefly fail with EBUSY right after its last task exited. */
async function rmdirRetry(dir: string): Promise<void> {
  for (let i = 0; ; i++) {
    try {
      await fs.rmdir(dir);
      return;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENOENT") return;
      if (code !== "EBUSY" || i >= 50)
        throw new UnavailableError(`cannot remove cgroup ${dir}: ${code}; retry the delete`, { cause: err });
      await sleep(10);
    }
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
