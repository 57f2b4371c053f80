import { randomUUID } from "node:crypto";
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { HEADERS, type RequestContext, requestContextKey } from "../../auth/tenant.js";
import { isClientError } from "../../errors.js";
import type { Logger } from "../../log.js";
import type { ServiceMetrics } from "../../metrics.js";
import { withServerSpan } from "../../tracing.js";

const REQUEST_ID = /^[A-Za-z0-9._:-]{1,128}$/;

/**
 * Outermost interceptor: gives each call a request id (the caller's `x-request-id` when well-formed),
 * a request-scoped logger and a trace span; records `<service>_rpc_*` metrics and one log line per
 * call with its Connect code and duration. Streams are measured until they end.
 */
export function observeInterceptor(opts: {
  service: string;
  log: Logger;
  metrics: ServiceMetrics;
}): Interceptor {
  return (next) => async (req) => {
    const started = performance.now();
    const incoming = req.header.get(HEADERS.requestId);
    const requestId = incoming && REQUEST_ID.test(incoming) ? incoming : randomUUID();
    const rpc = { service: req.service.typeName, method: req.method.name };
    const rc: RequestContext = {
      requestId,
      caller: "anonymous",
      tenant: undefined,
      log: opts.log.child({ request_id: requestId, rpc: `${rpc.service}/${rpc.method}` }),
    };
    req.contextValues.set(requestContextKey, rc);

    const finish = (err: unknown) => {
      const code = err === undefined ? "ok" : Code[ConnectError.from(err).code].toLowerCase();
      const seconds = (performance.now() - started) / 1000;
      opts.metrics.rpcRequests.inc({ method: rpc.method, code });
      opts.metrics.rpcDuration.observe({ method: rpc.method }, seconds);
      const line = { code, duration_ms: Math.round(seconds * 1000) };
      if (err === undefined) rc.log.debug(line, "rpc ok");
      else if (isClientError(ConnectError.from(err).code))
        rc.log.info({ ...line, error: ConnectError.from(err).rawMessage }, "rpc refused");
      else rc.log.error({ ...line, err: (err as { cause?: unknown }).cause ?? err }, "rpc failed");
    };

    return withServerSpan(opts.service, rpc, req.header, async (span) => {
      span.setAttribute("kiln.request_id", requestId);
      let res: Awaited<ReturnType<typeof next>>;
      try {
        res = await next(req);
      } catch (err) {
        finish(err);
        if (err instanceof ConnectError) err.metadata.set(HEADERS.requestId, requestId);
        throw err;
      }
      res.header.set(HEADERS.requestId, requestId);
      if (rc.tenant) span.setAttribute("kiln.tenant_id", rc.tenant.tenantId);
      if (!res.stream) {
        finish(undefined);
        return res;
      }
      const inner = res.message;
      return {
        ...res,
        message: (async function* () {
          try {
            yield* inner;
            finish(undefined);
          } catch (err) {
            finish(err);
            throw err;
          }
        })(),
      };
    });
  };
}
