import { ApiKeyService, AppService, TenantService } from "@kiln/api";
import { defineService, notImplemented } from "@kiln/kit";
import { settings } from "./config.js";
import { migrations } from "./migrations.js";

const PLAN = "gatewayd: a later issue";

/** gatewayd: API gateway: tenants, API keys, rate limits, apps and deployments, app ingress. */
export const gatewayd = defineService({
  name: "gatewayd",
  summary: "API gateway: tenants, API keys, rate limits, apps and deployments, app ingress",
  settings,
  peers: ["builderd", "assetmanagerd", "metald", "billing"],
  migrations,
  create() {
    return {
      routes(router) {
        router.service(TenantService, notImplemented(TenantService, PLAN));
        router.service(ApiKeyService, notImplemented(ApiKeyService, PLAN));
        router.service(AppService, notImplemented(AppService, PLAN));
      },
    };
  },
});
