import type { Migrations } from "@kiln/kit";

// Usage rows live in the usage store (ClickHouse SQL); the state DB keeps what makes processing
// exactly-once (batches seen, each VM's last cumulative counters) and the invoices.
export const migrations: Migrations = {
  "0001_billing": {
    async up(db) {
      await db.schema
        .createTable("processed_batches")
        .addColumn("batch_id", "text", (c) => c.primaryKey())
        .addColumn("vm_id", "text", (c) => c.notNull())
        .addColumn("sequence", "bigint", (c) => c.notNull())
        .addColumn("processed_at", "bigint", (c) => c.notNull())
        .execute();
      await db.schema
        .createTable("vm_counters")
        .addColumn("vm_id", "text", (c) => c.primaryKey())
        .addColumn("tenant_id", "text", (c) => c.notNull())
        .addColumn("last_sample_at", "bigint", (c) => c.notNull())
        .addColumn("counters_json", "text", (c) => c.notNull())
        .execute();
      await db.schema
        .createTable("invoices")
        .addColumn("invoice_id", "text", (c) => c.primaryKey())
        .addColumn("tenant_id", "text", (c) => c.notNull())
        .addColumn("period_start", "bigint", (c) => c.notNull())
        .addColumn("period_end", "bigint", (c) => c.notNull())
        .addColumn("status", "text", (c) => c.notNull())
        .addColumn("currency", "text", (c) => c.notNull())
        .addColumn("total_micros", "bigint", (c) => c.notNull())
        .addColumn("lines_json", "text", (c) => c.notNull())
        .addColumn("created_at", "bigint", (c) => c.notNull())
        .addUniqueConstraint("invoices_tenant_period", ["tenant_id", "period_start", "period_end"])
        .execute();
    },
  },
};
