import fs from "node:fs";
import path from "node:path";
import SQLite from "better-sqlite3";
import { Kysely, PostgresDialect, SqliteDialect, sql } from "kysely";
import pg from "pg";
import { type Checkpointer, createCheckpointer } from "./checkpointer.js";

export type DialectName = "sqlite" | "postgres";

/** A service's state database: SQLite (embedded default) or PostgreSQL, one Kysely code path. */
export interface Database<DB = unknown> {
  readonly db: Kysely<DB>;
  readonly dialect: DialectName;
  /** Where it lives, password removed (for logs and errors). */
  readonly location: string;
  /** Round-trips a trivial query; throws when the database cannot answer. */
  ping(timeoutMs?: number): Promise<void>;
  close(): Promise<void>;
}

export interface DatabaseOptions {
  /** `postgres://…`, `sqlite:///abs/path.sqlite`, or empty for the default SQLite file. */
  url: string;
  /** Used when `url` is empty. */
  defaultSqlitePath: string;
  /** Pool size for PostgreSQL. */
  poolMax?: number;
  /** SQLite: a WAL checkpoint on the checkpointer thread failed (the log keeps growing meanwhile). */
  onCheckpointError?: (message: string) => void;
  /** SQLite: how often the checkpointer thread checkpoints (default 500 ms). */
  checkpointIntervalMs?: number;
  /** SQLite: the checkpoint thread to use (default: one of this database's own). */
  checkpointer?: Checkpointer;
}

const INT8_OID = 20;

export function redactUrl(raw: string): string {
  try {
    const u = new URL(raw);
    if (u.password) u.password = "***";
    return u.toString();
  } catch {
    return raw;
  }
}

export function openDatabase<DB>(opts: DatabaseOptions): Database<DB> {
  const url = opts.url.trim();
  if (url.startsWith("postgres://") || url.startsWith("postgresql://")) {
    const pool = new pg.Pool({
      connectionString: url,
      max: opts.poolMax ?? 10,
      connectionTimeoutMillis: 5_000,
      // int8 (COUNT, SUM, bigint columns) as JS numbers; Kiln's counters stay below 2^53.
      types: {
        getTypeParser: ((oid: number, format?: "text" | "binary") =>
          oid === INT8_OID
            ? (v: string) => Number(v)
            : pg.types.getTypeParser(oid, format as "text")) as never,
      },
    });
    // An idle client losing its connection (server restart) must not crash the process.
    pool.on("error", () => {});
    const db = new Kysely<DB>({ dialect: new PostgresDialect({ pool }) });
    return makeDatabase(db, "postgres", redactUrl(url));
  }
  let file = opts.defaultSqlitePath;
  if (url.startsWith("sqlite://")) file = decodeURIComponent(new URL(url).pathname);
  else if (url !== "")
    throw new Error(`unsupported database URL ${redactUrl(url)}: use postgres:// or sqlite://`);
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const sqlite = new SQLite(file);
  sqlite.pragma("journal_mode = WAL");
  sqlite.pragma("synchronous = NORMAL");
  sqlite.pragma("busy_timeout = 5000");
  sqlite.pragma("foreign_keys = ON");
  // Checkpoints run on a worker thread, off the event loop (checkpointer.ts).
  sqlite.pragma("wal_autocheckpoint = 0");
  const checkpoints = (opts.checkpointer ?? createCheckpointer()).watch(file, {
    onError: opts.onCheckpointError,
    intervalMs: opts.checkpointIntervalMs,
  });
  const db = new Kysely<DB>({ dialect: new SqliteDialect({ database: withStatementCache(sqlite) }) });
  return makeDatabase(db, "sqlite", file, () => checkpoints.stop());
}

/** Distinct SQL texts kept prepared; `IN (?, …)` lists of many lengths make the set open-ended. */
const STATEMENT_CACHE_SIZE = 256;

/**
 * Kysely's SQLite driver prepares every query anew, and compiling SQL was a visible share of a
 * short RPC. This keeps the most recently used statements prepared (least recently used out).
 * A statement still being iterated (a streamed query) is busy: the caller gets a fresh one.
 */
export function withStatementCache(
  sqlite: SQLite.Database,
  max = STATEMENT_CACHE_SIZE,
): Pick<SQLite.Database, "prepare" | "close"> {
  const cache = new Map<string, SQLite.Statement>();
  return {
    prepare(source: string) {
      const cached = cache.get(source);
      if (cached && !cached.busy) {
        cache.delete(source);
        cache.set(source, cached);
        return cached;
      }
      const stmt = sqlite.prepare(source);
      if (!cached) {
        cache.set(source, stmt);
        if (cache.size > max) cache.delete(cache.keys().next().value!);
      }
      return stmt;
    },
    close() {
      cache.clear();
      return sqlite.close();
    },
  } as Pick<SQLite.Database, "prepare" | "close">;
}

function makeDatabase<DB>(
  db: Kysely<DB>,
  dialect: DialectName,
  location: string,
  beforeClose?: () => Promise<void>,
): Database<DB> {
  let closed = false;
  return {
    db,
    dialect,
    location,
    async ping(timeoutMs = 2_000) {
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
      });
      try {
        await Promise.race([sql`select 1`.execute(db), timeout]);
      } finally {
        clearTimeout(timer);
      }
    },
    async close() {
      if (closed) return;
      closed = true;
      await beforeClose?.();
      await db.destroy();
    },
  };
}
