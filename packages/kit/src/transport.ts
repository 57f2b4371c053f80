import type { Interceptor, Transport } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { HEADERS, type RequestContext, type TenantContext } from "./auth/tenant.js";
import { injectTraceContext } from "./tracing.js";

/** Client side of internal auth: every call to a peer service carries the service token and trace context. */
export function internalClientInterceptor(serviceToken: string): Interceptor {
  return (next) => async (req) => {
    if (!req.header.has(HEADERS.serviceToken)) req.header.set(HEADERS.serviceToken, serviceToken);
    injectTraceContext(req.header);
    return next(req);
  };
}

/** A transport to a peer over the network (Connect protocol, HTTP/1.1), with internal auth. */
export function createPeerTransport(baseUrl: string, serviceToken: string): Transport {
  return createConnectTransport({
    baseUrl,
    httpVersion: "1.1",
    interceptors: [internalClientInterceptor(serviceToken)],
  });
}

/**
 * A transport resolved on first use. `kiln up` wires services that call each other in a cycle
 * (assetmanagerd ↔ builderd) through in-process transports that exist only once both have started.
 */
export function createLazyTransport(resolve: () => Transport): Transport {
  return {
    unary: (method, signal, timeoutMs, header, input, contextValues) =>
      resolve().unary(method, signal, timeoutMs, header, input, contextValues),
    stream: (method, signal, timeoutMs, header, input, contextValues) =>
      resolve().stream(method, signal, timeoutMs, header, input, contextValues),
  };
}

/**
 * Call options that act for `tenant` and keep the request id, for a handler calling a peer:
 * `await peers.builderd.getBuild(req, forTenant(tenant, rc))`.
 */
export function forTenant(
  tenant: TenantContext,
  rc?: Pick<RequestContext, "requestId">,
): { headers: Headers } {
  const headers = new Headers({ [HEADERS.tenantId]: tenant.tenantId, [HEADERS.tenantTier]: tenant.tier });
  if (rc) headers.set(HEADERS.requestId, rc.requestId);
  return { headers };
}
