import type { Migrations } from "@kiln/kit";

// Samples themselves go through billaged's write-ahead log; the DB tracks each VM's session and
// the last sequence published, so restarts continue numbering and gaps can be detected.
export const migrations: Migrations = {
  "0001_vm_sessions": {
    async up(db) {
      await db.schema
        .createTable("vm_sessions")
        .addColumn("vm_id", "text", (c) => c.primaryKey())
        .addColumn("tenant_id", "text", (c) => c.notNull())
        .addColumn("started_at", "bigint", (c) => c.notNull())
        .addColumn("stopped_at", "bigint")
        .addColumn("last_sequence", "bigint", (c) => c.notNull().defaultTo(0))
        .addColumn("last_sample_at", "bigint")
        .addColumn("last_heartbeat_at", "bigint")
        .execute();
    },
  },
};
