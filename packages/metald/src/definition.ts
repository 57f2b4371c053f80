import { VmService } from "@kiln/api";
import { defineService, notImplemented } from "@kiln/kit";
import { settings } from "./config.js";
import { migrations } from "./migrations.js";

const PLAN = "issue #5: metald";

/** metald: VMs of one host: lifecycle, networking, cgroups, 100 ms sampling. */
export const metald = defineService({
  name: "metald",
  summary: "VMs of one host: lifecycle, networking, cgroups, 100 ms sampling",
  settings,
  peers: ["assetmanagerd", "billaged"],
  migrations,
  create() {
    return {
      routes(router) {
        router.service(VmService, notImplemented(VmService, PLAN));
      },
    };
  },
});
