import type { Migrations } from "@kiln/kit";

// Times are epoch milliseconds (bigint); JSON columns hold proto JSON as text. Allocations are
// rows with unique keys, so an address or host port can never be handed to two VMs at once.
export const migrations: Migrations = {
  "0001_vms": {
    async up(db) {
      await db.schema
        .createTable("deployments")
        .addColumn("deployment_id", "text", (c) => c.primaryKey())
        .addColumn("tenant_id", "text", (c) => c.notNull())
        .addColumn("name", "text", (c) => c.notNull())
        .addColumn("template_json", "text", (c) => c.notNull())
        .addColumn("replicas", "integer", (c) => c.notNull())
        .addColumn("state", "text", (c) => c.notNull())
        .addColumn("created_at", "bigint", (c) => c.notNull())
        .addColumn("updated_at", "bigint", (c) => c.notNull())
        .execute();
      await db.schema
        .createTable("vms")
        .addColumn("vm_id", "text", (c) => c.primaryKey())
        .addColumn("tenant_id", "text", (c) => c.notNull())
        .addColumn("state", "text", (c) => c.notNull())
        .addColumn("backend", "text", (c) => c.notNull())
        .addColumn("config_json", "text", (c) => c.notNull())
        .addColumn("deployment_id", "text", (c) => c.references("deployments.deployment_id"))
        .addColumn("failure_reason", "text", (c) => c.notNull().defaultTo(""))
        .addColumn("pid", "integer")
        .addColumn("pid_start_time", "bigint")
        .addColumn("runtime_json", "text", (c) => c.notNull().defaultTo("{}"))
        .addColumn("created_at", "bigint", (c) => c.notNull())
        .addColumn("updated_at", "bigint", (c) => c.notNull())
        .addColumn("booted_at", "bigint")
        .execute();
      await db.schema.createIndex("vms_tenant_state").on("vms").columns(["tenant_id", "state"]).execute();
      await db.schema
        .createTable("ip_allocations")
        .addColumn("ip_address", "text", (c) => c.primaryKey())
        .addColumn("vm_id", "text", (c) => c.notNull().unique().references("vms.vm_id"))
        .addColumn("allocated_at", "bigint", (c) => c.notNull())
        .execute();
      await db.schema
        .createTable("port_allocations")
        .addColumn("host_port", "integer", (c) => c.primaryKey())
        .addColumn("vm_id", "text", (c) => c.notNull().references("vms.vm_id"))
        .addColumn("container_port", "integer", (c) => c.notNull())
        .addColumn("protocol", "text", (c) => c.notNull())
        .addColumn("allocated_at", "bigint", (c) => c.notNull())
        .execute();
    },
  },
  // VM network namespaces made ahead of time (network/netns-pool.ts): a row exists before its
  // namespace does, so start-up finds what a crash left unused.
  "0002_netns_pool": {
    async up(db) {
      await db.schema
        .createTable("netns_pool")
        .addColumn("short_id", "text", (c) => c.primaryKey())
        .addColumn("created_at", "bigint", (c) => c.notNull())
        .execute();
    },
  },
};
