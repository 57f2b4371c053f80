import { InvalidArgumentError, UnavailableError } from "@kiln/kit";
import {
  BACKEND_NAMES,
  type Backend,
  type BackendName,
  BackendUnavailableError,
  type ProbeResult,
} from "./backend.js";
import { createFirecrackerBackend, type FirecrackerBackendOptions } from "./firecracker/firecracker.js";
import { createGvisorBackend, type GvisorBackendOptions } from "./gvisor.js";
import { createQemuBackend, type QemuBackendOptions } from "./qemu/qemu.js";
import { createRuncBackend, type RuncBackendOptions } from "./runc.js";

export * from "./backend.js";

/** Per-backend options; the one place that knows which factory builds which backend. */
export interface BackendsConfig {
  runc?: RuncBackendOptions;
  gvisor?: GvisorBackendOptions;
  qemu?: QemuBackendOptions;
  firecracker?: FirecrackerBackendOptions;
}

const FACTORIES: { [N in BackendName]: (cfg: BackendsConfig) => Backend } = {
  firecracker: (cfg) => createFirecrackerBackend(cfg.firecracker),
  qemu: (cfg) => createQemuBackend(cfg.qemu),
  gvisor: (cfg) => createGvisorBackend(cfg.gvisor),
  runc: (cfg) => createRuncBackend(cfg.runc),
};

export type BackendChoice = BackendName | "auto";

/** Parses a configured backend name ("auto" or one of BACKEND_NAMES), naming the field on error. */
export function parseBackendChoice(value: string, field = "backend"): BackendChoice {
  const v = value.trim().toLowerCase();
  if (v === "auto" || (BACKEND_NAMES as readonly string[]).includes(v)) return v as BackendChoice;
  throw new InvalidArgumentError(
    `${field} ${JSON.stringify(value)} is not a backend: use auto, ${BACKEND_NAMES.join(", ")}`,
    { field },
  );
}

export function createBackend(name: BackendName, cfg: BackendsConfig = {}): Backend {
  return FACTORIES[name](cfg);
}

export interface BackendReport {
  name: BackendName;
  probe: ProbeResult;
}

/** Every backend's probe, for `kiln doctor`. A probe that throws reports the error as the reason. */
export async function probeAll(cfg: BackendsConfig = {}): Promise<BackendReport[]> {
  return Promise.all(
    BACKEND_NAMES.map(async (name) => {
      const backend = createBackend(name, cfg);
      try {
        return { name, probe: await backend.probe() };
      } catch (err) {
        return {
          name,
          probe: {
            available: false,
            reason: `probe failed: ${(err as Error).message}`,
            isolation: "container" as const,
            accelerated: false,
            version: "",
          },
        };
      }
    }),
  );
}

/**
 * The order `auto` prefers, strongest isolation first:
 *
 * 1. firecracker — a hardware VM (KVM) with a minimal device model written in Rust, launched
 *    through the jailer (chroot, seccomp, its own uid, cgroups): the smallest attack surface.
 * 2. qemu with KVM — also a hardware VM, but a larger device model in C and no jailer.
 * 3. gvisor — the workload's system calls go to gVisor's user-space kernel, never straight to the
 *    host's; the sandbox itself runs on the host kernel under seccomp. Weaker than a hardware VM,
 *    much stronger than a container, and fast to start.
 * 4. qemu under TCG — software emulation does keep a separate guest kernel, but QEMU does not
 *    treat TCG as a security boundary (its security policy covers only the KVM "virtualization
 *    use case"), and it is the slowest to boot; hence after gVisor.
 * 5. runc — namespaces and cgroups on the shared host kernel: the weakest, for development.
 */
export function rankReports(reports: BackendReport[]): BackendReport[] {
  const score = (r: BackendReport): number => {
    switch (r.name) {
      case "firecracker":
        return 5;
      case "qemu":
        return r.probe.accelerated ? 4 : 2;
      case "gvisor":
        return 3;
      case "runc":
        return 1;
    }
  };
  return reports.filter((r) => r.probe.available).sort((a, b) => score(b) - score(a));
}

/** The strongest backend that works on this host, with every probe (for the log and `kiln doctor`). */
export async function autoBackend(
  cfg: BackendsConfig = {},
): Promise<{ backend: Backend; probe: ProbeResult; reports: BackendReport[] }> {
  const reports = await probeAll(cfg);
  const best = rankReports(reports)[0];
  if (!best) {
    const why = reports.map((r) => `${r.name}: ${r.probe.reason}`).join("; ");
    throw new UnavailableError(`no VM backend works on this host (${why}); run scripts/setup-system.sh`);
  }
  return { backend: createBackend(best.name, cfg), probe: best.probe, reports };
}

/** A backend by configured choice: a name (which must work here), or `auto`. */
export async function resolveBackend(choice: BackendChoice, cfg: BackendsConfig = {}): Promise<Backend> {
  if (choice === "auto") return (await autoBackend(cfg)).backend;
  const backend = createBackend(choice, cfg);
  const probe = await backend.probe();
  if (!probe.available) throw new BackendUnavailableError(choice, probe.reason);
  return backend;
}
