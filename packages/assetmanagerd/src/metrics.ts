import type { ServiceMetrics } from "@kiln/kit";
import { Counter, Gauge } from "prom-client";
import type { GcCounters } from "./assets/gc.js";
import { ASSET_TYPES } from "./assets/model.js";
import type { AssetStore } from "./assets/store.js";

/**
 * assetmanagerd's metrics. The gauges are read from the database when scraped, so they are
 * right after a restart and across every path that changes assets, leases or blobs.
 */
export function createAssetMetrics(
  metrics: ServiceMetrics,
  store: AssetStore,
  clock: () => number = Date.now,
) {
  const registers = [metrics.registry];
  new Gauge({
    name: "assetmanagerd_assets",
    help: "AVAILABLE assets, all tenants, by type.",
    labelNames: ["type"] as const,
    registers,
    async collect() {
      const counts = new Map((await store.assetCountsByType()).map((r) => [r.type, r.count]));
      for (const type of ASSET_TYPES) this.set({ type: type.toLowerCase() }, counts.get(type) ?? 0);
    },
  });
  new Gauge({
    name: "assetmanagerd_storage_bytes",
    help: "Bytes of stored blobs (each distinct content counted once).",
    registers,
    async collect() {
      this.set(await store.storedBytes());
    },
  });
  new Gauge({
    name: "assetmanagerd_leases_active",
    help: "Leases not released and not expired, all tenants.",
    registers,
    async collect() {
      this.set(await store.activeLeaseTotal(clock()));
    },
  });
  const gcDeleted = new Counter({
    name: "assetmanagerd_gc_deleted_total",
    help: "Objects garbage-collected, by kind: lease (expired), asset (unreferenced past retention), blob (no asset references it).",
    labelNames: ["kind"] as const,
    registers,
  });
  const counters: GcCounters = { deleted: (kind, n) => gcDeleted.inc({ kind }, n) };
  return { gcCounters: counters };
}
