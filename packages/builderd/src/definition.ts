import path from "node:path";
import { BuilderService } from "@kiln/api";
import { defineService, tierLimits } from "@kiln/kit";
import type { Kysely } from "kysely";
import { createRootfsAssets } from "./builds/assets.js";
import { createBuildEvents } from "./builds/events.js";
import { createBuildManager } from "./builds/manager.js";
import { layerCacheDir, trashDir } from "./builds/paths.js";
import { type BuilderDb, createBuildStore } from "./builds/store.js";
import { createTrash } from "./builds/trash.js";
import { prepareTreeRoot, removeTreeRoot } from "./builds/tree-root.js";
import { createLayerCache } from "./cache/layer-cache.js";
import { settings } from "./config.js";
import { createLayerApplier } from "./extract/layer-applier.js";
import { createBuilderMetrics } from "./metrics.js";
import { migrations } from "./migrations.js";
import { createBuilderService } from "./service.js";

/** builderd: builds — container image → bootable microVM rootfs. */
export const builderd = defineService({
  name: "builderd",
  summary: "builds: container image → bootable microVM rootfs",
  settings,
  peers: ["assetmanagerd"],
  migrations,
  async create({ config, db, dataDir, log, metrics, peers }) {
    const store = createBuildStore(db.db as Kysely<BuilderDb>);
    const caches = new Map<string, ReturnType<typeof createLayerCache>>();
    // Only Kiln's writer leaves trees without content, worth putting on a tmpfs.
    const treeRoot =
      config.ext4Writer === "kiln"
        ? await prepareTreeRoot({ setting: config.treeDir, dataDir, log })
        : undefined;
    const manager = createBuildManager({
      store,
      events: createBuildEvents(store, log),
      dataDir,
      treeRoot,
      assets:
        config.registerAssets && peers.assetmanagerd ? createRootfsAssets(peers.assetmanagerd) : undefined,
      limits: tierLimits(),
      cacheFor(tenantId) {
        const cache = caches.get(tenantId) ?? createLayerCache(layerCacheDir(dataDir, tenantId));
        caches.set(tenantId, cache);
        return cache;
      },
      applier: createLayerApplier(),
      // The tree's trash first: trees are what is discarded most (a rename tried elsewhere fails).
      trash: createTrash([...(treeRoot ? [path.join(treeRoot, ".trash")] : []), trashDir(dataDir)], log),
      settings: {
        maxConcurrentBuilds: config.maxConcurrentBuilds,
        layerConcurrency: config.layerDownloadConcurrency,
        ext4Writer: config.ext4Writer,
        insecureRegistries: config.insecureRegistries,
        localImageDirs: config.localImageDirs,
        tiniPath: config.tiniPath,
        busyboxPath: config.busyboxPath,
      },
      metrics: createBuilderMetrics(metrics),
      log,
    });
    const interrupted = await manager.recover();
    if (interrupted > 0)
      log.warn({ builds: interrupted }, "failed builds left unfinished by the previous process");
    return {
      routes(router) {
        router.service(BuilderService, createBuilderService(manager));
      },
      async stop() {
        await manager.stop();
        if (treeRoot) await removeTreeRoot(treeRoot);
      },
    };
  },
});
