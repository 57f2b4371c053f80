import { UsageService } from "@kiln/api";
import { defineService, notImplemented } from "@kiln/kit";
import { settings } from "./config.js";
import { migrations } from "./migrations.js";

const PLAN = "billing: a later issue";

/** billing: billing aggregator: rollups, pricing, invoices, usage queries. */
export const billing = defineService({
  name: "billing",
  summary: "billing aggregator: rollups, pricing, invoices, usage queries",
  settings,
  peers: [],
  migrations,
  create() {
    return {
      routes(router) {
        router.service(UsageService, notImplemented(UsageService, PLAN));
      },
    };
  },
});
