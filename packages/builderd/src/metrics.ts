import type { ServiceMetrics } from "@kiln/kit";
import { Counter, Gauge, Histogram } from "prom-client";

/** builderd's metrics, with the seeds' names. */
export function createBuilderMetrics(metrics: ServiceMetrics) {
  const registers = [metrics.registry];
  return {
    builds: new Counter({
      name: "builderd_builds_total",
      help: "Builds that ended, by final status (completed, failed, cancelled).",
      labelNames: ["status"] as const,
      registers,
    }),
    duration: new Histogram({
      name: "builderd_builds_duration_seconds",
      help: "Wall-clock time of builds that ended, from start to end.",
      labelNames: ["status"] as const,
      buckets: [0.05, 0.25, 1, 5, 15, 30, 60, 120, 300, 600, 1800],
      registers,
    }),
    queue: new Gauge({
      name: "builderd_builds_queue_size",
      help: "Builds accepted but waiting for a build slot.",
      registers,
    }),
    active: new Gauge({
      name: "builderd_tenant_builds_active",
      help: "Builds running (not pending, not ended) per tenant.",
      labelNames: ["tenant_id"] as const,
      registers,
    }),
    pulls: new Counter({
      name: "builderd_docker_pulls_total",
      help: "Image pulls (all layers fetched or found in the cache), by registry.",
      labelNames: ["registry"] as const,
      registers,
    }),
    pullDuration: new Histogram({
      name: "builderd_docker_pull_duration_seconds",
      help: "Time to fetch all layers of an image, by registry.",
      labelNames: ["registry"] as const,
      buckets: [0.01, 0.05, 0.25, 1, 5, 15, 60, 300],
      registers,
    }),
  };
}

export type BuilderMetrics = ReturnType<typeof createBuilderMetrics>;
