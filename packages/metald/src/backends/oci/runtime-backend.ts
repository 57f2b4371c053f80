import fs from "node:fs/promises";
import path from "node:path";
import {
  FailedPreconditionError,
  InternalError,
  InvalidArgumentError,
  pathExists,
  resolveImageUser,
} from "@kiln/kit";
import {
  type Backend,
  type BackendHandle,
  type BackendName,
  type BackendStats,
  NotImplementedError,
  type ProbeResult,
  type VmSpec,
} from "../backend.js";
import { missingCgroupDirs, normalizeCgroupPath, removeCgroupDirs } from "../cgroups.js";
import { BackendCommandError, commandVersion, runCommand } from "../command.js";
import { unmountUnder } from "../mounts.js";
import {
  identify,
  isAlive,
  killAndWait,
  type ProcessIdentity,
  processesMentioning,
  readProcessRecord,
  spawnDetached,
  waitForExit,
  writeProcessRecord,
} from "../process.js";
import { mountOverlayOnSharedImage, overlayLower, unmountSharedOverlay } from "../shared-images.js";
import { containerArgs, type OciNetwork, ociRuntimeConfig, renderHosts, renderResolvConf } from "./config.js";

/**
 * What differs between OCI runtimes (runc, runsc). The lifecycle is the same: `run --detach`,
 * `pause`/`resume`, `kill`, `delete --force`, `state`.
 */
export interface OciRuntime {
  name: BackendName;
  binary: string;
  /** Flags before the subcommand, given the runtime state dir (`--root`) and the VM. */
  globalFlags(stateDir: string, spec: VmSpec): string[];
  /** How a runtime command is run: e.g. inside the VM's netns (nsenter), for every subcommand. */
  wrap(argv: string[], spec: VmSpec): { file: string; args: string[] };
  /** How config.json describes the network namespace. */
  network(spec: VmSpec): OciNetwork;
  limits: { memory: boolean; cpu: boolean };
  probe(): Promise<ProbeResult>;
}

/**
 * Whether an OCI runtime can run here: it needs root (mounts, namespaces, cgroups) and its binary.
 * `available` is the reason given when it can.
 */
export async function probeOciRuntime(o: {
  binary: string;
  debianPackage: string;
  versionArg?: string;
  isolation: ProbeResult["isolation"];
  accelerated: boolean;
  available: string;
}): Promise<ProbeResult> {
  const base = { isolation: o.isolation, accelerated: o.accelerated };
  if (process.getuid?.() !== 0) {
    return {
      ...base,
      available: false,
      reason: `${o.debianPackage} needs root (mounts, namespaces, cgroups)`,
      version: "",
    };
  }
  const version = await commandVersion(o.binary, o.versionArg);
  if (!version) {
    return {
      ...base,
      available: false,
      reason: `${o.binary} is not installed (Debian package ${o.debianPackage})`,
      version: "",
    };
  }
  return { ...base, available: true, reason: o.available, version };
}

/** Files of one VM under `<spec.dir>/<backend>/`: everything the backend makes, so delete finds it all. */
export interface BundleLayout {
  root: string;
  /** The VM's writable root: an overlay of upper (its changes) over the shared base image. */
  merged: string;
  upper: string;
  work: string;
  bundle: string;
  config: string;
  etc: string;
  /** The runtime's --root. */
  state: string;
  pidFile: string;
  /** { pid, startTime } of the container's init, for delete() without a handle. */
  record: string;
  /** cgroup directories the runtime created along the way (removed on delete). */
  cgroupsCreated: string;
}

export function bundleLayout(dir: string, backend: BackendName): BundleLayout {
  const root = path.join(dir, backend);
  const bundle = path.join(root, "bundle");
  return {
    root,
    bundle,
    config: path.join(bundle, "config.json"),
    merged: path.join(bundle, "rootfs"),
    upper: path.join(root, "upper"),
    work: path.join(root, "work"),
    etc: path.join(root, "etc"),
    state: path.join(root, "state"),
    pidFile: path.join(root, "container.pid"),
    record: path.join(root, "process.json"),
    cgroupsCreated: path.join(root, "cgroups-created.json"),
  };
}

/**
 * The runtime's own cgroup for the VM. Under metald's `cgroupParent` it is a child named for the
 * backend, because the runtime removes the cgroup it was given on delete: metald's cgroup, its
 * limits and its final counters stay (v1 charges stay in the parent after the child is removed).
 * Without a parent, a flat per-VM cgroup.
 */
export function containerCgroupPath(spec: VmSpec, backend: BackendName): string {
  if (spec.cgroupParent !== undefined) return `/${normalizeCgroupPath(spec.cgroupParent)}/${backend}`;
  return `/kiln-${backend}-${spec.vmId}`;
}

/** Where base images shared by the VMs of this VM root are mounted (mounts.ts). */
export const imagesDir = (spec: VmSpec) => path.join(path.dirname(spec.dir), ".images");

const CONTAINER_ID = /^[A-Za-z0-9_.-]{1,64}$/;
const START_TIMEOUT_MS = 60_000;
const REBOOT_GRACE_MS = 10_000;
/** Open files a workload may have (Docker gives 1048576; this host may not allow that much). */
const WORKLOAD_NOFILE = 65536;

/** A Backend over an OCI runtime CLI: runc and gVisor's runsc. */
export interface OciBackendOptions {
  /** How long a shared base image stays mounted after its last VM is deleted (default 0). */
  imageMountLingerMs?: number;
}

export function createOciRuntimeBackend(rt: OciRuntime, opts: OciBackendOptions = {}): Backend {
  const name = rt.name;

  const command = (spec: VmSpec, args: string[]) =>
    rt.wrap([rt.binary, ...rt.globalFlags(bundleLayout(spec.dir, name).state, spec), ...args], spec);
  const cli = (spec: VmSpec, args: string[], opts: { tolerate?: RegExp; timeoutMs?: number } = {}) => {
    const c = command(spec, args);
    return runCommand(c.file, c.args, opts);
  };

  function check(spec: VmSpec): void {
    if (!CONTAINER_ID.test(spec.vmId)) {
      throw new InvalidArgumentError(`vm id ${JSON.stringify(spec.vmId)} must match ${CONTAINER_ID}`, {
        field: "vmId",
      });
    }
    if (spec.ports.length > 0 && !spec.network) {
      throw new NotImplementedError(
        name,
        "forward ports without a network namespace",
        "container backends have no user-mode networking; attach the VM to a network (spec.network) and forward to its address",
      );
    }
  }

  async function prepare(spec: VmSpec): Promise<BundleLayout> {
    check(spec);
    const l = bundleLayout(spec.dir, name);
    await fs.mkdir(l.state, { recursive: true, mode: 0o700 });
    await fs.mkdir(l.etc, { recursive: true });
    await mountOverlayOnSharedImage(imagesDir(spec), spec.rootfs, {
      upper: l.upper,
      work: l.work,
      merged: l.merged,
    });

    const user = await resolveImageUser(l.merged, spec.workload.user, "workload.user");
    const tini = await fs.lstat(path.join(l.merged, ".kiln")).then(
      async (s) => s.isDirectory() && (await fs.lstat(path.join(l.merged, ".kiln/tini"))).isFile(),
      () => false,
    );
    const etcFiles: Array<{ destination: string; source: string }> = [];
    const imageHasEtc = await fs.lstat(path.join(l.merged, "etc")).then(
      (s) => s.isDirectory(),
      () => false,
    );
    if (imageHasEtc) {
      const files: Array<[string, string | undefined]> = [
        ["hosts", renderHosts(spec)],
        ["hostname", `${spec.hostname}\n`],
        ["resolv.conf", renderResolvConf(spec)],
      ];
      for (const [file, content] of files) {
        if (content === undefined) continue;
        const source = path.join(l.etc, file);
        await fs.writeFile(source, content, { mode: 0o644 });
        etcFiles.push({ destination: `/etc/${file}`, source });
      }
    }
    const config = ociRuntimeConfig({
      spec,
      user,
      args: containerArgs(spec, tini),
      network: rt.network(spec),
      cgroupsPath: containerCgroupPath(spec, name),
      etcFiles,
      limits: rt.limits,
      nofile: Math.min(WORKLOAD_NOFILE, await hardNofileLimit()),
    });
    await fs.writeFile(l.config, `${JSON.stringify(config, null, 2)}\n`);
    return l;
  }

  /** The runtime's view of the container, or undefined when it has no record of it. */
  async function runtimeState(spec: VmSpec): Promise<{ status: string; pid: number } | undefined> {
    try {
      const { stdout } = await cli(spec, ["state", spec.vmId], { timeoutMs: 15_000 });
      const s = JSON.parse(stdout) as { status?: string; pid?: number };
      return { status: s.status ?? "unknown", pid: s.pid ?? 0 };
    } catch (err) {
      if (
        err instanceof BackendCommandError &&
        /does not exist|not exist|no such|not found/i.test(err.stderr)
      ) {
        return undefined;
      }
      throw err;
    }
  }

  async function forceDelete(spec: VmSpec): Promise<void> {
    const l = bundleLayout(spec.dir, name);
    // An empty (or missing) --root holds no container: skip the runtime's ~8 ms start-up.
    const hasState = await fs.readdir(l.state).then(
      (entries) => entries.length > 0,
      () => false,
    );
    if (!hasState) return;
    await cli(spec, ["delete", "--force", spec.vmId], {
      tolerate: /does not exist|not exist|no such|not found/i,
      timeoutMs: 30_000,
    });
  }

  async function removeCreatedCgroups(l: BundleLayout): Promise<void> {
    const dirs = await readJson<string[]>(l.cgroupsCreated);
    if (dirs) await removeCgroupDirs(dirs);
    await fs.rm(l.cgroupsCreated, { force: true });
  }

  /** The bundle CreateVm prepared, as long as its root is still mounted; else prepared again (host reboot). */
  async function prepared(spec: VmSpec): Promise<BundleLayout> {
    const l = bundleLayout(spec.dir, name);
    const ready = (await overlayLower(l.merged)) !== undefined && (await pathExists(l.config));
    return ready ? l : prepare(spec);
  }

  async function boot(spec: VmSpec): Promise<BackendHandle> {
    const layout = bundleLayout(spec.dir, name);
    // Independent reads, at once: BootVm waits for all of them before the runtime starts.
    const [l, previous, createdBefore, missing, logOffset] = await Promise.all([
      prepared(spec),
      readProcessRecord(layout.record),
      readJson<string[]>(layout.cgroupsCreated),
      missingCgroupDirs(containerCgroupPath(spec, name)),
      fs.stat(spec.consoleLog).then(
        (s) => s.size,
        () => 0,
      ),
    ]);
    if (previous && (await isAlive(previous))) {
      throw new FailedPreconditionError(
        `VM ${spec.vmId} is already running (${name} container pid ${previous.pid})`,
      );
    }
    const created = new Set([...(createdBefore ?? []), ...missing]);
    await Promise.all([
      // A record left by an earlier boot (shut down, or crashed) would make `create` fail.
      forceDelete(spec).then(() => fs.rm(l.pidFile, { force: true })),
      fs.writeFile(l.cgroupsCreated, `${JSON.stringify([...created])}\n`),
    ]);

    // One `run --detach` (create + start in one runtime process: a separate `start` costs another
    // ~9 ms of runtime start-up). A metald crash before the record below is written is caught by
    // the manager's interrupted-boot recovery, which deletes the container through the runtime.
    const cmd = command(spec, ["run", "--detach", "--bundle", l.bundle, "--pid-file", l.pidFile, spec.vmId]);
    // The container inherits the run command's stdout/stderr: the console log, not metald's.
    const child = await spawnDetached(cmd.file, cmd.args, { logFile: spec.consoleLog, cwd: l.bundle });
    const result = await Promise.race([
      child.exited,
      new Promise<"timeout">((r) => setTimeout(() => r("timeout"), START_TIMEOUT_MS).unref()),
    ]);
    if (result === "timeout" || result.code !== 0) {
      if (result === "timeout") await killAndWait(await identify(child.pid)).catch(() => undefined);
      const output = await readFrom(spec.consoleLog, logOffset);
      await forceDelete(spec).catch(() => undefined);
      throw new BackendCommandError(
        [cmd.file, ...cmd.args].join(" "),
        result === "timeout" ? `timed out after ${START_TIMEOUT_MS} ms\n${output}` : output,
        result === "timeout" ? undefined : (result.code ?? undefined),
      );
    }
    const pid = Number((await fs.readFile(l.pidFile, "utf8")).trim());
    const id = await identify(pid);
    await writeProcessRecord(l.record, id);
    return handleOf(id, l);
  }

  function handleOf(id: ProcessIdentity, l: BundleLayout): BackendHandle {
    return {
      backend: name,
      pid: id.pid,
      pidStartTime: id.startTime,
      details: { stateDir: l.state, bundle: l.bundle },
    };
  }

  const identityOf = (h: BackendHandle): ProcessIdentity => ({ pid: h.pid, startTime: h.pidStartTime });

  async function stop(spec: VmSpec, h: BackendHandle, timeoutMs: number): Promise<{ forced: boolean }> {
    const id = identityOf(h);
    let forced = false;
    if (await isAlive(id)) {
      // A signal to a frozen container stays pending: thaw it so SIGTERM can be acted on.
      if ((await runtimeState(spec))?.status === "paused") await cli(spec, ["resume", spec.vmId]);
      await cli(spec, ["kill", spec.vmId, "TERM"], {
        tolerate: /not running|process already finished|no such process/i,
      });
      if (!(await waitForExit(id, timeoutMs))) {
        forced = true;
        await cli(spec, ["kill", spec.vmId, "KILL"], {
          tolerate: /not running|process already finished|no such process/i,
        });
        if (!(await waitForExit(id, 10_000))) await killAndWait(id);
      }
    }
    await forceDelete(spec);
    await removeCreatedCgroups(bundleLayout(spec.dir, name));
    return { forced };
  }

  return {
    name,
    probe: () => rt.probe(),

    async create(spec) {
      await prepare(spec);
      return undefined;
    },

    boot,

    async pause(spec) {
      await cli(spec, ["pause", spec.vmId]);
    },

    async resume(spec) {
      await cli(spec, ["resume", spec.vmId]);
    },

    shutdown: (spec, h, opts) => stop(spec, h, opts.timeoutMs),

    async reboot(spec, h) {
      await stop(spec, h, REBOOT_GRACE_MS);
      return boot(spec);
    },

    async delete(spec, h) {
      const l = bundleLayout(spec.dir, name);
      const id = h ? identityOf(h) : await readProcessRecord(l.record);
      // The runtime may fail here (corrupt state, an unreachable sandbox): what follows cleans up
      // regardless — processes by identity, cgroups, mounts, files — so a VM can always be deleted.
      await forceDelete(spec).catch(() => undefined);
      if (id) await killAndWait(id);
      // Whatever the runtime left running for this VM (runsc's gofer, a sandbox it lost track of).
      for (const p of await processesMentioning(l.root)) await killAndWait(p);
      await removeCreatedCgroups(l);
      await unmountSharedOverlay(imagesDir(spec), l.merged, opts.imageMountLingerMs);
      await unmountUnder(l.root); // anything else, e.g. a lower mount of the VM's own (older layout)
      await fs.rm(l.root, { recursive: true, force: true });
    },

    async adopt(spec, h) {
      if (!(await isAlive(identityOf(h)))) return "gone";
      const state = await runtimeState(spec);
      if (!state) {
        throw new InternalError(
          `${name} has no record of container ${spec.vmId} although its process ${h.pid} runs; delete the VM to clean it up`,
        );
      }
      if (state.status === "running") return "running";
      if (state.status === "paused") return "paused";
      // "created": the runtime stopped between its create and start. Nothing was served: finish it off.
      await forceDelete(spec);
      return "gone";
    },

    async stats(spec) {
      const { stdout } = await cli(spec, ["events", "--stats", spec.vmId], { timeoutMs: 15_000 });
      return parseRuntimeStats(stdout);
    },
  };
}

interface RuntimeEventStats {
  data?: {
    cpu?: { usage?: { total?: number } };
    memory?: { usage?: { usage?: number } };
    blkio?: { ioServiceBytesRecursive?: Array<{ op?: string; value?: number }> };
  };
}

/** `runc events --stats` / `runsc events --stats`: one JSON event of type "stats". */
export function parseRuntimeStats(stdout: string): Partial<BackendStats> {
  const line = stdout.trim().split("\n").at(-1) ?? "{}";
  const ev = JSON.parse(line) as RuntimeEventStats;
  const out: Partial<BackendStats> = {};
  const d = ev.data ?? {};
  if (d.cpu?.usage?.total !== undefined) out.cpuTimeNanos = d.cpu.usage.total;
  if (d.memory?.usage?.usage !== undefined) out.memoryBytes = d.memory.usage.usage;
  const io = d.blkio?.ioServiceBytesRecursive;
  if (io) {
    const sum = (op: string) =>
      io.filter((e) => e.op?.toLowerCase() === op).reduce((a, e) => a + (e.value ?? 0), 0);
    out.diskReadBytes = sum("read");
    out.diskWriteBytes = sum("write");
  }
  return out;
}

/** metald's own hard RLIMIT_NOFILE, which the runtime inherits (from /proc/self/limits). */
async function hardNofileLimit(): Promise<number> {
  const text = await fs.readFile("/proc/self/limits", "utf8").catch(() => "");
  const m = /^Max open files\s+\S+\s+(\S+)/m.exec(text);
  if (!m || m[1] === "unlimited") return Number.MAX_SAFE_INTEGER;
  return Number(m[1]) || 1024;
}

async function readJson<T>(file: string): Promise<T | undefined> {
  try {
    return JSON.parse(await fs.readFile(file, "utf8")) as T;
  } catch {
    return undefined;
  }
}

/** What a file gained after `offset` (at most the last 8 KiB), for error messages. */
async function readFrom(file: string, offset: number): Promise<string> {
  try {
    const buf = await fs.readFile(file);
    return buf.subarray(Math.max(offset, buf.length - 8192)).toString("utf8");
  } catch {
    return "";
  }
}
