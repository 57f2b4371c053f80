import type { DialectName } from "@kiln/kit";
import { type ExpressionBuilder, type Kysely, sql, type Transaction } from "kysely";
import type { AssetStatus, AssetType, Labels } from "./model.js";

/** Row shapes of the tables in migrations.ts. Times are epoch milliseconds. */
export interface AssetDb {
  blobs: {
    digest: string;
    size_bytes: number;
    backend: string;
    location: string;
    created_at: number;
  };
  assets: {
    id: string;
    tenant_id: string;
    name: string;
    type: AssetType;
    status: AssetStatus;
    digest: string | null;
    size_bytes: number;
    created_by: string;
    build_id: string;
    source_image: string;
    image_config: string | null;
    created_at: number;
    last_accessed_at: number;
  };
  asset_labels: { asset_id: string; key: string; value: string };
  leases: {
    lease_id: string;
    asset_id: string;
    tenant_id: string;
    holder: string;
    acquired_at: number;
    expires_at: number | null;
  };
  placements: {
    id: string;
    tenant_id: string;
    asset_id: string;
    path: string;
    prepared_for: string;
    method: string;
    created_at: number;
  };
}

export type AssetRow = AssetDb["assets"];
export type BlobRow = AssetDb["blobs"];
export type LeaseRow = AssetDb["leases"];

export interface ListFilter {
  tenantId: string;
  status: AssetStatus;
  type?: AssetType;
  labels?: Labels;
}

/**
 * The registry's queries. Writes that must not race run inside `transaction`, where `lock*`
 * methods take row locks on PostgreSQL (SELECT … FOR UPDATE). SQLite needs none: Kysely runs
 * one SQLite connection and a transaction holds it until it ends, so transactions are serial.
 *
 * The blob row is the lock for its digest: whoever adds a reference (an asset pointing at it)
 * or deletes the blob takes it first, so a blob is deleted only while nothing references it.
 */
export interface AssetStore {
  readonly dialect: DialectName;
  transaction<T>(fn: (tx: AssetStore) => Promise<T>): Promise<T>;

  insertAsset(row: AssetRow, labels: Labels): Promise<void>;
  /** The tenant's asset (undefined for another tenant's), locked when in a transaction on PostgreSQL. */
  lockAsset(tenantId: string, id: string): Promise<AssetRow | undefined>;
  getAsset(tenantId: string, id: string): Promise<AssetRow | undefined>;
  assetIdTaken(id: string): Promise<boolean>;
  getAssets(tenantId: string, ids: readonly string[]): Promise<AssetRow[]>;
  updateAsset(id: string, patch: Partial<Omit<AssetRow, "id" | "tenant_id">>): Promise<number>;
  /** Marks an upload finished; 0 when the row is gone or no longer uploading. */
  finishUpload(id: string, status: AssetStatus): Promise<number>;
  touchAssets(ids: readonly string[], at: number): Promise<void>;
  deleteAsset(id: string): Promise<void>;
  labelsOf(ids: readonly string[]): Promise<Map<string, Labels>>;
  activeLeaseCounts(ids: readonly string[], now: number): Promise<Map<string, number>>;
  listAssets(
    filter: ListFilter,
    page: { limit: number; after?: { createdAt: number; id: string } },
  ): Promise<AssetRow[]>;
  countAssets(filter: ListFilter): Promise<number>;
  /** Bytes the tenant's assets take (logical: shared blobs count for each asset). */
  tenantUsage(tenantId: string): Promise<number>;
  /**
   * Assets of the tenant unused since `before`, oldest first: not accessed since, and no lease
   * that is active or ran out after it (an expired lease counts as use until its expiry).
   */
  unreferencedAssets(tenantId: string, before: number): Promise<AssetRow[]>;
  /** UPLOADING rows created before `before` (left by an earlier process). */
  staleUploads(before: number): Promise<AssetRow[]>;

  lockBlob(digest: string): Promise<BlobRow | undefined>;
  /** Inserts the blob row unless present; true when this call inserted it. */
  insertBlob(row: BlobRow): Promise<boolean>;
  deleteBlobRow(digest: string): Promise<void>;
  blobReferenced(digest: string): Promise<boolean>;
  /** Whether the tenant has an AVAILABLE asset on this content. */
  tenantHasDigest(tenantId: string, digest: string): Promise<boolean>;
  /** Blob rows no asset references. */
  unreferencedBlobs(): Promise<BlobRow[]>;
  blobsByDigest(digests: readonly string[]): Promise<BlobRow[]>;
  /** Digests referenced only by the given assets (what deleting all of them frees). */
  digestsOnlyReferencedBy(assetIds: readonly string[]): Promise<string[]>;

  insertLease(row: LeaseRow): Promise<void>;
  getLease(tenantId: string, leaseId: string): Promise<LeaseRow | undefined>;
  deleteLease(leaseId: string): Promise<number>;
  activeLeases(assetId: string, now: number): Promise<LeaseRow[]>;
  deleteLeasesOf(assetId: string): Promise<number>;
  /** Leases past expiry (of one tenant, or all when undefined). */
  expiredLeases(tenantId: string | undefined, now: number): Promise<LeaseRow[]>;

  insertPlacements(rows: readonly AssetDb["placements"][]): Promise<void>;

  /** Metrics: AVAILABLE assets per type, stored blob bytes, active leases. */
  assetCountsByType(): Promise<Array<{ type: string; count: number }>>;
  storedBytes(): Promise<number>;
  activeLeaseTotal(now: number): Promise<number>;
  /** An AVAILABLE rootfs of the tenant built from `image` (label docker_image or source_image). */
  hasRootfsFor(tenantId: string, image: string): Promise<boolean>;
}

export function createAssetStore(db: Kysely<AssetDb>, dialect: DialectName): AssetStore {
  return bind(db, db, dialect, false);
}

function bind(
  root: Kysely<AssetDb>,
  q: Kysely<AssetDb> | Transaction<AssetDb>,
  dialect: DialectName,
  inTx: boolean,
): AssetStore {
  const forUpdate = dialect === "postgres" && inTx;
  const active = (now: number) => (eb: ExpressionBuilder<AssetDb, "leases">) =>
    eb.or([eb("leases.expires_at", "is", null), eb("leases.expires_at", ">", now)]);

  const filtered = (f: ListFilter) => {
    let qb = q
      .selectFrom("assets")
      .where("assets.tenant_id", "=", f.tenantId)
      .where("assets.status", "=", f.status);
    if (f.type) qb = qb.where("assets.type", "=", f.type);
    for (const [key, value] of Object.entries(f.labels ?? {})) {
      qb = qb.where(({ exists, selectFrom }) =>
        exists(
          selectFrom("asset_labels")
            .select("asset_labels.asset_id")
            .whereRef("asset_labels.asset_id", "=", "assets.id")
            .where("asset_labels.key", "=", key)
            .where("asset_labels.value", "=", value),
        ),
      );
    }
    return qb;
  };

  const store: AssetStore = {
    dialect,
    transaction(fn) {
      if (inTx) return fn(store);
      return root.transaction().execute((trx) => fn(bind(root, trx, dialect, true)));
    },

    async insertAsset(row, labels) {
      await q.insertInto("assets").values(row).execute();
      const entries = Object.entries(labels);
      if (entries.length > 0) {
        await q
          .insertInto("asset_labels")
          .values(entries.map(([key, value]) => ({ asset_id: row.id, key, value })))
          .execute();
      }
    },
    async lockAsset(tenantId, id) {
      let qb = q.selectFrom("assets").selectAll().where("id", "=", id).where("tenant_id", "=", tenantId);
      if (forUpdate) qb = qb.forUpdate();
      return qb.executeTakeFirst();
    },
    getAsset(tenantId, id) {
      return q
        .selectFrom("assets")
        .selectAll()
        .where("id", "=", id)
        .where("tenant_id", "=", tenantId)
        .executeTakeFirst();
    },
    async assetIdTaken(id) {
      return (
        (await q.selectFrom("assets").select("id").where("id", "=", id).executeTakeFirst()) !== undefined
      );
    },
    async getAssets(tenantId, ids) {
      if (ids.length === 0) return [];
      return q
        .selectFrom("assets")
        .selectAll()
        .where("tenant_id", "=", tenantId)
        .where("id", "in", [...ids])
        .execute();
    },
    async updateAsset(id, patch) {
      const res = await q.updateTable("assets").set(patch).where("id", "=", id).executeTakeFirst();
      return Number(res.numUpdatedRows);
    },
    async finishUpload(id, status) {
      const res = await q
        .updateTable("assets")
        .set({ status })
        .where("id", "=", id)
        .where("status", "=", "UPLOADING")
        .executeTakeFirst();
      return Number(res.numUpdatedRows);
    },
    async touchAssets(ids, at) {
      if (ids.length === 0) return;
      await q
        .updateTable("assets")
        .set({ last_accessed_at: at })
        .where("id", "in", [...ids])
        .where("last_accessed_at", "<", at)
        .execute();
    },
    async deleteAsset(id) {
      // Labels and leases go with it (ON DELETE CASCADE); deleted explicitly too, so the
      // behaviour does not depend on SQLite's foreign_keys pragma.
      await q.deleteFrom("asset_labels").where("asset_id", "=", id).execute();
      await q.deleteFrom("leases").where("asset_id", "=", id).execute();
      await q.deleteFrom("assets").where("id", "=", id).execute();
    },
    async labelsOf(ids) {
      const out = new Map<string, Labels>();
      if (ids.length === 0) return out;
      const rows = await q
        .selectFrom("asset_labels")
        .select(["asset_id", "key", "value"])
        .where("asset_id", "in", [...ids])
        .execute();
      for (const r of rows) {
        const labels = out.get(r.asset_id) ?? {};
        labels[r.key] = r.value;
        out.set(r.asset_id, labels);
      }
      return out;
    },
    async activeLeaseCounts(ids, now) {
      const out = new Map<string, number>();
      if (ids.length === 0) return out;
      const rows = await q
        .selectFrom("leases")
        .select(["asset_id", (eb) => eb.fn.countAll<number>().as("n")])
        .where("asset_id", "in", [...ids])
        .where(active(now))
        .groupBy("asset_id")
        .execute();
      for (const r of rows) out.set(r.asset_id, Number(r.n));
      return out;
    },
    listAssets(f, page) {
      let qb = filtered(f).selectAll("assets");
      const after = page.after;
      if (after) {
        qb = qb.where((eb) =>
          eb.or([
            eb("assets.created_at", "<", after.createdAt),
            eb.and([eb("assets.created_at", "=", after.createdAt), eb("assets.id", "<", after.id)]),
          ]),
        );
      }
      return qb.orderBy("assets.created_at", "desc").orderBy("assets.id", "desc").limit(page.limit).execute();
    },
    async countAssets(f) {
      const row = await filtered(f)
        .select((eb) => eb.fn.countAll<number>().as("n"))
        .executeTakeFirstOrThrow();
      return Number(row.n);
    },
    async tenantUsage(tenantId) {
      const row = await q
        .selectFrom("assets")
        .select((eb) => eb.fn.coalesce(eb.fn.sum<number>("size_bytes"), sql<number>`0`).as("n"))
        .where("tenant_id", "=", tenantId)
        .executeTakeFirstOrThrow();
      return Number(row.n);
    },
    unreferencedAssets(tenantId, before) {
      return q
        .selectFrom("assets")
        .selectAll()
        .where("tenant_id", "=", tenantId)
        .where("status", "in", ["AVAILABLE", "ERROR"])
        .where("last_accessed_at", "<", before)
        .where(({ not, exists, selectFrom }) =>
          not(
            exists(
              selectFrom("leases")
                .select("leases.lease_id")
                .whereRef("leases.asset_id", "=", "assets.id")
                .where(active(before)),
            ),
          ),
        )
        .orderBy("last_accessed_at", "asc")
        .execute();
    },
    staleUploads(before) {
      return q
        .selectFrom("assets")
        .selectAll()
        .where("status", "=", "UPLOADING")
        .where("created_at", "<", before)
        .execute();
    },

    async lockBlob(digest) {
      let qb = q.selectFrom("blobs").selectAll().where("digest", "=", digest);
      if (forUpdate) qb = qb.forUpdate();
      return qb.executeTakeFirst();
    },
    async insertBlob(row) {
      const res = await q
        .insertInto("blobs")
        .values(row)
        .onConflict((oc) => oc.column("digest").doNothing())
        .returning("digest")
        .executeTakeFirst();
      return res !== undefined;
    },
    async deleteBlobRow(digest) {
      await q.deleteFrom("blobs").where("digest", "=", digest).execute();
    },
    async blobReferenced(digest) {
      const row = await q
        .selectFrom("assets")
        .select("id")
        .where("digest", "=", digest)
        .limit(1)
        .executeTakeFirst();
      return row !== undefined;
    },
    async tenantHasDigest(tenantId, digest) {
      const row = await q
        .selectFrom("assets")
        .select("id")
        .where("tenant_id", "=", tenantId)
        .where("digest", "=", digest)
        .where("status", "=", "AVAILABLE")
        .limit(1)
        .executeTakeFirst();
      return row !== undefined;
    },
    unreferencedBlobs() {
      return q
        .selectFrom("blobs")
        .selectAll()
        .where(({ not, exists, selectFrom }) =>
          not(
            exists(selectFrom("assets").select("assets.id").whereRef("assets.digest", "=", "blobs.digest")),
          ),
        )
        .execute();
    },
    async blobsByDigest(digests) {
      if (digests.length === 0) return [];
      return q
        .selectFrom("blobs")
        .selectAll()
        .where("digest", "in", [...digests])
        .execute();
    },
    async digestsOnlyReferencedBy(assetIds) {
      if (assetIds.length === 0) return [];
      const ids = [...assetIds];
      const rows = await q
        .selectFrom("assets")
        .select("digest")
        .distinct()
        .where("id", "in", ids)
        .where("digest", "is not", null)
        .where(({ not, exists, selectFrom }) =>
          not(
            exists(
              selectFrom("assets as other")
                .select("other.id")
                .whereRef("other.digest", "=", "assets.digest")
                .where("other.id", "not in", ids),
            ),
          ),
        )
        .execute();
      return rows.map((r) => r.digest!);
    },

    async insertLease(row) {
      await q.insertInto("leases").values(row).execute();
    },
    getLease(tenantId, leaseId) {
      return q
        .selectFrom("leases")
        .selectAll()
        .where("lease_id", "=", leaseId)
        .where("tenant_id", "=", tenantId)
        .executeTakeFirst();
    },
    async deleteLease(leaseId) {
      const res = await q.deleteFrom("leases").where("lease_id", "=", leaseId).executeTakeFirst();
      return Number(res.numDeletedRows);
    },
    activeLeases(assetId, now) {
      return q.selectFrom("leases").selectAll().where("asset_id", "=", assetId).where(active(now)).execute();
    },
    async deleteLeasesOf(assetId) {
      const res = await q.deleteFrom("leases").where("asset_id", "=", assetId).executeTakeFirst();
      return Number(res.numDeletedRows);
    },
    expiredLeases(tenantId, now) {
      let qb = q
        .selectFrom("leases")
        .selectAll()
        .where("expires_at", "is not", null)
        .where("expires_at", "<=", now);
      if (tenantId !== undefined) qb = qb.where("tenant_id", "=", tenantId);
      return qb.execute();
    },

    async insertPlacements(rows) {
      if (rows.length === 0) return;
      await q
        .insertInto("placements")
        .values([...rows])
        .execute();
    },

    async assetCountsByType() {
      const rows = await q
        .selectFrom("assets")
        .select(["type", (eb) => eb.fn.countAll<number>().as("n")])
        .where("status", "=", "AVAILABLE")
        .groupBy("type")
        .execute();
      return rows.map((r) => ({ type: r.type, count: Number(r.n) }));
    },
    async storedBytes() {
      const row = await q
        .selectFrom("blobs")
        .select((eb) => eb.fn.coalesce(eb.fn.sum<number>("size_bytes"), sql<number>`0`).as("n"))
        .executeTakeFirstOrThrow();
      return Number(row.n);
    },
    async activeLeaseTotal(now) {
      const row = await q
        .selectFrom("leases")
        .select((eb) => eb.fn.countAll<number>().as("n"))
        .where(active(now))
        .executeTakeFirstOrThrow();
      return Number(row.n);
    },
    async hasRootfsFor(tenantId, image) {
      const row = await q
        .selectFrom("assets")
        .select("assets.id")
        .where("tenant_id", "=", tenantId)
        .where("type", "=", "ROOTFS")
        .where("status", "=", "AVAILABLE")
        .where((eb) =>
          eb.or([
            eb.exists(
              eb
                .selectFrom("asset_labels")
                .select("asset_labels.asset_id")
                .whereRef("asset_labels.asset_id", "=", "assets.id")
                .where("asset_labels.key", "=", "docker_image")
                .where("asset_labels.value", "=", image),
            ),
            eb("assets.source_image", "=", image),
          ]),
        )
        .limit(1)
        .executeTakeFirst();
      return row !== undefined;
    },
  };
  return store;
}
