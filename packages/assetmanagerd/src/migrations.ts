import type { Migrations } from "@kiln/kit";

// Times are epoch milliseconds (bigint). A blob is stored once per digest, across tenants; assets
// are per-tenant records that point at blobs. A blob row is the lock every writer and deleter of
// that digest takes (see assets/store.ts), and assets.digest references it, so a blob still
// referenced by an asset can never be deleted.
export const migrations: Migrations = {
  "0001_assets": {
    async up(db) {
      await db.schema
        .createTable("blobs")
        .addColumn("digest", "text", (c) => c.primaryKey())
        .addColumn("size_bytes", "bigint", (c) => c.notNull())
        .addColumn("backend", "text", (c) => c.notNull())
        .addColumn("location", "text", (c) => c.notNull())
        .addColumn("created_at", "bigint", (c) => c.notNull())
        .execute();
      await db.schema
        .createTable("assets")
        .addColumn("id", "text", (c) => c.primaryKey())
        .addColumn("tenant_id", "text", (c) => c.notNull())
        .addColumn("name", "text", (c) => c.notNull())
        .addColumn("type", "text", (c) => c.notNull())
        .addColumn("status", "text", (c) => c.notNull())
        // NULL while UPLOADING: the digest is known only once the last byte arrived.
        .addColumn("digest", "text", (c) => c.references("blobs.digest"))
        .addColumn("size_bytes", "bigint", (c) => c.notNull().defaultTo(0))
        .addColumn("created_by", "text", (c) => c.notNull().defaultTo(""))
        .addColumn("build_id", "text", (c) => c.notNull().defaultTo(""))
        .addColumn("source_image", "text", (c) => c.notNull().defaultTo(""))
        // kiln.common.v1.ImageConfig as proto JSON; NULL when none.
        .addColumn("image_config", "text")
        .addColumn("created_at", "bigint", (c) => c.notNull())
        .addColumn("last_accessed_at", "bigint", (c) => c.notNull())
        .execute();
      await db.schema
        .createIndex("assets_tenant_status_created")
        .on("assets")
        .columns(["tenant_id", "status", "created_at", "id"])
        .execute();
      await db.schema.createIndex("assets_digest").on("assets").column("digest").execute();
      await db.schema
        .createTable("asset_labels")
        .addColumn("asset_id", "text", (c) => c.notNull().references("assets.id").onDelete("cascade"))
        .addColumn("key", "text", (c) => c.notNull())
        .addColumn("value", "text", (c) => c.notNull())
        .addPrimaryKeyConstraint("asset_labels_pk", ["asset_id", "key"])
        .execute();
      await db.schema
        .createIndex("asset_labels_key_value")
        .on("asset_labels")
        .columns(["key", "value"])
        .execute();
      await db.schema
        .createTable("leases")
        .addColumn("lease_id", "text", (c) => c.primaryKey())
        .addColumn("asset_id", "text", (c) => c.notNull().references("assets.id").onDelete("cascade"))
        .addColumn("tenant_id", "text", (c) => c.notNull())
        .addColumn("holder", "text", (c) => c.notNull())
        .addColumn("acquired_at", "bigint", (c) => c.notNull())
        // NULL: no expiry.
        .addColumn("expires_at", "bigint")
        .execute();
      await db.schema.createIndex("leases_asset").on("leases").column("asset_id").execute();
      await db.schema.createIndex("leases_expires").on("leases").column("expires_at").execute();
      // Where PrepareAssets placed what, for whom: an audit trail (files outlive asset rows).
      await db.schema
        .createTable("placements")
        .addColumn("id", "text", (c) => c.primaryKey())
        .addColumn("tenant_id", "text", (c) => c.notNull())
        .addColumn("asset_id", "text", (c) => c.notNull())
        .addColumn("path", "text", (c) => c.notNull())
        .addColumn("prepared_for", "text", (c) => c.notNull())
        .addColumn("method", "text", (c) => c.notNull())
        .addColumn("created_at", "bigint", (c) => c.notNull())
        .execute();
      await db.schema
        .createIndex("placements_tenant_asset")
        .on("placements")
        .columns(["tenant_id", "asset_id"])
        .execute();
    },
  },
};
