import type { ServiceMetrics } from "@kiln/kit";
import { Counter, Gauge, Histogram } from "prom-client";

/** metald's metrics (the names). `vms` is filled from the DB at scrape time. */
export function createMetaldMetrics(
  metrics: ServiceMetrics,
  countVms: () => Promise<Array<{ state: string; backend: string; n: number }>>,
) {
  const registers = [metrics.registry];
  const vms = new Gauge({
    name: "metald_vms",
    help: "VMs on this host by state and backend.",
    labelNames: ["state", "backend"] as const,
    registers,
    async collect() {
      this.reset();
      for (const r of await countVms()) this.set({ state: r.state, backend: r.backend }, r.n);
    },
  });
  const bootDuration = new Histogram({
    name: "metald_vm_boot_duration_seconds",
    help: "Time BootVm took to start a VM's process, by backend.",
    labelNames: ["backend"] as const,
    buckets: [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30],
    registers,
  });
  const operations = new Counter({
    name: "metald_vm_operations_total",
    help: "VM operations by verb and result.",
    labelNames: ["op", "result"] as const,
    registers,
  });
  return {
    vms,
    boot: (backend: string, seconds: number) => bootDuration.observe({ backend }, seconds),
    op: (op: string, result: "ok" | "error") => operations.inc({ op, result }),
  };
}
