import type { Migrations } from "@kiln/kit";

// Times are epoch milliseconds (bigint); JSON columns hold proto JSON as text.
export const migrations: Migrations = {
  "0001_tenants_keys_apps": {
    async up(db) {
      await db.schema
        .createTable("tenants")
        .addColumn("tenant_id", "text", (c) => c.primaryKey())
        .addColumn("name", "text", (c) => c.notNull())
        .addColumn("tier", "text", (c) => c.notNull())
        .addColumn("limits_json", "text", (c) => c.notNull().defaultTo("{}"))
        .addColumn("disabled", "integer", (c) => c.notNull().defaultTo(0))
        .addColumn("created_at", "bigint", (c) => c.notNull())
        .addColumn("updated_at", "bigint", (c) => c.notNull())
        .execute();
      await db.schema
        .createTable("api_keys")
        .addColumn("key_id", "text", (c) => c.primaryKey())
        .addColumn("tenant_id", "text", (c) =>
          c.notNull().references("tenants.tenant_id").onDelete("cascade"),
        )
        .addColumn("name", "text", (c) => c.notNull())
        .addColumn("prefix", "text", (c) => c.notNull())
        .addColumn("secret_hash", "text", (c) => c.notNull().unique())
        .addColumn("scopes_json", "text", (c) => c.notNull().defaultTo("[]"))
        .addColumn("created_at", "bigint", (c) => c.notNull())
        .addColumn("last_used_at", "bigint")
        .addColumn("expires_at", "bigint")
        .addColumn("revoked_at", "bigint")
        .execute();
      await db.schema.createIndex("api_keys_tenant").on("api_keys").column("tenant_id").execute();
      await db.schema
        .createTable("apps")
        .addColumn("app_id", "text", (c) => c.primaryKey())
        .addColumn("tenant_id", "text", (c) =>
          c.notNull().references("tenants.tenant_id").onDelete("cascade"),
        )
        .addColumn("name", "text", (c) => c.notNull())
        .addColumn("default_port", "integer", (c) => c.notNull().defaultTo(0))
        .addColumn("current_deployment_id", "text")
        .addColumn("created_at", "bigint", (c) => c.notNull())
        .addUniqueConstraint("apps_tenant_name", ["tenant_id", "name"])
        .execute();
      await db.schema
        .createTable("app_deployments")
        .addColumn("deployment_id", "text", (c) => c.primaryKey())
        .addColumn("app_id", "text", (c) => c.notNull().references("apps.app_id").onDelete("cascade"))
        .addColumn("tenant_id", "text", (c) => c.notNull())
        .addColumn("image", "text", (c) => c.notNull())
        .addColumn("spec_json", "text", (c) => c.notNull())
        .addColumn("state", "text", (c) => c.notNull())
        .addColumn("step", "text", (c) => c.notNull().defaultTo(""))
        .addColumn("build_id", "text")
        .addColumn("asset_id", "text")
        .addColumn("vm_ids_json", "text", (c) => c.notNull().defaultTo("[]"))
        .addColumn("url", "text", (c) => c.notNull().defaultTo(""))
        .addColumn("error_message", "text", (c) => c.notNull().defaultTo(""))
        .addColumn("idempotency_key", "text")
        .addColumn("created_at", "bigint", (c) => c.notNull())
        .addColumn("updated_at", "bigint", (c) => c.notNull())
        .addUniqueConstraint("app_deployments_idempotency", ["tenant_id", "idempotency_key"])
        .execute();
      await db.schema
        .createIndex("app_deployments_app")
        .on("app_deployments")
        .columns(["app_id", "created_at"])
        .execute();
    },
  },
};
