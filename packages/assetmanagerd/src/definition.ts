import { AssetManagerService } from "@kiln/api";
import { defineService, notImplemented } from "@kiln/kit";
import { settings } from "./config.js";
import { migrations } from "./migrations.js";

const PLAN = "issue #4: assetmanagerd";

/** assetmanagerd: assets: content-addressed blobs, leases, GC, prepare-into-VM. */
export const assetmanagerd = defineService({
  name: "assetmanagerd",
  summary: "assets: content-addressed blobs, leases, GC, prepare-into-VM",
  settings,
  peers: ["builderd"],
  migrations,
  create() {
    return {
      routes(router) {
        router.service(AssetManagerService, notImplemented(AssetManagerService, PLAN));
      },
    };
  },
});
