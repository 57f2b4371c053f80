import type { Kysely, Selectable } from "kysely";
import type { BuildState } from "./states.js";

/** The builds table (times are epoch ms; *_json columns hold JSON text). */
export interface BuildsTable {
  build_id: string;
  tenant_id: string;
  state: BuildState;
  config_json: string;
  source_ref: string;
  idempotency_key: string | null;
  dedupe_key: string | null;
  image_digest: string | null;
  progress_percent: number;
  current_step: string;
  progress_json: string;
  rootfs_path: string | null;
  rootfs_size_bytes: number | null;
  rootfs_checksum: string | null;
  asset_id: string | null;
  image_metadata_json: string | null;
  metrics_json: string | null;
  error_message: string;
  created_at: number;
  started_at: number | null;
  completed_at: number | null;
  updated_at: number;
}

export interface BuildLogsTable {
  build_id: string;
  seq: number;
  ts: number;
  level: string;
  component: string;
  message: string;
  metadata_json: string;
}

export interface BuilderDb {
  builds: BuildsTable;
  build_logs: BuildLogsTable;
}

export type BuildRow = Selectable<BuildsTable>;
export type BuildPatch = Partial<Omit<BuildsTable, "build_id" | "tenant_id" | "created_at">>;
export type LogRow = Selectable<BuildLogsTable>;

/** builderd's queries. Every read of a build is scoped by tenant. */
export function createBuildStore(db: Kysely<BuilderDb>) {
  return {
    async insert(row: BuildsTable): Promise<void> {
      await db.insertInto("builds").values(row).execute();
    },

    async get(tenantId: string, buildId: string): Promise<BuildRow | undefined> {
      return db
        .selectFrom("builds")
        .selectAll()
        .where("tenant_id", "=", tenantId)
        .where("build_id", "=", buildId)
        .executeTakeFirst();
    },

    async byIdempotencyKey(tenantId: string, key: string): Promise<BuildRow | undefined> {
      return db
        .selectFrom("builds")
        .selectAll()
        .where("tenant_id", "=", tenantId)
        .where("idempotency_key", "=", key)
        .executeTakeFirst();
    },

    /** The newest completed build with this dedupe key (same image and target settings). */
    async completedByDedupeKey(
      tenantId: string,
      dedupeKey: string,
      exceptBuildId?: string,
    ): Promise<BuildRow | undefined> {
      let q = db
        .selectFrom("builds")
        .selectAll()
        .where("tenant_id", "=", tenantId)
        .where("dedupe_key", "=", dedupeKey)
        .where("state", "=", "completed")
        .where("rootfs_path", "is not", null);
      if (exceptBuildId) q = q.where("build_id", "!=", exceptBuildId);
      return q.orderBy("created_at", "desc").limit(1).executeTakeFirst();
    },

    /** Applies a patch; with `from`, only while the build is still in one of those states. */
    async update(buildId: string, patch: BuildPatch, from?: readonly BuildState[]): Promise<boolean> {
      let q = db
        .updateTable("builds")
        .set({ ...patch, updated_at: Date.now() })
        .where("build_id", "=", buildId);
      if (from) q = q.where("state", "in", [...from]);
      const res = await q.executeTakeFirst();
      return Number(res.numUpdatedRows) > 0;
    },

    async list(
      tenantId: string,
      opts: { states: BuildState[]; limit: number; before?: { createdAt: number; buildId: string } },
    ): Promise<{ rows: BuildRow[]; total: number }> {
      let base = db.selectFrom("builds").where("tenant_id", "=", tenantId);
      if (opts.states.length > 0) base = base.where("state", "in", opts.states);
      const total = await base.select((eb) => eb.fn.countAll<number>().as("n")).executeTakeFirstOrThrow();
      let page = base.selectAll();
      if (opts.before) {
        const { createdAt, buildId } = opts.before;
        page = page.where((eb) =>
          eb.or([
            eb("created_at", "<", createdAt),
            eb.and([eb("created_at", "=", createdAt), eb("build_id", "<", buildId)]),
          ]),
        );
      }
      const rows = await page
        .orderBy("created_at", "desc")
        .orderBy("build_id", "desc")
        .limit(opts.limit)
        .execute();
      return { rows, total: Number(total.n) };
    },

    async countActive(tenantId: string, states: readonly BuildState[]): Promise<number> {
      const r = await db
        .selectFrom("builds")
        .where("tenant_id", "=", tenantId)
        .where("state", "in", [...states])
        .select((eb) => eb.fn.countAll<number>().as("n"))
        .executeTakeFirstOrThrow();
      return Number(r.n);
    },

    async countCreatedSince(tenantId: string, since: number): Promise<number> {
      const r = await db
        .selectFrom("builds")
        .where("tenant_id", "=", tenantId)
        .where("created_at", ">=", since)
        .select((eb) => eb.fn.countAll<number>().as("n"))
        .executeTakeFirstOrThrow();
      return Number(r.n);
    },

    async inRange(tenantId: string, from: number, to: number): Promise<BuildRow[]> {
      return db
        .selectFrom("builds")
        .selectAll()
        .where("tenant_id", "=", tenantId)
        .where("created_at", ">=", from)
        .where("created_at", "<=", to)
        .orderBy("created_at", "desc")
        .execute();
    },

    /** Builds of any tenant that are not in a terminal state (crash recovery). */
    async unfinished(states: readonly BuildState[]): Promise<BuildRow[]> {
      return db
        .selectFrom("builds")
        .selectAll()
        .where("state", "in", [...states])
        .execute();
    },

    async delete(buildId: string): Promise<void> {
      await db.deleteFrom("build_logs").where("build_id", "=", buildId).execute();
      await db.deleteFrom("builds").where("build_id", "=", buildId).execute();
    },

    async appendLog(row: BuildLogsTable): Promise<void> {
      await db.insertInto("build_logs").values(row).execute();
    },

    async logs(buildId: string, afterSeq: number): Promise<LogRow[]> {
      return db
        .selectFrom("build_logs")
        .selectAll()
        .where("build_id", "=", buildId)
        .where("seq", ">", afterSeq)
        .orderBy("seq")
        .execute();
    },

    async lastLogSeq(buildId: string): Promise<number> {
      const r = await db
        .selectFrom("build_logs")
        .where("build_id", "=", buildId)
        .select((eb) => eb.fn.max("seq").as("m"))
        .executeTakeFirst();
      return Number(r?.m ?? 0);
    },
  };
}

export type BuildStore = ReturnType<typeof createBuildStore>;
