import type { Interceptor } from "@connectrpc/connect";
import { tokensEqual } from "../../auth/service-token.js";
import {
  HEADERS,
  requestContextKey,
  TENANT_ID_PATTERN,
  type TenantContext,
  TIERS,
  type Tier,
} from "../../auth/tenant.js";
import { InvalidArgumentError, UnauthenticatedError } from "../../errors.js";

/**
 * Hook for services with their own external callers (gatewayd: API keys). Returns the caller's
 * tenant, or undefined when the request carries no credentials it recognises.
 */
export type ExternalAuthenticator = (header: Headers) => Promise<TenantContext | undefined>;

/**
 * Internal auth. A caller presenting the service token is internal and may name a tenant in
 * `x-kiln-tenant-id` (and its tier in `x-kiln-tenant-tier`). A tenant header without the token is
 * refused: only trusted services may act for a tenant. Without a token, the service's external
 * authenticator (if any) decides; otherwise the call is refused.
 */
export function authInterceptor(opts: {
  serviceToken: string;
  external?: ExternalAuthenticator;
}): Interceptor {
  return (next) => async (req) => {
    const rc = req.contextValues.get(requestContextKey);
    if (!rc) throw new Error("authInterceptor must run inside observeInterceptor");
    const token = req.header.get(HEADERS.serviceToken);
    const tenantId = req.header.get(HEADERS.tenantId);

    if (token !== null) {
      if (!tokensEqual(token, opts.serviceToken)) throw new UnauthenticatedError("invalid service token");
      rc.caller = "internal";
      if (tenantId !== null) rc.tenant = { tenantId: checkTenantId(tenantId), tier: checkTier(req.header) };
    } else if (tenantId !== null) {
      throw new UnauthenticatedError(
        `${HEADERS.tenantId} is only accepted from internal callers presenting ${HEADERS.serviceToken}`,
      );
    } else {
      const tenant = opts.external ? await opts.external(req.header) : undefined;
      if (!tenant) {
        throw new UnauthenticatedError(
          opts.external
            ? "missing or invalid credentials: send an API key as 'authorization: Bearer <key>'"
            : `missing service token: internal services accept calls only with ${HEADERS.serviceToken}`,
        );
      }
      rc.caller = "external";
      rc.tenant = tenant;
    }
    if (rc.tenant) rc.log = rc.log.child({ tenant_id: rc.tenant.tenantId });
    return next(req);
  };
}

function checkTenantId(raw: string): string {
  if (!TENANT_ID_PATTERN.test(raw)) {
    throw new InvalidArgumentError(
      `${HEADERS.tenantId}: ${JSON.stringify(raw.slice(0, 80))} is not a valid tenant id (a DNS label)`,
    );
  }
  return raw;
}

function checkTier(header: Headers): Tier {
  const raw = header.get(HEADERS.tenantTier);
  if (raw === null || raw === "") return "free";
  const tier = raw.toLowerCase() as Tier;
  if (!TIERS.includes(tier)) {
    throw new InvalidArgumentError(
      `${HEADERS.tenantTier}: expected one of ${TIERS.join(", ")}, got ${JSON.stringify(raw)}`,
    );
  }
  return tier;
}
