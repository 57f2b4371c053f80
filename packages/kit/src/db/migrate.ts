import { type Kysely, type Migration, Migrator } from "kysely";

export type Migrations = Record<string, Migration>;

/**
 * Runs a service's migrations (named `0001_…`, applied in name order). Each service keeps its own
 * bookkeeping tables, so all services can share one PostgreSQL database.
 */
export async function migrate(
  db: Kysely<unknown>,
  service: string,
  migrations: Migrations,
): Promise<string[]> {
  const migrator = new Migrator({
    db,
    provider: { getMigrations: async () => migrations },
    migrationTableName: `kiln_${service}_migrations`,
    migrationLockTableName: `kiln_${service}_migrations_lock`,
  });
  const { error, results } = await migrator.migrateToLatest();
  if (error) {
    const failed = results?.find((r) => r.status === "Error")?.migrationName;
    throw new Error(`${service}: migration ${failed ?? "(unknown)"} failed: ${String(error)}`, {
      cause: error,
    });
  }
  return (results ?? []).filter((r) => r.status === "Success").map((r) => r.migrationName);
}
