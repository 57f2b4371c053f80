import { createContextKey, type HandlerContext } from "@connectrpc/connect";
import { UnauthenticatedError } from "../errors.js";
import type { Logger } from "../log.js";

export const TIERS = ["free", "pro", "enterprise", "dedicated"] as const;
export type Tier = (typeof TIERS)[number];

/** Who a call is for. Every tenant-scoped handler receives one and scopes all work by it. */
export interface TenantContext {
  readonly tenantId: string;
  readonly tier: Tier;
}

/** Per-call facts set by the server interceptors; handlers read them, never raw headers. */
export interface RequestContext {
  readonly requestId: string;
  /** `internal`: presented the service token. `external`: authenticated by the service's own hook (gatewayd API keys). */
  caller: "internal" | "external" | "anonymous";
  tenant: TenantContext | undefined;
  /** Logger carrying service, rpc, request_id and (once known) tenant_id. */
  log: Logger;
}

export const requestContextKey = createContextKey<RequestContext | undefined>(undefined, {
  description: "kiln request context",
});

/** Header names for calls between services. */
export const HEADERS = {
  serviceToken: "x-kiln-service-token",
  tenantId: "x-kiln-tenant-id",
  tenantTier: "x-kiln-tenant-tier",
  requestId: "x-request-id",
} as const;

/** Tenant ids end up in paths, metric labels and DB rows: a DNS label, nothing else. */
export const TENANT_ID_PATTERN = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

export function requestContext(ctx: HandlerContext): RequestContext {
  const rc = ctx.values.get(requestContextKey);
  if (!rc) throw new Error("kiln request context missing: was the service built with kit's interceptors?");
  return rc;
}

/** The caller's tenant, or `unauthenticated` for calls that carry none. */
export function requireTenant(ctx: HandlerContext): TenantContext {
  const tenant = requestContext(ctx).tenant;
  if (!tenant) {
    throw new UnauthenticatedError(
      `this call is tenant-scoped: internal callers must send ${HEADERS.tenantId} with the service token`,
    );
  }
  return tenant;
}
