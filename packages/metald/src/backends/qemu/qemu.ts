import fs from "node:fs/promises";
import path from "node:path";
import { FailedPreconditionError, InvalidArgumentError } from "@kiln/kit";
import type { Backend, BackendHandle, BackendStats, ProbeResult, VmSpec } from "../backend.js";
import { joinCgroup } from "../cgroups.js";
import { commandVersion, runCommand } from "../command.js";
import {
  identify,
  isAlive,
  killAndWait,
  type ProcessIdentity,
  processesMentioning,
  processUsage,
  readProcessRecord,
  sleep,
  spawnDetached,
  waitForExit,
  writeProcessRecord,
} from "../process.js";
import { hostTscKhz, kvmUsable, QEMU_BINARY, type QemuSpec, qemuArgs } from "./cmdline.js";
import { QmpClient, withQmp } from "./qmp.js";

export interface QemuBackendOptions {
  binary?: string;
  qemuImg?: string;
  nsenter?: string;
  /** Force KVM on or off; by default KVM when /dev/kvm is usable, TCG otherwise. */
  kvm?: boolean;
  /** Host address user-mode port forwards listen on (default 127.0.0.1). */
  hostfwdAddress?: string;
  /** How long boot waits for QEMU's QMP socket (default 10 s). */
  startTimeoutMs?: number;
}

/** Files of one VM under `<spec.dir>/qemu/`. */
export function qemuLayout(dir: string) {
  const root = path.join(dir, "qemu");
  return {
    root,
    overlay: path.join(root, "overlay.qcow2"),
    qmpSocket: path.join(root, "qmp.sock"),
    record: path.join(root, "process.json"),
  };
}

/**
 * The guest's init (builderd's /.kiln/init) turns SIGINT into a graceful stop of the workload
 * and a poweroff. Ctrl-Alt-Del delivers SIGINT to PID 1 only when the kernel's ctrl-alt-del
 * sysctl is 0; its default (1) reboots on the spot, without a sync.
 */
export const GRACEFUL_KERNEL_ARGS = ["sysctl.kernel.ctrl-alt-del=0"];

const MiB = 1024 * 1024;
const REBOOT_GRACE_MS = 10_000;

/**
 * QEMU microVMs (`-M microvm`): KVM when /dev/kvm is usable, TCG software emulation otherwise.
 *
 * - Disk: a qcow2 overlay in the VM directory backed by the shared raw base image
 *   (`qemu-img create -f qcow2 -F raw -b BASE`), so the base is only ever read.
 * - Network: with spec.network, QEMU runs inside the VM's namespace (`nsenter --net`) on its tap
 *   device and the guest address goes on the kernel command line (`kiln.ip=`); without, user-mode
 *   networking (restrict=on) forwards spec.ports from the host.
 * - Control over QMP: stop/cont (pause), Ctrl-Alt-Del through an emulated i8042 keyboard
 *   controller (graceful shutdown: the guest init stops the workload and powers off), quit
 *   (forced), system_reset (reboot; `-no-reboot` is lifted for that one reset with set-action),
 *   query-status (adopt), query-blockstats (stats).
 * - QEMU starts with its CPUs stopped (`-S`), joins the VM's cgroup, then runs (`cont`): the guest
 *   never executes outside its limits.
 * - Serial console on QEMU's stdout, appended to spec.consoleLog.
 */
export function createQemuBackend(opts: QemuBackendOptions = {}): Backend {
  const binary = opts.binary ?? QEMU_BINARY;
  const qemuImg = opts.qemuImg ?? "qemu-img";
  const nsenter = opts.nsenter ?? "nsenter";
  const startTimeoutMs = opts.startTimeoutMs ?? 10_000;
  const useKvm = async () => opts.kvm ?? (await kvmUsable());

  function check(spec: VmSpec): void {
    if (!spec.kernel)
      throw new InvalidArgumentError("the qemu backend needs a kernel to boot", { field: "kernel" });
    if (!spec.initrd) {
      throw new InvalidArgumentError("the qemu backend needs an initramfs that loads the virtio drivers", {
        field: "initrd",
      });
    }
    if (spec.network && !spec.network.tapName) {
      throw new InvalidArgumentError("with a network, the qemu backend needs the namespace's tap device", {
        field: "network.tapName",
      });
    }
  }

  async function prepare(spec: VmSpec): Promise<ReturnType<typeof qemuLayout>> {
    check(spec);
    const l = qemuLayout(spec.dir);
    await fs.mkdir(l.root, { recursive: true });
    const exists = await fs.stat(l.overlay).then(
      () => true,
      () => false,
    );
    if (!exists) {
      const tmp = `${l.overlay}.tmp`;
      await runCommand(qemuImg, [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        path.resolve(spec.rootfs),
        tmp,
      ]);
      await fs.rename(tmp, l.overlay);
    }
    return l;
  }

  const identityOf = (h: BackendHandle): ProcessIdentity => ({ pid: h.pid, startTime: h.pidStartTime });
  const qmpOf = (spec: VmSpec) => qemuLayout(spec.dir).qmpSocket;

  async function connectWhenReady(socket: string, id: ProcessIdentity): Promise<QmpClient> {
    const deadline = Date.now() + startTimeoutMs;
    for (;;) {
      try {
        return await QmpClient.connect(socket, { timeoutMs: 2_000 });
      } catch (err) {
        if (!(await isAlive(id))) {
          throw new FailedPreconditionError("qemu exited while starting; see the VM's console log", {
            cause: err,
          });
        }
        if (Date.now() > deadline) throw err;
        await sleep(20);
      }
    }
  }

  async function boot(spec: VmSpec): Promise<BackendHandle> {
    const l = await prepare(spec);
    const previous = await readProcessRecord(l.record);
    if (previous && (await isAlive(previous))) {
      throw new FailedPreconditionError(`VM ${spec.vmId} is already running (qemu pid ${previous.pid})`);
    }
    await fs.rm(l.qmpSocket, { force: true });
    const kvm = await useKvm();
    const net = spec.network;
    const qspec: QemuSpec = {
      kernel: spec.kernel!,
      initrd: spec.initrd!,
      rootfs: l.overlay,
      rootfsFormat: "qcow2",
      memoryMiB: Math.ceil(spec.memoryBytes / MiB),
      vcpus: spec.vcpus,
      kvm,
      qmpSocket: l.qmpSocket,
      serial: "stdio",
      hostfwd: net
        ? []
        : spec.ports.map((p) => ({
            hostAddr: opts.hostfwdAddress ?? "127.0.0.1",
            hostPort: p.hostPort,
            guestPort: p.guestPort,
            protocol: p.protocol,
          })),
      kernelArgs: [...GRACEFUL_KERNEL_ARGS, ...spec.kernelArgs],
      hostname: spec.hostname,
    };
    if (!kvm) {
      const tsc = await hostTscKhz();
      if (tsc !== undefined) qspec.tscKhz = tsc;
    }
    if (net) {
      qspec.tap = {
        ifname: net.tapName!,
        mac: net.macAddress,
        address: `${net.guestIp}/${net.prefixLen}`,
        gateway: net.gateway,
        ...(net.dns ? { dns: net.dns } : {}),
      };
    }
    // i8042 carries Ctrl-Alt-Del (graceful shutdown); -S holds the CPUs until the cgroup is joined.
    const args = [...qemuArgs(qspec), "-device", "i8042", "-S"];
    const cmd = net
      ? { file: nsenter, args: [`--net=${net.netnsPath}`, "--", binary, ...args] }
      : { file: binary, args };
    const child = await spawnDetached(cmd.file, cmd.args, { logFile: spec.consoleLog, cwd: l.root });
    let id: ProcessIdentity | undefined;
    try {
      id = await identify(child.pid);
      await writeProcessRecord(l.record, id);
      const qmp = await connectWhenReady(l.qmpSocket, id);
      try {
        if (spec.cgroupParent !== undefined) await joinCgroup(spec.cgroupParent, id.pid);
        await qmp.execute("cont");
      } finally {
        qmp.close();
      }
    } catch (err) {
      if (id) await killAndWait(id).catch(() => undefined);
      else await child.exited;
      throw err;
    }
    return {
      backend: "qemu",
      pid: id.pid,
      pidStartTime: id.startTime,
      details: { qmpSocket: l.qmpSocket, accel: kvm ? "kvm" : "tcg" },
    };
  }

  async function quitOrKill(spec: VmSpec, id: ProcessIdentity): Promise<void> {
    if (!(await isAlive(id))) return;
    await withQmp(qmpOf(spec), (q) => q.execute("quit"), { timeoutMs: 1_000 }).catch(() => undefined);
    if (!(await waitForExit(id, 3_000))) await killAndWait(id);
  }

  return {
    name: "qemu",

    async probe(): Promise<ProbeResult> {
      const kvm = await useKvm();
      const base = { isolation: kvm ? ("hardware-vm" as const) : ("software-vm" as const), accelerated: kvm };
      const version = await commandVersion(binary);
      if (!version) {
        return {
          ...base,
          available: false,
          reason: `${binary} is not installed (Debian package qemu-system-x86)`,
          version: "",
        };
      }
      if (!(await commandVersion(qemuImg))) {
        return {
          ...base,
          available: false,
          reason: `${qemuImg} is not installed (Debian package qemu-utils)`,
          version,
        };
      }
      return {
        ...base,
        available: true,
        reason: kvm
          ? "QEMU microvm with KVM"
          : "QEMU microvm under TCG software emulation (no usable /dev/kvm)",
        version,
      };
    },

    async create(spec) {
      await prepare(spec);
      return undefined;
    },

    boot,

    async pause(spec) {
      await withQmp(qmpOf(spec), (q) => q.execute("stop"));
    },

    async resume(spec) {
      await withQmp(qmpOf(spec), (q) => q.execute("cont"));
    },

    async shutdown(spec, h, { timeoutMs }) {
      const id = identityOf(h);
      if (!(await isAlive(id))) return { forced: false };
      const started = Date.now();
      try {
        await withQmp(qmpOf(spec), async (q) => {
          const status = await q.execute<{ status: string }>("query-status");
          if (status.status !== "running") await q.execute("cont");
          await q.execute("send-key", {
            keys: ["ctrl", "alt", "delete"].map((k) => ({ type: "qcode", data: k })),
          });
        });
      } catch {
        // QMP unreachable: fall through to the forced path after the wait.
      }
      if (await waitForExit(id, Math.max(0, timeoutMs - (Date.now() - started)))) {
        await fs.rm(qmpOf(spec), { force: true });
        return { forced: false };
      }
      await quitOrKill(spec, id);
      await fs.rm(qmpOf(spec), { force: true });
      return { forced: true };
    },

    async reboot(spec, h) {
      // Graceful, like shutdown: Ctrl-Alt-Del, the init stops the workload, syncs and powers off.
      // For this one power-off QEMU pauses instead of exiting (and a guest reboot resets instead
      // of exiting, as -no-reboot would have it); then a reset starts the guest again in the
      // same process. A guest that ignores Ctrl-Alt-Del is reset hard after the grace period.
      await withQmp(
        qmpOf(spec),
        async (q) => {
          await q.execute("set-action", { shutdown: "pause", reboot: "reset" });
          try {
            const { status } = await q.execute<{ status: string }>("query-status");
            if (status !== "running") await q.execute("cont");
            const stopped = q.waitForEvent("SHUTDOWN", REBOOT_GRACE_MS);
            const reset = q.waitForEvent("RESET", REBOOT_GRACE_MS);
            await q.execute("send-key", {
              keys: ["ctrl", "alt", "delete"].map((k) => ({ type: "qcode", data: k })),
            });
            const first = await Promise.race([
              stopped.then((e) => (e ? "shutdown" : "timeout")),
              reset.then((e) => (e ? "reset" : "timeout")),
            ]);
            if (first !== "reset") {
              // The reset happens in QEMU's main loop after the command returns: wait for it.
              const done = q.waitForEvent("RESET", 5_000);
              await q.execute("system_reset");
              await done;
            }
            if ((await q.execute<{ status: string }>("query-status")).status !== "running")
              await q.execute("cont");
          } finally {
            await q.execute("set-action", { shutdown: "poweroff", reboot: "shutdown" });
          }
        },
        { commandTimeoutMs: 10_000 },
      );
      return h;
    },

    async delete(spec, h) {
      const l = qemuLayout(spec.dir);
      const id = h ? identityOf(h) : await readProcessRecord(l.record);
      if (id) await quitOrKill(spec, id);
      // A QEMU started for this VM but lost track of (its command line names the overlay).
      for (const p of await processesMentioning(l.root)) await killAndWait(p);
      await fs.rm(l.root, { recursive: true, force: true });
    },

    async adopt(spec, h) {
      const id = identityOf(h);
      if (!(await isAlive(id))) return "gone";
      const { status } = await withQmp(qmpOf(spec), (q) => q.execute<{ status: string }>("query-status"));
      if (status === "running" || status === "debug") return "running";
      if (
        [
          "paused",
          "prelaunch",
          "suspended",
          "inmigrate",
          "postmigrate",
          "finish-migrate",
          "save-vm",
          "restore-vm",
        ].includes(status)
      ) {
        return "paused";
      }
      // shutdown, guest-panicked, internal-error, io-error: the guest is dead; so is the VM.
      await quitOrKill(spec, id);
      return "gone";
    },

    async stats(spec, h): Promise<Partial<BackendStats>> {
      const out: Partial<BackendStats> = {};
      const usage = await processUsage(h.pid);
      if (usage) Object.assign(out, usage);
      const blocks = await withQmp(qmpOf(spec), (q) =>
        q.execute<Array<{ stats: { rd_bytes: number; wr_bytes: number } }>>("query-blockstats"),
      );
      out.diskReadBytes = blocks.reduce((a, b) => a + b.stats.rd_bytes, 0);
      out.diskWriteBytes = blocks.reduce((a, b) => a + b.stats.wr_bytes, 0);
      return out;
    },
  };
}
