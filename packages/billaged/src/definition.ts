import { BillingService } from "@kiln/api";
import { defineService, notImplemented } from "@kiln/kit";
import { settings } from "./config.js";
import { migrations } from "./migrations.js";

const PLAN = "billaged: a later issue";

/** billaged: usage intake: per-VM ring buffers, write-ahead log, batches, gap detection. */
export const billaged = defineService({
  name: "billaged",
  summary: "usage intake: per-VM ring buffers, write-ahead log, batches, gap detection",
  settings,
  peers: [],
  migrations,
  create() {
    return {
      routes(router) {
        router.service(BillingService, notImplemented(BillingService, PLAN));
      },
    };
  },
});
