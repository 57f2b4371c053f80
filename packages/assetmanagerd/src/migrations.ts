import type { Migrations } from "@kiln/kit";

// Times are epoch milliseconds (bigint). A blob is stored once per digest; assets are
// per-tenant records that point at blobs.
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
        .addColumn("digest", "text", (c) => c.references("blobs.digest"))
        .addColumn("size_bytes", "bigint", (c) => c.notNull().defaultTo(0))
        .addColumn("created_by", "text", (c) => c.notNull().defaultTo(""))
        .addColumn("build_id", "text")
        .addColumn("source_image", "text")
        .addColumn("created_at", "bigint", (c) => c.notNull())
        .addColumn("last_accessed_at", "bigint", (c) => c.notNull())
        .execute();
      await db.schema.createIndex("assets_tenant_type").on("assets").columns(["tenant_id", "type"]).execute();
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
        .addColumn("expires_at", "bigint")
        .execute();
      await db.schema.createIndex("leases_asset").on("leases").column("asset_id").execute();
    },
  },
};
