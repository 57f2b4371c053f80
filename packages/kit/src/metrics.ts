import { Counter, collectDefaultMetrics, Histogram, Registry } from "prom-client";

/**
 * One prom-client registry per service (not the global default), so `kiln up` can run all six
 * services in one process and each still serves only its own metrics.
 */
export interface ServiceMetrics {
  readonly registry: Registry;
  readonly rpcRequests: Counter<"method" | "code">;
  readonly rpcDuration: Histogram<"method">;
}

// Process-wide metrics (event loop lag, heap, fds) are registered once and shared.
let processRegistry: Registry | undefined;
function processMetrics(): Registry {
  if (!processRegistry) {
    processRegistry = new Registry();
    collectDefaultMetrics({ register: processRegistry, prefix: "kiln_" });
  }
  return processRegistry;
}

export function createMetrics(service: string): ServiceMetrics {
  const registry = new Registry();
  const rpcRequests = new Counter({
    name: `${service}_rpc_requests_total`,
    help: "RPCs handled, by method and Connect code (ok for success).",
    labelNames: ["method", "code"] as const,
    registers: [registry],
  });
  const rpcDuration = new Histogram({
    name: `${service}_rpc_duration_seconds`,
    help: "RPC handling time in seconds (streams: until the stream ends).",
    labelNames: ["method"] as const,
    buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30],
    registers: [registry],
  });
  return { registry, rpcRequests, rpcDuration };
}

/** The text served on /metrics: the service's metrics plus the shared process metrics. */
export async function renderMetrics(metrics: ServiceMetrics): Promise<{ contentType: string; body: string }> {
  const merged = Registry.merge([metrics.registry, processMetrics()]);
  return { contentType: merged.contentType, body: await merged.metrics() };
}
