import { createHash } from "node:crypto";
import fs from "node:fs/promises";
import path from "node:path";
import { FailedPreconditionError, InvalidArgumentError, pathExists } from "@kiln/kit";
import {
  type Backend,
  type BackendHandle,
  type BackendStats,
  NotImplementedError,
  type ProbeResult,
  type VmSpec,
} from "../backend.js";
import { cgroupHierarchies, missingCgroupDirs, normalizeCgroupPath, removeCgroupDirs } from "../cgroups.js";
import { commandVersion, runCommand } from "../command.js";
import {
  identify,
  isAlive,
  killAndWait,
  type ProcessIdentity,
  processIo,
  processUsage,
  readProcessRecord,
  sleep,
  spawnDetached,
  waitForExit,
  writeProcessRecord,
} from "../process.js";
import { kvmUsable } from "../qemu/cmdline.js";
import {
  describeInstance,
  type FirecrackerConnection,
  firecrackerConnection,
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
import { chrootDir, JAILED, jailerArgs, jailerId, linkIntoChroot, ownedFileInChroot } from "./jailer.js";

/** Starts the jailer; tests substitute a recording fake of Firecracker's API. */
export type JailerLauncher = (
  file: string,
  args: string[],
  opts: { logFile: string },
) => Promise<{ pid: number }>;

export interface FirecrackerBackendOptions {
  firecrackerBinary?: string;
  jailerBinary?: string;
  /** The unprivileged uid/gid the VM's firecracker runs as (default: one per VM, see jailUser). */
  jailUser?: (spec: VmSpec) => { uid: number; gid: number };
  launch?: JailerLauncher;
  /** Whether KVM can be used (default: /dev/kvm opens and the CPU has VMX/SVM). */
  kvmAvailable?: () => Promise<boolean>;
  apiTimeoutMs?: number;
  startTimeoutMs?: number;
}

/**
 * A uid/gid per VM from 900000–999999, derived from the VM id, so two VMs' processes cannot
 * signal or ptrace each other. Derived, not allocated: two ids may collide (rarely); an operator
 * who needs a guarantee passes `jailUser` backed by an allocator.
 */
export function defaultJailUser(spec: VmSpec): { uid: number; gid: number } {
  const h = createHash("sha256").update(`jail:${spec.vmId}`).digest().readUInt32BE(0);
  const id = 900_000 + (h % 100_000);
  return { uid: id, gid: id };
}

/** Files of one VM under `<spec.dir>/firecracker/`. */
export function firecrackerLayout(dir: string) {
  const root = path.join(dir, "firecracker");
  return {
    root,
    /** The VM's own copy of the base image (reflinked where the filesystem can). */
    rootfs: path.join(root, "rootfs.ext4"),
    chrootBase: path.join(root, "jail"),
    record: path.join(root, "process.json"),
    cgroupsCreated: path.join(root, "cgroups-created.json"),
  };
}

const CPU_PERIOD_US = 100_000;
/** Memory for Firecracker itself on top of the guest's (its own overhead is a few MiB). */
const VMM_OVERHEAD_BYTES = 64 << 20;
const REBOOT_GRACE_MS = 10_000;

/**
 * Firecracker microVMs, launched through the jailer (chroot, uid/gid drop, cgroups, netns) and
 * driven over the API socket. Needs /dev/kvm, so it cannot run on Kiln's build machines; its
 * requests are checked against Firecracker's published OpenAPI definition instead.
 *
 * - Disk: the VM's own copy of the base image (`cp --reflink=auto`), hard-linked into the chroot
 *   and owned by the jail's uid; kernel and initramfs hard-linked read-only.
 * - Network: the tap device in the VM's namespace (the jailer joins it); the guest address goes on
 *   the kernel command line for the VM init. There is no user-mode networking.
 * - Console: the serial port writes to spec.consoleLog, hard-linked into the chroot (handed to the
 *   jail's uid so Firecracker can open it).
 * - Control: PATCH /vm (pause), SendCtrlAltDel (graceful: the init stops the workload and powers
 *   off, which ends Firecracker), SIGKILL (forced). Reboot is shutdown + boot: Firecracker exits
 *   when its guest reboots.
 */
export function createFirecrackerBackend(opts: FirecrackerBackendOptions = {}): Backend {
  const jailerBinary = opts.jailerBinary ?? "jailer";
  const jailUser = opts.jailUser ?? defaultJailUser;
  const kvmAvailable = opts.kvmAvailable ?? (() => kvmUsable());
  const startTimeoutMs = opts.startTimeoutMs ?? 10_000;
  const launch: JailerLauncher =
    opts.launch ??
    // Not a new session: the jailer calls setsid() itself (--daemonize) and fails as a group leader.
    ((file, args, o) => spawnDetached(file, args, { logFile: o.logFile, newSession: false }));

  async function firecrackerPath(): Promise<string> {
    const bin = opts.firecrackerBinary ?? "firecracker";
    if (bin.includes("/")) return path.resolve(bin);
    for (const dir of (process.env.PATH ?? "/usr/local/bin:/usr/bin").split(":")) {
      const p = path.join(dir, bin);
      if (
        await fs.access(p, fs.constants.X_OK).then(
          () => true,
          () => false,
        )
      )
        return p;
    }
    throw new FailedPreconditionError(
      `${bin} is not installed (not on PATH); the jailer needs its absolute path`,
    );
  }

  function check(spec: VmSpec): void {
    if (!spec.kernel)
      throw new InvalidArgumentError("the firecracker backend needs a kernel (vmlinux)", { field: "kernel" });
    if (!Number.isInteger(spec.vcpus) || spec.vcpus < 1 || spec.vcpus > 32) {
      throw new InvalidArgumentError(`vcpus ${spec.vcpus} must be 1–32 for Firecracker`, { field: "vcpus" });
    }
    if (spec.ports.length > 0 && !spec.network) {
      throw new NotImplementedError(
        "firecracker",
        "forward ports without a network",
        "Firecracker has no user-mode networking; attach the VM to a network (spec.network with a tap device)",
      );
    }
    if (spec.network && !spec.network.tapName) {
      throw new InvalidArgumentError(
        "with a network, the firecracker backend needs the namespace's tap device",
        {
          field: "network.tapName",
        },
      );
    }
    if (!/^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$/.test(spec.hostname)) {
      throw new InvalidArgumentError(`hostname ${JSON.stringify(spec.hostname)} must be a DNS label`, {
        field: "hostname",
      });
    }
    spec.kernelArgs.forEach((a, i) => {
      if (a === "" || /[\s"\0]/.test(a)) {
        throw new InvalidArgumentError(`${JSON.stringify(a)} must be one word without whitespace or quotes`, {
          field: `kernelArgs[${i}]`,
        });
      }
    });
  }

  async function prepare(spec: VmSpec) {
    check(spec);
    const l = firecrackerLayout(spec.dir);
    await fs.mkdir(l.root, { recursive: true });
    if (!(await pathExists(l.rootfs))) {
      const tmp = `${l.rootfs}.tmp`;
      await runCommand("cp", ["--reflink=auto", "--sparse=always", path.resolve(spec.rootfs), tmp], {
        timeoutMs: 600_000,
      });
      await fs.chmod(tmp, 0o600);
      await fs.rename(tmp, l.rootfs);
    }
    return l;
  }

  /** Kernel command line: Kiln's VM init reads the hostname and network from it. */
  function bootArgs(spec: VmSpec): string {
    const net = spec.network;
    return [
      "console=ttyS0",
      "reboot=k",
      "panic=1",
      "pci=off",
      "quiet",
      // Ctrl-Alt-Del → SIGINT to the init (a graceful stop), not an immediate reboot.
      "sysctl.kernel.ctrl-alt-del=0",
      ...(spec.initrd ? [] : ["init=/.kiln/init"]),
      `kiln.hostname=${spec.hostname}`,
      ...(net
        ? [
            `kiln.ip=${net.guestIp}/${net.prefixLen}`,
            `kiln.gw=${net.gateway}`,
            ...(net.dns ? [`kiln.dns=${net.dns}`] : []),
          ]
        : []),
      ...spec.kernelArgs,
    ].join(" ");
  }

  /** cgroup settings for the jailer: the VM's size, in each controller metald made its cgroup in. */
  async function jailerCgroups(spec: VmSpec): Promise<Array<{ file: string; value: string }>> {
    if (spec.cgroupParent === undefined) return [];
    const parent = normalizeCgroupPath(spec.cgroupParent);
    const roots = await cgroupHierarchies();
    const has = async (controller: string) => {
      for (const r of roots) {
        if (path.basename(r).split(",").includes(controller) && (await pathExists(path.join(r, parent))))
          return true;
      }
      return false;
    };
    const out: Array<{ file: string; value: string }> = [];
    if (await has("cpu")) {
      out.push({ file: "cpu.cfs_period_us", value: String(CPU_PERIOD_US) });
      out.push({ file: "cpu.cfs_quota_us", value: String(spec.vcpus * CPU_PERIOD_US) });
    }
    // A fresh cgroup's counter is 0 already; naming the file makes the jailer place the VM there.
    if (await has("cpuacct")) out.push({ file: "cpuacct.usage", value: "0" });
    if (await has("memory"))
      out.push({ file: "memory.limit_in_bytes", value: String(spec.memoryBytes + VMM_OVERHEAD_BYTES) });
    if (await has("pids")) out.push({ file: "pids.max", value: "max" });
    return out;
  }

  const identityOf = (h: BackendHandle): ProcessIdentity => ({ pid: h.pid, startTime: h.pidStartTime });

  async function apiOf(spec: VmSpec): Promise<FirecrackerConnection> {
    const exec = await firecrackerPath();
    const chroot = chrootDir(firecrackerLayout(spec.dir).chrootBase, exec, jailerId(spec.vmId));
    return firecrackerConnection(path.join(chroot, JAILED.apiSocket), opts.apiTimeoutMs ?? 10_000);
  }

  async function removeCreatedCgroups(spec: VmSpec): Promise<void> {
    const file = firecrackerLayout(spec.dir).cgroupsCreated;
    const dirs = await fs.readFile(file, "utf8").then(
      (t) => JSON.parse(t) as string[],
      () => [] as string[],
    );
    await removeCgroupDirs(dirs);
    await fs.rm(file, { force: true });
  }

  async function boot(spec: VmSpec): Promise<BackendHandle> {
    const l = await prepare(spec);
    const previous = await readProcessRecord(l.record);
    if (previous && (await isAlive(previous))) {
      throw new FailedPreconditionError(
        `VM ${spec.vmId} is already running (firecracker pid ${previous.pid})`,
      );
    }
    const exec = await firecrackerPath();
    const id = jailerId(spec.vmId);
    const user = jailUser(spec);
    // The jailer expects a fresh jail; what the VM keeps (its disk) lives outside it.
    await fs.rm(path.join(l.chrootBase, path.basename(exec), id), { recursive: true, force: true });
    const chroot = chrootDir(l.chrootBase, exec, id);
    await fs.mkdir(chroot, { recursive: true });
    await linkIntoChroot(chroot, spec.kernel!, JAILED.kernel);
    if (spec.initrd) await linkIntoChroot(chroot, spec.initrd, JAILED.initrd);
    await linkIntoChroot(chroot, l.rootfs, JAILED.rootfs, { ...user, mode: 0o600 });
    await fs.appendFile(spec.consoleLog, "");
    let consoleFile = spec.consoleLog;
    try {
      await linkIntoChroot(chroot, spec.consoleLog, JAILED.console, { ...user, mode: 0o640 });
    } catch {
      // Another filesystem (no hard link): the console stays in the jail; details say where.
      consoleFile = await ownedFileInChroot(chroot, JAILED.console, user);
    }
    await ownedFileInChroot(chroot, JAILED.log, user);
    await ownedFileInChroot(chroot, JAILED.metrics, user);

    const cgroups = await jailerCgroups(spec);
    if (cgroups.length > 0) {
      const leaf = `${normalizeCgroupPath(spec.cgroupParent!)}/${id}`;
      await fs.writeFile(l.cgroupsCreated, `${JSON.stringify(await missingCgroupDirs(leaf))}\n`);
    }
    const args = jailerArgs({
      id,
      execFile: exec,
      uid: user.uid,
      gid: user.gid,
      chrootBaseDir: l.chrootBase,
      ...(spec.network ? { netns: spec.network.netnsPath } : {}),
      ...(cgroups.length > 0 ? { parentCgroup: normalizeCgroupPath(spec.cgroupParent!) } : {}),
      cgroups,
      firecrackerArgs: ["--api-sock", JAILED.apiSocket],
    });
    const { pid } = await launch(jailerBinary, args, { logFile: spec.consoleLog });
    let ident: ProcessIdentity | undefined;
    try {
      ident = await identify(pid);
      await writeProcessRecord(l.record, ident);
      const api = firecrackerConnection(path.join(chroot, JAILED.apiSocket), opts.apiTimeoutMs ?? 10_000);
      await waitForApi(api, ident);
      await putLogger(api, { log_path: JAILED.log, level: "Info", show_level: true, show_log_origin: false });
      await putMetrics(api, { metrics_path: JAILED.metrics });
      await putMachineConfig(api, {
        vcpu_count: spec.vcpus,
        mem_size_mib: Math.ceil(spec.memoryBytes / (1 << 20)),
        smt: false,
      });
      await putBootSource(api, {
        kernel_image_path: JAILED.kernel,
        boot_args: bootArgs(spec),
        ...(spec.initrd ? { initrd_path: JAILED.initrd } : {}),
      });
      await putDrive(api, {
        drive_id: "rootfs",
        path_on_host: JAILED.rootfs,
        is_root_device: true,
        is_read_only: false,
      });
      if (spec.network) {
        await putNetworkInterface(api, {
          iface_id: "eth0",
          host_dev_name: spec.network.tapName!,
          guest_mac: spec.network.macAddress,
        });
      }
      await putSerial(api, { serial_out_path: JAILED.console });
      await putAction(api, { action_type: "InstanceStart" });
    } catch (err) {
      if (ident) await killAndWait(ident).catch(() => undefined);
      throw err;
    }
    return {
      backend: "firecracker",
      pid: ident.pid,
      pidStartTime: ident.startTime,
      details: { jailerId: id, chroot, apiSocket: path.join(chroot, JAILED.apiSocket), consoleFile },
    };
  }

  async function waitForApi(api: FirecrackerConnection, ident: ProcessIdentity): Promise<void> {
    const deadline = Date.now() + startTimeoutMs;
    for (;;) {
      try {
        await describeInstance(api);
        return;
      } catch (err) {
        if (!(await isAlive(ident))) {
          throw new FailedPreconditionError("firecracker exited while starting; see the VM's console log", {
            cause: err,
          });
        }
        if (Date.now() > deadline) throw err;
        await sleep(20);
      }
    }
  }

  async function stop(spec: VmSpec, h: BackendHandle, timeoutMs: number): Promise<{ forced: boolean }> {
    const ident = identityOf(h);
    let forced = false;
    if (await isAlive(ident)) {
      const api = await apiOf(spec);
      try {
        if ((await describeInstance(api)).state === "Paused") await patchVm(api, { state: "Resumed" });
        await putAction(api, { action_type: "SendCtrlAltDel" });
      } catch {
        // The API is gone or refused: the forced path below still ends the VM.
      }
      if (!(await waitForExit(ident, timeoutMs))) {
        forced = true;
        await killAndWait(ident);
      }
    }
    await removeCreatedCgroups(spec);
    return { forced };
  }

  return {
    name: "firecracker",

    async probe(): Promise<ProbeResult> {
      const base = { isolation: "hardware-vm" as const, accelerated: true };
      const fcVersion = await commandVersion(opts.firecrackerBinary ?? "firecracker");
      if (!(await kvmAvailable())) {
        return {
          ...base,
          available: false,
          reason: "no usable /dev/kvm (Firecracker needs hardware virtualisation)",
          version: fcVersion ?? "",
        };
      }
      if (!fcVersion) {
        return {
          ...base,
          available: false,
          reason: "firecracker is not installed (no Debian package; install the release binary)",
          version: "",
        };
      }
      if (!(await commandVersion(jailerBinary))) {
        return {
          ...base,
          available: false,
          reason: "jailer is not installed (it ships with the firecracker release)",
          version: fcVersion,
        };
      }
      return {
        ...base,
        available: true,
        reason: "Firecracker with KVM, launched through the jailer",
        version: fcVersion,
      };
    },

    async create(spec) {
      await prepare(spec);
      return undefined;
    },

    boot,

    async pause(spec) {
      await patchVm(await apiOf(spec), { state: "Paused" });
    },

    async resume(spec) {
      await patchVm(await apiOf(spec), { state: "Resumed" });
    },

    shutdown: (spec, h, o) => stop(spec, h, o.timeoutMs),

    async reboot(spec, h) {
      await stop(spec, h, REBOOT_GRACE_MS);
      return boot(spec);
    },

    async delete(spec, h) {
      const l = firecrackerLayout(spec.dir);
      const ident = h ? identityOf(h) : await readProcessRecord(l.record);
      if (ident) await killAndWait(ident);
      await removeCreatedCgroups(spec);
      await fs.rm(l.root, { recursive: true, force: true });
    },

    async adopt(spec, h) {
      const ident = identityOf(h);
      if (!(await isAlive(ident))) return "gone";
      const { state } = await describeInstance(await apiOf(spec));
      if (state === "Running") return "running";
      if (state === "Paused") return "paused";
      // "Not started": metald stopped in the middle of a boot; nothing ran yet. Finish it off.
      await killAndWait(ident);
      return "gone";
    },

    async stats(_spec, h): Promise<Partial<BackendStats>> {
      const out: Partial<BackendStats> = {};
      const usage = await processUsage(h.pid);
      if (usage) Object.assign(out, usage);
      const io = await processIo(h.pid);
      if (io) {
        out.diskReadBytes = io.readBytes;
        out.diskWriteBytes = io.writeBytes;
      }
      return out;
    },
  };
}
