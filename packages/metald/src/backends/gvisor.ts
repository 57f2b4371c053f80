import { existsSync } from "node:fs";
import type { Backend } from "./backend.js";
import { createOciRuntimeBackend, type OciBackendOptions, probeOciRuntime } from "./oci/runtime-backend.js";

export interface GvisorBackendOptions extends OciBackendOptions {
  /** The runsc binary (default: `runsc` on PATH). */
  binary?: string;
  /** gVisor platform: `ptrace` works everywhere; `kvm` needs /dev/kvm. */
  platform?: "ptrace" | "kvm";
  /** nsenter, used to start the sandbox inside the VM's network namespace. */
  nsenter?: string;
}

/**
 * gVisor (runsc): the workload runs on gVisor's user-space kernel, so it never makes a system
 * call to the host kernel directly. A sandbox, not a VM.
 *
 * Networking (HOST-FACTS): runsc's own sandbox networking fails on this kernel, so runsc runs
 * with `--network=host` *inside the VM's network namespace*: `nsenter --net=PATH runsc create …`
 * (not `ip netns exec`, which remounts /sys and breaks runsc's cgroup handling), and config.json
 * has no network namespace. Every other runsc command runs in that namespace too: the sandbox's
 * control socket is an abstract unix socket, and those belong to a network namespace (from the
 * root namespace `runsc state` calls a running sandbox "stopped"). Without a network,
 * `--network=none` (loopback only).
 * The rootfs overlay is Kiln's own (`--overlay2=none`), so what the workload writes survives a
 * reboot in the VM directory, as with the other backends.
 */
export function createGvisorBackend(opts: GvisorBackendOptions = {}): Backend {
  const binary = opts.binary ?? "runsc";
  const platform = opts.platform ?? "ptrace";
  const nsenter = opts.nsenter ?? "nsenter";
  return createOciRuntimeBackend(
    {
      name: "gvisor",
      binary,
      globalFlags: (stateDir, spec) => [
        "--root",
        stateDir,
        `--platform=${platform}`,
        `--network=${spec.network ? "host" : "none"}`,
        "--overlay2=none",
      ],
      // Once the namespace is gone (the network was detached first), nothing can reach the sandbox's
      // control socket any more; runsc then sees the container as stopped, and delete kills by pid.
      wrap: (argv, spec) =>
        spec.network && existsSync(spec.network.netnsPath)
          ? { file: nsenter, args: [`--net=${spec.network.netnsPath}`, "--", ...argv] }
          : { file: argv[0]!, args: argv.slice(1) },
      network: () => ({ kind: "inherit" }),
      // The sandbox's memory includes gVisor's own kernel: capping it at the VM's size would
      // starve the workload, so metald's cgroup limits memory, and the VM's vCPUs cap CPU here.
      limits: { memory: false, cpu: true },
      probe: () =>
        probeOciRuntime({
          binary,
          debianPackage: "runsc",
          isolation: "sandbox",
          accelerated: platform === "kvm",
          available: `gVisor on the ${platform} platform`,
        }),
    },
    opts,
  );
}
