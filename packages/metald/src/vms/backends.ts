import { UnavailableError } from "@kiln/kit";
import {
  type Backend,
  type BackendName,
  type BackendsConfig,
  BackendUnavailableError,
  createBackend,
  parseBackendChoice,
  probeAll,
  rankReports,
} from "../backends/index.js";
import type { BackendRegistry } from "./manager.js";

/**
 * The backends of this host, probed once at start: requests naming an unavailable backend are
 * refused with the probe's reason; "auto" is the strongest that works.
 */
export async function createBackendRegistry(
  cfg: BackendsConfig = {},
): Promise<
  BackendRegistry & { reports: Awaited<ReturnType<typeof probeAll>>; auto: BackendName | undefined }
> {
  const reports = await probeAll(cfg);
  const auto = rankReports(reports)[0]?.name;
  const backends = new Map<BackendName, Backend>();
  const get = (name: BackendName) => {
    const b = backends.get(name) ?? createBackend(name, cfg);
    backends.set(name, b);
    return b;
  };
  return {
    reports,
    auto,
    get,
    async choose(requested) {
      const choice = parseBackendChoice(requested || "auto", "config.backend");
      if (choice === "auto") {
        if (!auto) {
          const why = reports.map((r) => `${r.name}: ${r.probe.reason}`).join("; ");
          throw new UnavailableError(
            `no VM backend works on this host (${why}); run scripts/setup-system.sh`,
          );
        }
        return auto;
      }
      const report = reports.find((r) => r.name === choice);
      if (!report?.probe.available) {
        throw new BackendUnavailableError(choice, report?.probe.reason ?? "unknown backend");
      }
      return choice;
    },
  };
}
