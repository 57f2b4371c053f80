import fs from "node:fs";
import path from "node:path";
import SQLite from "better-sqlite3";
import { type Kysely, sql } from "kysely";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createTestPostgres, tempDir } from "../testing/index.js";
import { createCheckpointer } from "./checkpointer.js";
import { type Database, openDatabase, redactUrl, withStatementCache } from "./database.js";
import { type Migrations, migrate } from "./migrate.js";

interface Schema {
  widgets: { id: string; tenant_id: string; size_bytes: number; created_at: string };
}

const migrations: Migrations = {
  "0001_widgets": {
    async up(db: Kysely<unknown>) {
      await db.schema
        .createTable("widgets")
        .addColumn("id", "text", (c) => c.primaryKey())
        .addColumn("tenant_id", "text", (c) => c.notNull())
        .addColumn("size_bytes", "bigint", (c) => c.notNull())
        .addColumn("created_at", "text", (c) => c.notNull())
        .execute();
    },
  },
  "0002_widgets_tenant_index": {
    async up(db: Kysely<unknown>) {
      await db.schema.createIndex("widgets_tenant").on("widgets").column("tenant_id").execute();
    },
  },
};

const dialects = [
  {
    name: "sqlite",
    async open() {
      const dir = tempDir();
      const database = openDatabase<Schema>({
        url: "",
        defaultSqlitePath: path.join(dir.path, "db", "t.sqlite"),
      });
      return { database, cleanup: async () => dir.remove() };
    },
  },
  {
    name: "postgres",
    async open() {
      const pg = await createTestPostgres();
      const database = openDatabase<Schema>({ url: pg.url, defaultSqlitePath: "/nonexistent" });
      return { database, cleanup: () => pg.drop() };
    },
  },
];

describe.each(dialects)("database on $name", ({ name, open }) => {
  let database: Database<Schema>;
  let cleanup: () => Promise<void>;

  beforeAll(async () => {
    ({ database, cleanup } = await open());
  });
  afterAll(async () => {
    await database.close();
    await cleanup();
  });

  it("applies migrations once, in order, and is idempotent", async () => {
    expect(database.dialect).toBe(name);
    expect(await migrate(database.db as Kysely<unknown>, "test", migrations)).toEqual([
      "0001_widgets",
      "0002_widgets_tenant_index",
    ]);
    expect(await migrate(database.db as Kysely<unknown>, "test", migrations)).toEqual([]);
  });

  it("keeps each service's migration bookkeeping separate", async () => {
    const other: Migrations = {
      "0001_gadgets": {
        up: async (db) => {
          await db.schema.createTable("gadgets").addColumn("id", "text").execute();
        },
      },
    };
    expect(await migrate(database.db as Kysely<unknown>, "other", other)).toEqual(["0001_gadgets"]);
    const rows = await sql<{ name: string }>`select name from kiln_test_migrations order by name`.execute(
      database.db,
    );
    expect(rows.rows.map((r) => r.name)).toEqual(["0001_widgets", "0002_widgets_tenant_index"]);
  });

  it("round-trips 64-bit integers as numbers", async () => {
    const big = 2 ** 40 + 7;
    await database.db
      .insertInto("widgets")
      .values({ id: "w1", tenant_id: "acme", size_bytes: big, created_at: new Date(0).toISOString() })
      .execute();
    const row = await database.db
      .selectFrom("widgets")
      .selectAll()
      .where("id", "=", "w1")
      .executeTakeFirstOrThrow();
    expect(row.size_bytes).toBe(big);
    const count = await database.db
      .selectFrom("widgets")
      .select((eb) => eb.fn.countAll<number>().as("n"))
      .executeTakeFirstOrThrow();
    expect(count.n).toBe(1);
  });

  it("answers ping", async () => {
    await expect(database.ping()).resolves.toBeUndefined();
  });

  it("reports a failing migration by name, records nothing for it, and resumes once fixed", async () => {
    const ok: Migrations = {
      "0001_ok": {
        up: async (db) => void (await db.schema.createTable("ok_table").addColumn("id", "text").execute()),
      },
    };
    const broken: Migrations = {
      ...ok,
      "0002_next": { up: async (db) => void (await sql`this is not sql`.execute(db)) },
    };
    await expect(migrate(database.db as Kysely<unknown>, "broken", broken)).rejects.toThrow(
      /broken: migration 0002_next failed/,
    );
    const names = async () =>
      (
        await sql<{ name: string }>`select name from kiln_broken_migrations order by name`.execute(
          database.db,
        )
      ).rows.map((r) => r.name);
    // PostgreSQL runs a batch in one transaction (nothing applied); SQLite commits per migration.
    expect(await names()).toEqual(name === "postgres" ? [] : ["0001_ok"]);
    const fixed: Migrations = {
      ...ok,
      "0002_next": {
        up: async (db) => void (await db.schema.createTable("next_table").addColumn("id", "text").execute()),
      },
    };
    await migrate(database.db as Kysely<unknown>, "broken", fixed);
    expect(await names()).toEqual(["0001_ok", "0002_next"]);
  });
});

describe("openDatabase", () => {
  it("refuses an unsupported URL scheme", () => {
    expect(() => openDatabase({ url: "mysql://root@localhost/x", defaultSqlitePath: "/tmp/x" })).toThrow(
      /unsupported database URL mysql:\/\/root@localhost\/x: use postgres:\/\/ or sqlite:\/\//,
    );
  });

  it("hides passwords in locations", () => {
    expect(redactUrl("postgres://kiln:s3cret@db:5432/kiln")).toBe("postgres://kiln:***@db:5432/kiln");
  });

  it("ping fails when PostgreSQL is unreachable", async () => {
    const database = openDatabase({
      url: "postgres://postgres@127.0.0.1:1/none",
      defaultSqlitePath: "/tmp/x",
    });
    await expect(database.ping()).rejects.toThrow(/ECONNREFUSED/);
    await database.close();
  });
});

describe("withStatementCache", () => {
  it("reuses prepared statements, hands out a fresh one while the cached one iterates, and stays bounded", () => {
    const sqlite = new SQLite(":memory:");
    const cached = withStatementCache(sqlite, 2);
    sqlite.exec("create table t (n integer); insert into t values (1), (2), (3)");
    const select = "select n from t order by n";
    const first = cached.prepare(select);
    expect(cached.prepare(select)).toBe(first);
    expect(first.all()).toEqual([{ n: 1 }, { n: 2 }, { n: 3 }]);

    // A streamed query keeps its statement busy: a second use may not share it.
    const it = first.iterate();
    expect(it.next().value).toEqual({ n: 1 });
    const other = cached.prepare(select);
    expect(other).not.toBe(first);
    expect(other.all()).toHaveLength(3);
    it.return?.();
    expect(cached.prepare(select)).toBe(first);

    // Least recently used out: with room for two, a third text evicts the oldest.
    cached.prepare("select 1");
    cached.prepare("select 2");
    expect(cached.prepare(select)).not.toBe(first);
    cached.close();
    expect(sqlite.open).toBe(false);
  });

  it("runs Kysely queries and transactions through cached statements", async () => {
    const dir = tempDir();
    const database = openDatabase<Schema>({ url: "", defaultSqlitePath: path.join(dir.path, "t.sqlite") });
    try {
      await migrate(database.db as Kysely<unknown>, "cache_test", migrations);
      for (let i = 0; i < 3; i++) {
        await database.db.transaction().execute(async (tx) => {
          await tx
            .insertInto("widgets")
            .values({ id: `w${i}`, tenant_id: "acme", size_bytes: i, created_at: "now" })
            .execute();
        });
      }
      const rows = await database.db.selectFrom("widgets").select("id").orderBy("id").execute();
      expect(rows.map((r) => r.id)).toEqual(["w0", "w1", "w2"]);
      const streamed: string[] = [];
      for await (const r of database.db.selectFrom("widgets").select("id").orderBy("id").stream())
        streamed.push(r.id);
      expect(streamed).toEqual(["w0", "w1", "w2"]);
    } finally {
      await database.close();
      dir.remove();
    }
  });
});

describe("SQLite WAL checkpoints", () => {
  /** Writes ~8 MiB (over SQLite's default 1000-page autocheckpoint) in one commit; returns the file sizes. */
  type Blobs = { blobs: { id: number; data: Buffer } };
  const open = (file: string, checkpointIntervalMs: number, checkpointer = createCheckpointer()) =>
    openDatabase<Blobs>({ url: "", defaultSqlitePath: file, checkpointIntervalMs, checkpointer });

  /** Waits until the checkpointer has copied the log into `file` (it grows past 8 MiB). */
  async function checkpointed(file: string) {
    for (let i = 0; i < 200 && fs.statSync(file).size < 8 * 1024 * 1024; i++)
      await new Promise((r) => setTimeout(r, 10));
    return fs.statSync(file).size;
  }

  async function writeBulk(database: Database<Blobs>, file: string) {
    await sql`create table blobs (id integer primary key, data blob)`.execute(database.db);
    await database.db.transaction().execute(async (tx) => {
      for (let i = 0; i < 128; i++)
        await tx
          .insertInto("blobs")
          .values({ id: i, data: Buffer.alloc(64 * 1024, i) })
          .execute();
    });
    return { db: fs.statSync(file).size, wal: fs.statSync(`${file}-wal`).size };
  }

  it("never checkpoints inside a commit: a worker thread does, off the event loop", async () => {
    const dir = tempDir();
    const file = path.join(dir.path, "t.sqlite");
    const slow = open(file, 60_000);
    try {
      // The commit left all 8 MiB in the log: no checkpoint ran on the committing connection.
      const sizes = await writeBulk(slow, file);
      expect(sizes.wal).toBeGreaterThan(8 * 1024 * 1024);
      expect(sizes.db).toBeLessThan(1024 * 1024);
    } finally {
      await slow.close();
    }
    // Closing the last connection checkpoints the whole log and removes it.
    expect(fs.statSync(file).size).toBeGreaterThan(8 * 1024 * 1024);
    expect(fs.existsSync(`${file}-wal`)).toBe(false);

    const file2 = path.join(dir.path, "t2.sqlite");
    const quick = open(file2, 20);
    try {
      await writeBulk(quick, file2);
      // The checkpointer thread copies the log into the database while the connection stays open.
      expect(await checkpointed(file2)).toBeGreaterThan(8 * 1024 * 1024);
      const rows = await quick.db
        .selectFrom("blobs")
        .select((eb) => eb.fn.countAll<number>().as("n"))
        .executeTakeFirst();
      expect(Number(rows?.n)).toBe(128);
    } finally {
      await quick.close();
      dir.remove();
    }
  });

  it("checkpoints several databases on one shared thread, which ends with the last", async () => {
    const dir = tempDir();
    const shared = createCheckpointer();
    expect(shared.running).toBe(false);
    const [fa, fb, fc] = ["a", "b", "c"].map((n) => path.join(dir.path, `${n}.sqlite`)) as [
      string,
      string,
      string,
    ];
    const a = open(fa, 20, shared);
    const b = open(fb, 20, shared);
    try {
      expect(shared.running).toBe(true);
      await writeBulk(a, fa);
      expect(await checkpointed(fa)).toBeGreaterThan(8 * 1024 * 1024);
      await a.close();
      // The other database is still checkpointed after one stopped.
      expect(shared.running).toBe(true);
      await writeBulk(b, fb);
      expect(await checkpointed(fb)).toBeGreaterThan(8 * 1024 * 1024);
    } finally {
      await a.close();
      await b.close();
    }
    expect(shared.running).toBe(false);
    // A database opened later starts it again.
    const c = open(fc, 20, shared);
    expect(shared.running).toBe(true);
    await c.close();
    expect(shared.running).toBe(false);
    dir.remove();
  });
});
