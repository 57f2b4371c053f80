import type { Backend, ProbeResult } from "./backend.js";
import { commandVersion } from "./command.js";
import { createOciRuntimeBackend, type OciBackendOptions } from "./oci/runtime-backend.js";

export interface RuncBackendOptions extends OciBackendOptions {
  /** The runc binary (default: `runc` on PATH). */
  binary?: string;
}

/**
 * runc: a plain OCI container on the host kernel. The weakest isolation Kiln offers (namespaces,
 * cgroups and capabilities only), and the fastest to start, for development and tests.
 *
 * The VM's root is an overlay over the read-only base image; the container joins the VM's
 * network namespace (spec.network.netnsPath, whose interface carries the VM address) or gets a
 * private one with only loopback; its cgroup is a child of spec.cgroupParent, limited to the VM's
 * memory and vCPUs; its user is the image's (unprivileged where the image says so).
 */
export function createRuncBackend(opts: RuncBackendOptions = {}): Backend {
  const binary = opts.binary ?? "runc";
  return createOciRuntimeBackend(
    {
      name: "runc",
      binary,
      globalFlags: (stateDir) => ["--root", stateDir],
      wrap: ([file, ...args]) => ({ file: file!, args }),
      network: (spec) =>
        spec.network ? { kind: "join", path: spec.network.netnsPath } : { kind: "private" },
      limits: { memory: true, cpu: true },
      async probe(): Promise<ProbeResult> {
        const base = { isolation: "container" as const, accelerated: false };
        if (process.getuid?.() !== 0) {
          return {
            ...base,
            available: false,
            reason: "runc needs root (mounts, namespaces, cgroups)",
            version: "",
          };
        }
        const version = await commandVersion(binary);
        if (!version) {
          return {
            ...base,
            available: false,
            reason: `${binary} is not installed (Debian package runc)`,
            version: "",
          };
        }
        return { ...base, available: true, reason: "runc runs containers on the host kernel", version };
      },
    },
    opts,
  );
}
