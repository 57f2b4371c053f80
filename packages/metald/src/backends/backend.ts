/**
 * The VM backend interface: one host-level way of running a tenant's workload (a QEMU or
 * Firecracker microVM, a gVisor sandbox, a runc container). metald's VM manager owns the
 * lifecycle state table, the database and the network/cgroup set-up; a backend only turns those
 * decisions into processes, files and mounts, and describes what it started so a restarted metald
 * can find it again.
 *
 * Terms
 * - spec (VmSpec): everything a backend needs to know about one VM. The caller creates
 *   `spec.dir` (the VM's own directory) before create(); every file, mount, socket and state
 *   directory a backend makes lives below it, so delete() can find them from the spec alone.
 * - base image (`spec.rootfs`): an ext4 image shared by every VM of the same build and hard-linked
 *   from the asset store. It is read-only to backends: each VM writes to its own layer instead
 *   (QEMU: a qcow2 overlay; runc/gVisor: an overlayfs upper dir over a read-only loop mount;
 *   Firecracker: a reflinked copy). The base image's bytes never change.
 * - handle (BackendHandle): what survives a metald restart. The manager stores it in the DB
 *   and passes it back to every later call and to adopt(). `pid` + `pidStartTime` (field 22 of
 *   /proc/<pid>/stat) identify the VM's main process; a pid alone may have been reused.
 *
 * Lifecycle (the manager's states, and which calls each accepts)
 *
 *     create ──► CREATED ──boot──► RUNNING ◄──resume── PAUSED
 *                   ▲                │  ▲ └────pause────►  │
 *                   │            reboot─┘                  │
 *                   └──── SHUTDOWN ◄──shutdown─────────────┘
 *     delete: from any state (also after a failed create or boot); idempotent
 *     adopt:  RUNNING or PAUSED, after a metald restart
 *
 * - create(spec): CREATED. Prepares the writable layer and the backend's files (OCI bundle, qcow2
 *   overlay, jail); starts no workload. Returns undefined, or a handle when a process already
 *   exists. Calling it again for the same spec repairs what is missing.
 * - boot(spec): CREATED or SHUTDOWN → RUNNING. Starts the process (detached: its own session,
 *   console/stdout to `spec.consoleLog`, never metald's stdio, so it outlives metald) and returns
 *   its handle. Booting after a shutdown keeps what the VM wrote.
 * - pause/resume: RUNNING ⇄ PAUSED. The workload stops executing; memory and connections stay.
 * - reboot: RUNNING → RUNNING. The workload starts again on the same writable layer. The handle
 *   may change (container backends and Firecracker start a new process): store the returned one.
 * - shutdown(opts.timeoutMs): RUNNING or PAUSED → SHUTDOWN. Graceful first (Ctrl-Alt-Del to the
 *   guest, SIGTERM to a container's init), forced (SIGKILL / QMP quit) after the timeout;
 *   `forced` says which. Leaves behind the VM's files and writable layer (so boot can start it
 *   again) but no process and no runtime state (no runc/runsc container record).
 * - delete(spec, h?): any state → gone. Kills what still runs (by handle, or by the process
 *   record under spec.dir when the handle was lost), then removes everything the backend created:
 *   mounts, loop devices, overlays, bundles, sockets, runtime state, cgroups it made. It leaves
 *   `spec.dir` itself, `spec.consoleLog` and whatever the caller put there (netns, cgroup parent).
 *   Safe to call twice, and after a partial create.
 * - adopt(spec, h): after a metald restart, says whether the handle's process is still the one
 *   that was started (same pid and start time) and whether it runs or is paused. "gone" means
 *   the process vanished (crash, kill -9, guest powered off); the manager records why and calls
 *   delete to clear what is left. adopt changes nothing, except that it finishes off a half-done
 *   boot (a container created but never started) so nothing leaks.
 *
 * Errors: BackendUnavailableError when the backend cannot run on this host (binary missing, no
 * /dev/kvm); NotImplementedError (→ `unimplemented`) for what a backend cannot do; kit's
 * InvalidArgumentError naming the spec field for specs a backend cannot express; InternalError
 * (with the failing command and its stderr) when a runtime command fails.
 */
import { UnavailableError, UnimplementedError } from "@kiln/kit";

export type BackendName = "qemu" | "gvisor" | "runc" | "firecracker";

export const BACKEND_NAMES: readonly BackendName[] = ["firecracker", "qemu", "gvisor", "runc"];

export interface WorkloadConfig {
  entrypoint: string[];
  cmd: string[];
  env: Record<string, string>;
  workingDir: string;
  /** `user`, `uid`, `user:group` or `uid:gid`, resolved through the image's /etc/passwd and /etc/group; empty = root. */
  user: string;
}

export interface VmNetworkSpec {
  /** The VM's network namespace (e.g. /var/run/netns/kiln-abc). */
  netnsPath: string;
  guestIp: string;
  prefixLen: number;
  gateway: string;
  dns?: string;
  macAddress: string;
  /**
   * VM backends: the tap device inside the namespace the guest NIC is attached to. Container
   * backends ignore it: they join the namespace, whose interface already carries guestIp.
   */
  tapName?: string;
}

export interface PortForward {
  guestPort: number;
  hostPort: number;
  protocol: "tcp" | "udp";
}

export interface VmSpec {
  vmId: string;
  tenantId: string;
  vcpus: number;
  memoryBytes: number;
  /** The VM's own directory (exists; backend files go here). */
  dir: string;
  /** Base ext4 image: read-only and shared between VMs. */
  rootfs: string;
  /** VM backends: the kernel to boot, its initramfs, and extra kernel parameters. */
  kernel?: string;
  initrd?: string;
  kernelArgs: string[];
  /** Container backends run this; VM backends rely on the init builderd injected (/.kiln/init). */
  workload: WorkloadConfig;
  hostname: string;
  network?: VmNetworkSpec;
  /**
   * Forwards from the host. Honoured by backends with user-mode networking (QEMU without
   * `network`); with `network`, metald's port forwarding targets guestIp instead.
   */
  ports: PortForward[];
  /**
   * cgroup (v1) path under each controller for the VM's processes, e.g. "kiln/acme/vm_123";
   * created and limited by metald's cgroup code. Backends whose runtime removes the cgroup it is
   * given (runc, runsc, the jailer) use a child of it, so the caller's counters and limits stay.
   */
  cgroupParent?: string;
  /** File the serial console / stdout+stderr is appended to. */
  consoleLog: string;
}

/** What survives a metald restart: stored in the DB, given back to adopt(). */
export interface BackendHandle {
  backend: BackendName;
  pid: number;
  pidStartTime: number;
  details: Record<string, string>;
}

export type Isolation = "hardware-vm" | "software-vm" | "sandbox" | "container";

export interface ProbeResult {
  available: boolean;
  /** Why not (or what was found), for `kiln doctor`. */
  reason: string;
  isolation: Isolation;
  /** Hardware virtualisation (KVM) in use. */
  accelerated: boolean;
  version: string;
}

export interface BackendStats {
  cpuTimeNanos: number;
  memoryBytes: number;
  diskReadBytes: number;
  diskWriteBytes: number;
}

export interface Backend {
  readonly name: BackendName;
  probe(): Promise<ProbeResult>;
  /** Prepares files/bundle; no process yet (or a paused one). */
  create(spec: VmSpec): Promise<BackendHandle | undefined>;
  boot(spec: VmSpec): Promise<BackendHandle>;
  pause(spec: VmSpec, h: BackendHandle): Promise<void>;
  resume(spec: VmSpec, h: BackendHandle): Promise<void>;
  /** Graceful (Ctrl-Alt-Del / SIGTERM), forced after the timeout. */
  shutdown(spec: VmSpec, h: BackendHandle, opts: { timeoutMs: number }): Promise<{ forced: boolean }>;
  reboot(spec: VmSpec, h: BackendHandle): Promise<BackendHandle>;
  /** Kills if needed; removes everything it created (mounts, bundles, overlays, sockets); idempotent. */
  delete(spec: VmSpec, h?: BackendHandle): Promise<void>;
  /** After a metald restart: is this VM's process still the one we started? */
  adopt(spec: VmSpec, h: BackendHandle): Promise<"running" | "paused" | "gone">;
  /** Backend-specific counters (QEMU: /proc/<pid> + QMP query-blockstats). */
  stats?(spec: VmSpec, h: BackendHandle): Promise<Partial<BackendStats>>;
}

/** The backend cannot run on this host (binary missing, no /dev/kvm, not root). */
export class BackendUnavailableError extends UnavailableError {
  constructor(
    readonly backend: BackendName,
    readonly reason: string,
    options?: { cause?: unknown },
  ) {
    super(`backend ${backend} is not available on this host: ${reason}`, options);
  }
}

/** The backend cannot do this at all (maps to `unimplemented`, as containerd's shims do). */
export class NotImplementedError extends UnimplementedError {
  constructor(
    readonly backend: BackendName,
    readonly operation: string,
    detail: string,
  ) {
    super(`backend ${backend} cannot ${operation}: ${detail}`);
  }
}
