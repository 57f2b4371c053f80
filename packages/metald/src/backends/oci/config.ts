import type { ImageUser } from "@kiln/kit";
import { InvalidArgumentError } from "@kiln/kit";
import type { VmSpec } from "../backend.js";

/** The subset of the OCI runtime spec (1.0.2) Kiln writes. */
export interface OciMount {
  destination: string;
  type: string;
  source: string;
  options?: string[];
}

export interface OciNamespace {
  type: "pid" | "network" | "ipc" | "uts" | "mount" | "user" | "cgroup";
  path?: string;
}

export interface OciSpec {
  ociVersion: string;
  process: {
    terminal: boolean;
    user: { uid: number; gid: number; additionalGids?: number[] };
    args: string[];
    env: string[];
    cwd: string;
    capabilities: Record<"bounding" | "effective" | "permitted" | "inheritable" | "ambient", string[]>;
    rlimits: Array<{ type: string; hard: number; soft: number }>;
    noNewPrivileges: boolean;
  };
  root: { path: string; readonly: boolean };
  hostname: string;
  mounts: OciMount[];
  annotations?: Record<string, string>;
  linux: {
    cgroupsPath: string;
    resources: {
      devices: Array<{ allow: boolean; access: string }>;
      memory?: { limit: number };
      cpu?: { quota: number; period: number };
    };
    namespaces: OciNamespace[];
    maskedPaths: string[];
    readonlyPaths: string[];
  };
}

export type OciNetwork =
  /** Join this namespace (runc with the VM's netns). */
  | { kind: "join"; path: string }
  /** A fresh namespace with only loopback (no network given). */
  | { kind: "private" }
  /** No network namespace in the config: the runtime is already inside the right one (gVisor, --network=host). */
  | { kind: "inherit" };

export interface OciConfigInput {
  spec: VmSpec;
  user: ImageUser;
  /** What the container runs, after any init wrapper (see containerArgs). */
  args: string[];
  network: OciNetwork;
  cgroupsPath: string;
  /** Files bind-mounted over the image's (/etc/hosts, /etc/hostname, /etc/resolv.conf). */
  etcFiles: Array<{ destination: string; source: string }>;
  /** Apply the VM's size (memory, vCPUs) to the container's own cgroup. */
  limits: { memory: boolean; cpu: boolean };
  /** RLIMIT_NOFILE for the workload; at most the runtime's own hard limit (raising it needs CAP_SYS_RESOURCE). */
  nofile: number;
}

/**
 * Docker's default capability set without NET_RAW and MKNOD: a tenant's workload has no business
 * crafting raw packets on the host's network or making device nodes. A non-root workload user
 * gets none of them effective (no ambient set), as with Docker.
 */
export const DEFAULT_CAPABILITIES = [
  "CAP_CHOWN",
  "CAP_DAC_OVERRIDE",
  "CAP_FSETID",
  "CAP_FOWNER",
  "CAP_SETGID",
  "CAP_SETUID",
  "CAP_SETFCAP",
  "CAP_SETPCAP",
  "CAP_NET_BIND_SERVICE",
  "CAP_SYS_CHROOT",
  "CAP_KILL",
  "CAP_AUDIT_WRITE",
];

const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const CPU_PERIOD_US = 100_000;

/** Docker's rule for what to run: entrypoint + cmd; either may be empty, not both. */
export function workloadArgv(spec: VmSpec): string[] {
  const argv = [...spec.workload.entrypoint, ...spec.workload.cmd];
  if (argv.length === 0 || argv[0] === "") {
    throw new InvalidArgumentError("the workload has neither an entrypoint nor a cmd: nothing to run", {
      field: "workload.cmd",
    });
  }
  return argv;
}

/**
 * The container's argv. With Kiln's injected tini (/.kiln/tini, present in every builderd
 * rootfs) as PID 1, a SIGTERM from shutdown reaches the workload: the kernel drops signals to a
 * namespace's init that has no handler for them, so a bare `httpd` as PID 1 would ignore it.
 */
export function containerArgs(spec: VmSpec, hasKilnTini: boolean): string[] {
  const argv = workloadArgv(spec);
  return hasKilnTini ? ["/.kiln/tini", "-g", "--", ...argv] : argv;
}

/** The OCI runtime config (config.json) for a VM run by a container runtime. */
export function ociRuntimeConfig(input: OciConfigInput): OciSpec {
  const { spec, user } = input;
  const env = new Map<string, string>([
    ["PATH", DEFAULT_PATH],
    ["HOSTNAME", spec.hostname],
  ]);
  for (const [k, v] of Object.entries(spec.workload.env)) {
    if (k === "" || k.includes("=") || k.includes("\0") || v.includes("\0")) {
      throw new InvalidArgumentError(
        `environment variable ${JSON.stringify(k)} is invalid: names must be non-empty without "=", and nothing may contain NUL`,
        { field: `workload.env.${k}` },
      );
    }
    env.set(k, v);
  }
  const cwd = spec.workload.workingDir || "/";
  if (!cwd.startsWith("/")) {
    throw new InvalidArgumentError(`working directory ${JSON.stringify(cwd)} must be an absolute path`, {
      field: "workload.workingDir",
    });
  }
  const caps = user.uid === 0 ? DEFAULT_CAPABILITIES : [];
  const namespaces: OciNamespace[] = [{ type: "pid" }, { type: "ipc" }, { type: "uts" }, { type: "mount" }];
  if (input.network.kind === "join") namespaces.push({ type: "network", path: input.network.path });
  if (input.network.kind === "private") namespaces.push({ type: "network" });

  const resources: OciSpec["linux"]["resources"] = { devices: [{ allow: false, access: "rwm" }] };
  if (input.limits.memory) resources.memory = { limit: spec.memoryBytes };
  if (input.limits.cpu) resources.cpu = { quota: spec.vcpus * CPU_PERIOD_US, period: CPU_PERIOD_US };

  return {
    ociVersion: "1.0.2-dev",
    process: {
      terminal: false,
      user: {
        uid: user.uid,
        gid: user.gid,
        ...(user.additionalGids.length > 0 ? { additionalGids: user.additionalGids } : {}),
      },
      args: input.args,
      env: [...env].map(([k, v]) => `${k}=${v}`),
      cwd,
      capabilities: { bounding: caps, effective: caps, permitted: caps, inheritable: [], ambient: [] },
      rlimits: [{ type: "RLIMIT_NOFILE", hard: input.nofile, soft: input.nofile }],
      noNewPrivileges: true,
    },
    // The root is the VM's own overlay: writable, and the base image below it is untouched.
    root: { path: "rootfs", readonly: false },
    hostname: spec.hostname,
    mounts: [
      { destination: "/proc", type: "proc", source: "proc" },
      {
        destination: "/dev",
        type: "tmpfs",
        source: "tmpfs",
        options: ["nosuid", "strictatime", "mode=755", "size=65536k"],
      },
      {
        destination: "/dev/pts",
        type: "devpts",
        source: "devpts",
        options: ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
      },
      {
        destination: "/dev/shm",
        type: "tmpfs",
        source: "shm",
        options: ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
      },
      {
        destination: "/dev/mqueue",
        type: "mqueue",
        source: "mqueue",
        options: ["nosuid", "noexec", "nodev"],
      },
      { destination: "/sys", type: "sysfs", source: "sysfs", options: ["nosuid", "noexec", "nodev", "ro"] },
      {
        destination: "/sys/fs/cgroup",
        type: "cgroup",
        source: "cgroup",
        options: ["nosuid", "noexec", "nodev", "relatime", "ro"],
      },
      ...input.etcFiles.map((f) => ({
        destination: f.destination,
        type: "bind",
        source: f.source,
        options: ["rbind", "rprivate", "nosuid", "nodev", "noexec"],
      })),
    ],
    annotations: { "dev.kiln.vm-id": spec.vmId, "dev.kiln.tenant-id": spec.tenantId },
    linux: {
      cgroupsPath: input.cgroupsPath,
      resources,
      namespaces,
      maskedPaths: [
        "/proc/acpi",
        "/proc/asound",
        "/proc/kcore",
        "/proc/keys",
        "/proc/latency_stats",
        "/proc/timer_list",
        "/proc/timer_stats",
        "/proc/sched_debug",
        "/sys/firmware",
        "/proc/scsi",
      ],
      readonlyPaths: ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    },
  };
}

/** /etc/hosts for the container: localhost plus its own name on its address. */
export function renderHosts(spec: VmSpec): string {
  const lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"];
  if (spec.network) lines.push(`${spec.network.guestIp}\t${spec.hostname}`);
  else lines[0] = `127.0.0.1\tlocalhost ${spec.hostname}`;
  return `${lines.join("\n")}\n`;
}

/** resolv.conf from the network's resolver list ("a,b"); undefined keeps the image's. */
export function renderResolvConf(spec: VmSpec): string | undefined {
  const dns = spec.network?.dns;
  if (!dns) return undefined;
  const servers = dns.split(/[,\s]+/).filter(Boolean);
  return servers.length > 0 ? `${servers.map((s) => `nameserver ${s}`).join("\n")}\n` : undefined;
}
