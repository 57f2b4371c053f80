import { BuilderService } from "@kiln/api";
import { defineService, notImplemented } from "@kiln/kit";
import { settings } from "./config.js";
import { migrations } from "./migrations.js";

const PLAN = "issue #3: builderd";

/** builderd: builds: container image → bootable microVM rootfs. */
export const builderd = defineService({
  name: "builderd",
  summary: "builds: container image → bootable microVM rootfs",
  settings,
  peers: ["assetmanagerd"],
  migrations,
  create() {
    return {
      routes(router) {
        router.service(BuilderService, notImplemented(BuilderService, PLAN));
      },
    };
  },
});
