import type { Migrations } from "@kiln/kit";

// Times are epoch milliseconds (bigint); JSON columns hold proto JSON as text.
export const migrations: Migrations = {
  "0001_builds": {
    async up(db) {
      await db.schema
        .createTable("builds")
        .addColumn("build_id", "text", (c) => c.primaryKey())
        .addColumn("tenant_id", "text", (c) => c.notNull())
        .addColumn("state", "text", (c) => c.notNull())
        .addColumn("config_json", "text", (c) => c.notNull())
        .addColumn("source_ref", "text", (c) => c.notNull())
        .addColumn("idempotency_key", "text")
        // Same tenant + image manifest + target settings = same rootfs: built once.
        .addColumn("dedupe_key", "text")
        .addColumn("image_digest", "text")
        .addColumn("progress_percent", "integer", (c) => c.notNull().defaultTo(0))
        .addColumn("current_step", "text", (c) => c.notNull().defaultTo(""))
        .addColumn("progress_json", "text", (c) => c.notNull().defaultTo("{}"))
        .addColumn("rootfs_path", "text")
        .addColumn("rootfs_size_bytes", "bigint")
        .addColumn("rootfs_checksum", "text")
        .addColumn("asset_id", "text")
        .addColumn("image_metadata_json", "text")
        .addColumn("metrics_json", "text")
        .addColumn("error_message", "text", (c) => c.notNull().defaultTo(""))
        .addColumn("created_at", "bigint", (c) => c.notNull())
        .addColumn("started_at", "bigint")
        .addColumn("completed_at", "bigint")
        .addColumn("updated_at", "bigint", (c) => c.notNull())
        .execute();
      await db.schema
        .createIndex("builds_tenant_created")
        .on("builds")
        .columns(["tenant_id", "created_at"])
        .execute();
      await db.schema
        .createIndex("builds_tenant_state")
        .on("builds")
        .columns(["tenant_id", "state"])
        .execute();
      await db.schema
        .createIndex("builds_tenant_digest")
        .on("builds")
        .columns(["tenant_id", "image_digest"])
        .execute();
      await db.schema
        .createTable("build_logs")
        .addColumn("build_id", "text", (c) => c.notNull().references("builds.build_id").onDelete("cascade"))
        .addColumn("seq", "integer", (c) => c.notNull())
        .addColumn("ts", "bigint", (c) => c.notNull())
        .addColumn("level", "text", (c) => c.notNull())
        .addColumn("component", "text", (c) => c.notNull())
        .addColumn("message", "text", (c) => c.notNull())
        .addColumn("metadata_json", "text", (c) => c.notNull().defaultTo("{}"))
        .addPrimaryKeyConstraint("build_logs_pk", ["build_id", "seq"])
        .execute();
    },
  },
};
