import path from "node:path";
import { AssetManagerService } from "@kiln/api";
import { ConfigError, defineService, type ReadinessCheck, tierLimits } from "@kiln/kit";
import type { Kysely } from "kysely";
import { createAssetRegistry } from "./assets/registry.js";
import { type AssetDb, createAssetStore } from "./assets/store.js";
import { settings } from "./config.js";
import { createAssetMetrics } from "./metrics.js";
import { migrations } from "./migrations.js";
import { createAssetService } from "./service.js";
import type { BlobStore } from "./store/blob-store.js";
import { createLocalBlobStore } from "./store/local.js";
import { createS3BlobStore, type S3BlobStore } from "./store/s3.js";

/** assetmanagerd: assets: content-addressed blobs, leases, GC, prepare-into-VM. */
export const assetmanagerd = defineService({
  name: "assetmanagerd",
  summary: "assets: content-addressed blobs, leases, GC, prepare-into-VM",
  settings,
  peers: ["builderd"],
  migrations,
  async create({ config, db, dataDir, log, metrics, peers }) {
    const problems: string[] = [];
    if (config.storageBackend === "s3" && config.s3Bucket === "") {
      problems.push("UNKEY_ASSETMANAGERD_S3_BUCKET: required when UNKEY_ASSETMANAGERD_STORAGE_BACKEND=s3");
    }
    if ((config.s3AccessKeyId === "") !== (config.s3SecretAccessKey === "")) {
      problems.push(
        "UNKEY_ASSETMANAGERD_S3_ACCESS_KEY_ID and UNKEY_ASSETMANAGERD_S3_SECRET_ACCESS_KEY: set both or neither",
      );
    }
    if (problems.length > 0) throw new ConfigError(problems);

    let s3: S3BlobStore | undefined;
    let blobs: BlobStore;
    if (config.storageBackend === "s3") {
      s3 = createS3BlobStore({
        endpoint: config.s3Endpoint || undefined,
        region: config.s3Region,
        bucket: config.s3Bucket,
        prefix: config.s3Prefix,
        credentials: config.s3AccessKeyId
          ? { accessKeyId: config.s3AccessKeyId, secretAccessKey: config.s3SecretAccessKey }
          : undefined,
        partSize: config.s3PartSize,
        log,
      });
      blobs = s3;
    } else {
      blobs = createLocalBlobStore({ root: path.join(dataDir, "assets"), log });
    }

    const store = createAssetStore(db.db as Kysely<AssetDb>, db.dialect);
    const { gcCounters } = createAssetMetrics(metrics, store);
    const registry = createAssetRegistry({
      store,
      blobs,
      settings: {
        vmRoot: config.vmRoot || path.join(dataDir, "vms"),
        importDirs: config.importDirs.length > 0 ? config.importDirs : [path.join(dataDir, "tenants")],
        maxUploadSize: config.maxUploadSize,
        leaseDefaultTtlMs: config.leaseDefaultTtl,
        gcRetentionMs: config.gcRetention,
      },
      limits: tierLimits(),
      log,
      openExternal: s3 ? (url) => s3.openObject(url) : undefined,
      gcCounters,
    });
    // Before serving: a crashed process's uploads must not be visible to the first call.
    await registry.recover();

    const readiness: ReadinessCheck[] = s3 ? [{ name: "storage", check: () => s3.ping() }] : [];
    let timer: NodeJS.Timeout | undefined;
    let sweeping: Promise<unknown> = Promise.resolve();
    const sweep = () => {
      sweeping = registry
        .sweep()
        .then((r) => log.debug({ ...r }, "gc sweep done"))
        .catch((err: unknown) => log.error({ err }, "gc sweep failed"));
      return sweeping;
    };

    return {
      routes(router) {
        router.service(AssetManagerService, createAssetService({ registry, builderd: peers.builderd }));
      },
      readiness,
      async start() {
        // In the background: listing a large bucket takes a while, and nothing waits on it
        // (interrupted uploads were already removed above).
        void sweep();
        if (config.gcInterval > 0) {
          timer = setInterval(() => void sweep(), config.gcInterval);
          timer.unref();
        }
      },
      async stop() {
        clearInterval(timer);
        await sweeping;
        await blobs.close();
      },
    };
  },
});
