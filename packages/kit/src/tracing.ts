import { context, propagation, type Span, SpanKind, SpanStatusCode, trace } from "@opentelemetry/api";
import { W3CTraceContextPropagator } from "@opentelemetry/core";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { BatchSpanProcessor, NodeTracerProvider } from "@opentelemetry/sdk-trace-node";

/**
 * OpenTelemetry tracing over OTLP/HTTP, enabled per service with `…_OTEL_ENABLED=true`.
 * Spans are made by the RPC interceptor (one per call, W3C trace context propagated through
 * headers) rather than by monkey-patching `http`, which ESM makes unreliable. When tracing is off
 * no provider is registered and the API is a no-op.
 */
export interface Tracing {
  shutdown(): Promise<void>;
}

let active: { provider: NodeTracerProvider; users: number } | undefined;

export function startTracing(opts: { serviceName: string; endpoint: string }): Tracing {
  // One provider per process: under `kiln up` the first service to enable tracing registers it
  // and the rest share it (each span still carries its service in `kiln.service`).
  if (!active) {
    const exporter = new OTLPTraceExporter({ url: `${opts.endpoint.replace(/\/$/, "")}/v1/traces` });
    const provider = new NodeTracerProvider({
      resource: resourceFromAttributes({ "service.name": opts.serviceName }),
      spanProcessors: [new BatchSpanProcessor(exporter, { scheduledDelayMillis: 500 })],
    });
    provider.register({ propagator: new W3CTraceContextPropagator() });
    active = { provider, users: 0 };
  }
  active.users++;
  let stopped = false;
  return {
    async shutdown() {
      if (stopped || !active) return;
      stopped = true;
      active.users--;
      if (active.users === 0) {
        const { provider } = active;
        active = undefined;
        await provider.shutdown();
        trace.disable();
        propagation.disable();
        context.disable();
      }
    },
  };
}

const tracer = () => trace.getTracer("kiln");

/** Runs `fn` in a server span for an RPC, continuing the caller's trace from `headers`. */
export async function withServerSpan<T>(
  service: string,
  rpc: { service: string; method: string },
  headers: Headers,
  fn: (span: Span) => Promise<T>,
): Promise<T> {
  const parent = propagation.extract(context.active(), headers, {
    get: (h, key) => h.get(key) ?? undefined,
    keys: (h) => [...h.keys()],
  });
  return tracer().startActiveSpan(
    `${rpc.service}/${rpc.method}`,
    {
      kind: SpanKind.SERVER,
      attributes: {
        "rpc.system": "connect_rpc",
        "rpc.service": rpc.service,
        "rpc.method": rpc.method,
        "kiln.service": service,
      },
    },
    parent,
    async (span) => {
      try {
        return await fn(span);
      } catch (err) {
        span.setStatus({
          code: SpanStatusCode.ERROR,
          message: err instanceof Error ? err.message : String(err),
        });
        throw err;
      } finally {
        span.end();
      }
    },
  );
}

/** Writes the active trace context into outgoing request headers. */
export function injectTraceContext(headers: Headers): void {
  propagation.inject(context.active(), headers, { set: (h, k, v) => h.set(k, v) });
}
