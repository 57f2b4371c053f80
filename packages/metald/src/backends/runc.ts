import type { Backend } from "./backend.js";
import { createOciRuntimeBackend, type OciBackendOptions, probeOciRuntime } from "./oci/runtime-backend.js";

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
      probe: () =>
        probeOciRuntime({
          binary,
          debianPackage: "runc",
          isolation: "container",
          accelerated: false,
          available: "runc runs containers on the host kernel",
        }),
    },
    opts,
  );
}
