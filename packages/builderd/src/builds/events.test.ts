import path from "node:path";
import { createLogger, migrate, openDatabase } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { type Kysely, sql } from "kysely";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { migrations } from "../migrations.js";
import { type BuildEvent, createBuildEvents } from "./events.js";
import type { BuildState } from "./states.js";
import { type BuilderDb, createBuildStore } from "./store.js";

const dir = tempDir();
const database = openDatabase<BuilderDb>({ url: "", defaultSqlitePath: path.join(dir.path, "b.sqlite") });
const store = createBuildStore(database.db);
const log = createLogger({ service: "builderd", level: "silent" });

beforeAll(async () => {
  await migrate(database.db as Kysely<unknown>, "builderd", migrations);
});
afterAll(async () => {
  await database.close();
  dir.remove();
});

async function insertBuild(id: string, state: BuildState = "pulling") {
  const now = Date.now();
  await store.insert({
    build_id: id,
    tenant_id: "acme",
    state,
    config_json: "{}",
    source_ref: "x",
    idempotency_key: null,
    dedupe_key: null,
    image_digest: null,
    progress_percent: 0,
    current_step: "",
    progress_json: "{}",
    rootfs_path: null,
    rootfs_size_bytes: null,
    rootfs_checksum: null,
    asset_id: null,
    image_metadata_json: null,
    metrics_json: null,
    error_message: "",
    created_at: now,
    started_at: null,
    completed_at: null,
    updated_at: now,
  });
}

const messages = (events: BuildEvent[]) =>
  events.map((e) =>
    e.kind === "log" ? e.entry.message : e.kind === "state" ? `state:${e.state}` : "progress",
  );

describe("build events", () => {
  it("numbers log lines in call order and keeps them", async () => {
    const events = createBuildEvents(store, log);
    await insertBuild("b1");
    await Promise.all([1, 2, 3, 4, 5].map((i) => events.log("b1", "info", "pull", `line ${i}`)));
    const rows = await store.logs("b1", 0);
    expect(rows.map((r) => [r.seq, r.message])).toEqual([1, 2, 3, 4, 5].map((i) => [i, `line ${i}`]));
  });

  it("continues numbering after a restart (a new events object)", async () => {
    await createBuildEvents(store, log).log("b1", "info", "pull", "after restart");
    expect((await store.logs("b1", 5)).map((r) => r.seq)).toEqual([6]);
  });

  it("without follow: history, then the current state, then the end", async () => {
    const events = createBuildEvents(store, log);
    const got: BuildEvent[] = [];
    for await (const e of events.follow("b1", { follow: false, currentState: async () => "pulling" }))
      got.push(e);
    expect(messages(got)).toEqual([
      "line 1",
      "line 2",
      "line 3",
      "line 4",
      "line 5",
      "after restart",
      "state:pulling",
    ]);
  });

  it("with follow: history, then live lines and progress until a terminal state", async () => {
    const events = createBuildEvents(store, log);
    await insertBuild("b2");
    await events.log("b2", "info", "pull", "before");
    let state: BuildState = "pulling";
    const got: BuildEvent[] = [];
    const done = (async () => {
      for await (const e of events.follow("b2", { follow: true, currentState: async () => state }))
        got.push(e);
    })();
    await new Promise((r) => setTimeout(r, 20));
    await events.log("b2", "info", "extract", "live 1");
    events.emit("b2", {
      kind: "progress",
      progress: {
        stage: "extracting",
        bytesDone: 1,
        bytesTotal: 2,
        layersDone: 0,
        layersTotal: 1,
        percent: 10,
        step: "",
      },
    });
    await events.log("b2", "info", "build", "live 2");
    state = "completed";
    await events.flush("b2");
    events.emit("b2", { kind: "state", state: "completed" });
    await done;
    expect(messages(got)).toEqual(["before", "live 1", "progress", "live 2", "state:completed"]);
  });

  it("ends at once for a build that already ended, even when following", async () => {
    const events = createBuildEvents(store, log);
    await insertBuild("b3", "failed");
    await events.log("b3", "error", "build", "failed: boom");
    const got: BuildEvent[] = [];
    for await (const e of events.follow("b3", { follow: true, currentState: async () => "failed" }))
      got.push(e);
    expect(messages(got)).toEqual(["failed: boom", "state:failed"]);
  });

  it("stops following when the caller goes away", async () => {
    const events = createBuildEvents(store, log);
    await insertBuild("b4");
    const abort = new AbortController();
    const done = (async () => {
      const got: BuildEvent[] = [];
      for await (const e of events.follow("b4", {
        follow: true,
        currentState: async () => "pulling",
        signal: abort.signal,
      }))
        got.push(e);
      return got;
    })();
    await new Promise((r) => setTimeout(r, 20));
    abort.abort();
    expect(await done).toEqual([]);
  });

  it("does not fail the build when a log line cannot be stored", async () => {
    const events = createBuildEvents(store, log);
    // No such build: the foreign key refuses the row; the call still resolves.
    await sql`PRAGMA foreign_keys = ON`.execute(database.db);
    await expect(events.log("no-such-build", "info", "x", "y")).resolves.toBeUndefined();
    expect(await store.logs("no-such-build", 0)).toEqual([]);
    // …and the next line for a real build still works.
    await events.log("b1", "info", "pull", "still logging");
    expect((await store.logs("b1", 6)).map((r) => r.message)).toEqual(["still logging"]);
  });
});
