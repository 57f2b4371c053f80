import path from "node:path";
import {
  createLogger,
  type Database,
  type LimitsResolver,
  migrate,
  openDatabase,
  type TenantContext,
  tierLimits,
} from "@kiln/kit";
import { createTestPostgres, tempDir } from "@kiln/kit/testing";
import type { Kysely } from "kysely";
import { createAssetRegistry, type RegistrySettings } from "../assets/registry.js";
import { type AssetDb, createAssetStore } from "../assets/store.js";
import { migrations } from "../migrations.js";
import type { BlobStore } from "../store/blob-store.js";
import { createLocalBlobStore } from "../store/local.js";

export type TestDialect = "sqlite" | "postgres";

/** A clock tests move by hand. */
export function manualClock(start = Date.UTC(2026, 0, 1)) {
  let now = start;
  return {
    now: () => now,
    advance(ms: number) {
      now += ms;
    },
  };
}

export const tenantA: TenantContext = { tenantId: "acme", tier: "pro" };
export const tenantB: TenantContext = { tenantId: "globex", tier: "pro" };

export interface RegistryFixture {
  registry: ReturnType<typeof createAssetRegistry>;
  store: ReturnType<typeof createAssetStore>;
  blobs: BlobStore;
  db: Database<unknown>;
  dataDir: string;
  settings: RegistrySettings;
  /** A registry on the same database and storage (a new store instance), as a restarted process would build it. */
  restart(opts?: { clock?: () => number }): ReturnType<typeof createAssetRegistry>;
  close(): Promise<void>;
}

/**
 * A registry on a fresh database (SQLite file or a throwaway PostgreSQL database) and a local
 * blob store in a temporary data dir. `close()` removes all of it.
 */
export async function openTestRegistry(
  dialect: TestDialect,
  opts: {
    clock?: () => number;
    limits?: LimitsResolver;
    settings?: Partial<RegistrySettings>;
    blobs?: (dataDir: string) => BlobStore;
  } = {},
): Promise<RegistryFixture> {
  const dir = tempDir("kiln-assets-");
  const pg = dialect === "postgres" ? await createTestPostgres() : undefined;
  const db = openDatabase<unknown>({
    url: pg?.url ?? "",
    defaultSqlitePath: path.join(dir.path, "db", "assetmanagerd.sqlite"),
  });
  try {
    await migrate(db.db, "assetmanagerd", migrations);
  } catch (err) {
    await db.close();
    await pg?.drop();
    dir.remove();
    throw err;
  }
  const store = createAssetStore(db.db as Kysely<AssetDb>, db.dialect);
  const openBlobs = () =>
    opts.blobs?.(dir.path) ?? createLocalBlobStore({ root: path.join(dir.path, "assets") });
  const blobs = openBlobs();
  const extraBlobs: BlobStore[] = [];
  const settings: RegistrySettings = {
    vmRoot: path.join(dir.path, "vms"),
    importDirs: [path.join(dir.path, "imports")],
    maxUploadSize: 64 * 1024 * 1024,
    leaseDefaultTtlMs: 0,
    gcRetentionMs: 7 * 24 * 3_600_000,
    ...opts.settings,
  };
  const log = createLogger({ service: "assetmanagerd", level: "silent" });
  const build = (clock?: () => number, b: BlobStore = blobs) =>
    createAssetRegistry({
      store,
      blobs: b,
      settings,
      limits: opts.limits ?? tierLimits(),
      log,
      clock: clock ?? opts.clock,
    });
  return {
    registry: build(),
    store,
    blobs,
    db,
    dataDir: dir.path,
    settings,
    restart(o) {
      const b = openBlobs();
      extraBlobs.push(b);
      return build(o?.clock, b);
    },
    async close() {
      for (const b of [blobs, ...extraBlobs]) await b.close();
      await db.close();
      await pg?.drop();
      dir.remove();
    },
  };
}

/** Chunks of `bytes` as an async iterable, like an upload stream. */
export async function* chunksOf(bytes: Uint8Array, size = 64 * 1024): AsyncGenerator<Uint8Array> {
  for (let o = 0; o < bytes.length; o += size) yield bytes.subarray(o, o + size);
}
