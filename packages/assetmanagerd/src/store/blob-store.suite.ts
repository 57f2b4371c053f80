import { createHash, randomBytes } from "node:crypto";
import type { Readable } from "node:stream";
import { InvalidArgumentError } from "@kiln/kit";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import {
  BlobNotFoundError,
  type BlobStore,
  DigestMismatchError,
  IngestInUseError,
  SizeMismatchError,
} from "./blob-store.js";

/** One backend under test: a store, and backend-level views the suite cannot get through it. */
export interface BlobStoreFixture {
  store: BlobStore;
  /** A second store on the same storage, as a restarted process would open it. */
  reopen(): Promise<BlobStore>;
  /** Leaves an ingest behind the way a crashed writer would (not known to any open store). */
  plantLeftover(ref: string, bytes: Buffer): Promise<void>;
  /** Refs of ingest leftovers present in the storage. */
  leftovers(): Promise<string[]>;
  teardown(): Promise<void>;
}

export const MiB = 1024 * 1024;

export function sha256(bytes: Uint8Array): string {
  return `sha256:${createHash("sha256").update(bytes).digest("hex")}`;
}

export async function readAll(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of stream) chunks.push(Buffer.from(c as Uint8Array));
  return Buffer.concat(chunks);
}

/** Writes `bytes` in `chunkSize` pieces and commits. */
async function put(
  store: BlobStore,
  ref: string,
  bytes: Buffer,
  chunkSize = 64 * 1024,
  expected?: { digest?: string; size?: number },
) {
  const w = await store.ingest(ref);
  try {
    for (let o = 0; o < bytes.length; o += chunkSize) await w.write(bytes.subarray(o, o + chunkSize));
    return await w.commit(expected);
  } catch (err) {
    await w.abort();
    throw err;
  }
}

async function listDigests(store: BlobStore): Promise<string[]> {
  const out: string[] = [];
  for await (const b of store.list()) out.push(b.digest);
  return out.sort();
}

/**
 * Conformance cases every BlobStore implementation runs (containerd's content testsuite, in
 * small). Tenancy is not the store's business — it sees only digests — so cross-tenant
 * isolation is tested at the registry (assets/registry.test.ts).
 */
export function blobStoreSuite(name: string, setup: () => Promise<BlobStoreFixture>): void {
  describe(`BlobStore conformance: ${name}`, () => {
    let fx: BlobStoreFixture;
    let store: BlobStore;
    beforeEach(async () => {
      fx = await setup();
      store = fx.store;
    });
    afterEach(async () => {
      await fx.teardown();
    });

    it("commits streamed content under its sha256 and reads it back", async () => {
      const bytes = randomBytes(300 * 1024);
      const res = await put(store, "ref-a", bytes);
      expect(res).toEqual({ digest: sha256(bytes), size: bytes.length, created: true });
      const info = await store.stat(res.digest);
      expect(info).toMatchObject({
        digest: res.digest,
        size: bytes.length,
        location: store.location(res.digest),
      });
      expect((await readAll(await store.openRead(res.digest))).equals(bytes)).toBe(true);
      expect(await listDigests(store)).toEqual([res.digest]);
      expect(await fx.leftovers()).toEqual([]);
    });

    it("reports the running digest and size while writing", async () => {
      const w = await store.ingest("ref-running");
      await w.write(Buffer.from("hello "));
      expect(w.size).toBe(6);
      expect(w.digest()).toBe(sha256(Buffer.from("hello ")));
      await w.write(Buffer.from("world"));
      const res = await w.commit();
      expect(res.digest).toBe(sha256(Buffer.from("hello world")));
    });

    it("stores an empty blob", async () => {
      const res = await put(store, "ref-empty", Buffer.alloc(0));
      expect(res.size).toBe(0);
      expect((await readAll(await store.openRead(res.digest))).length).toBe(0);
    });

    it("streams content larger than one part in many chunks", async () => {
      const bytes = randomBytes(12 * MiB + 12345);
      const res = await put(store, "ref-big", bytes, MiB);
      expect(res.digest).toBe(sha256(bytes));
      expect(res.size).toBe(bytes.length);
      expect((await readAll(await store.openRead(res.digest))).equals(bytes)).toBe(true);
      expect(await fx.leftovers()).toEqual([]);
    });

    it("keeps the existing blob when the same content is committed again", async () => {
      const bytes = randomBytes(10_000);
      expect((await put(store, "ref-1", bytes)).created).toBe(true);
      const again = await put(store, "ref-2", bytes);
      expect(again).toEqual({ digest: sha256(bytes), size: bytes.length, created: false });
      expect(await listDigests(store)).toEqual([sha256(bytes)]);
      expect(await fx.leftovers()).toEqual([]);
    });

    it("stores identical content written concurrently once", async () => {
      const bytes = randomBytes(6 * MiB + 7);
      const writers = await Promise.all(Array.from({ length: 6 }, (_, i) => store.ingest(`ref-c${i}`)));
      // Interleave the writers chunk by chunk, as concurrent uploads would.
      for (let o = 0; o < bytes.length; o += 512 * 1024) {
        await Promise.all(writers.map((w) => w.write(bytes.subarray(o, o + 512 * 1024))));
      }
      const results = await Promise.all(
        writers.map((w) => w.commit({ digest: sha256(bytes), size: bytes.length })),
      );
      for (const r of results) expect(r.digest).toBe(sha256(bytes));
      expect(results.some((r) => r.created)).toBe(true);
      expect(await listDigests(store)).toEqual([sha256(bytes)]);
      expect((await readAll(await store.openRead(sha256(bytes)))).equals(bytes)).toBe(true);
      expect(await fx.leftovers()).toEqual([]);
    });

    it("keeps nothing when the declared digest does not match", async () => {
      const bytes = randomBytes(2 * MiB);
      const wrong = sha256(Buffer.from("something else"));
      const err = await put(store, "ref-bad", bytes, 256 * 1024, { digest: wrong }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(DigestMismatchError);
      expect(err).toBeInstanceOf(InvalidArgumentError);
      expect((err as DigestMismatchError).actual).toBe(sha256(bytes));
      expect(await store.stat(sha256(bytes))).toBeUndefined();
      expect(await listDigests(store)).toEqual([]);
      expect(await fx.leftovers()).toEqual([]);
    });

    it("keeps nothing when the declared size does not match (multipart path too)", async () => {
      for (const size of [1000, 7 * MiB]) {
        const bytes = randomBytes(size);
        const err = await put(store, `ref-size-${size}`, bytes, MiB, { size: size + 1 }).catch(
          (e: unknown) => e,
        );
        expect(err).toBeInstanceOf(SizeMismatchError);
        expect(await store.stat(sha256(bytes))).toBeUndefined();
      }
      expect(await listDigests(store)).toEqual([]);
      expect(await fx.leftovers()).toEqual([]);
    });

    it("discards an aborted ingest and frees its ref", async () => {
      const w = await store.ingest("ref-abort");
      await w.write(randomBytes(6 * MiB));
      await w.abort();
      await w.abort(); // twice is fine
      expect(await listDigests(store)).toEqual([]);
      expect(await fx.leftovers()).toEqual([]);
      const again = await store.ingest("ref-abort");
      await again.abort();
    });

    it("refuses a ref that is being written, and refs that are not plain names", async () => {
      const w = await store.ingest("ref-busy");
      await expect(store.ingest("ref-busy")).rejects.toBeInstanceOf(IngestInUseError);
      await w.abort();
      for (const bad of ["../x", "a/b", "", ".."]) {
        await expect(store.ingest(bad)).rejects.toBeInstanceOf(InvalidArgumentError);
      }
    });

    it("refuses digests that are not sha256:<64 hex> (they become paths and keys)", async () => {
      for (const bad of ["sha256:../../etc/passwd", "md5:abc", `sha256:${"A".repeat(64)}`]) {
        await expect(store.stat(bad)).rejects.toBeInstanceOf(InvalidArgumentError);
        await expect(store.delete(bad)).rejects.toBeInstanceOf(InvalidArgumentError);
      }
    });

    it("deletes blobs and reports missing ones", async () => {
      const bytes = randomBytes(1000);
      const { digest } = await put(store, "ref-del", bytes);
      expect(await store.delete(digest)).toBe(true);
      expect(await store.delete(digest)).toBe(false);
      expect(await store.stat(digest)).toBeUndefined();
      await expect(store.openRead(digest)).rejects.toBeInstanceOf(BlobNotFoundError);
    });

    it("cleans up leftovers of crashed writers, keeping live and recent ingests", async () => {
      await fx.plantLeftover("crashed-1", randomBytes(1000));
      await fx.plantLeftover("crashed-2", randomBytes(1000));
      const live = await store.ingest("live");
      await live.write(Buffer.from("in progress"));
      expect((await fx.leftovers()).filter((r) => r.startsWith("crashed")).sort()).toEqual([
        "crashed-1",
        "crashed-2",
      ]);

      // Nothing is older than a cutoff in the past.
      expect(await store.cleanup({ olderThan: new Date(Date.now() - 3_600_000) })).toBe(0);
      const removed = await store.cleanup({ olderThan: new Date(Date.now() + 60_000) });
      expect(removed).toBe(2);
      expect((await fx.leftovers()).filter((r) => r.startsWith("crashed"))).toEqual([]);

      // The live ingest was kept and still commits.
      const res = await live.commit();
      expect(res.digest).toBe(sha256(Buffer.from("in progress")));
      expect(await listDigests(store)).toEqual([res.digest]);
    });

    it("is read consistently by a reopened store, which removes leftovers on cleanup", async () => {
      const bytes = randomBytes(4096);
      const { digest } = await put(store, "ref-persist", bytes);
      await fx.plantLeftover("crashed", randomBytes(10));
      const reopened = await fx.reopen();
      try {
        expect((await readAll(await reopened.openRead(digest))).equals(bytes)).toBe(true);
        expect(await reopened.cleanup({ olderThan: new Date(Date.now() + 60_000) })).toBeGreaterThanOrEqual(
          1,
        );
        expect(await fx.leftovers()).toEqual([]);
        expect(await listDigests(reopened)).toEqual([digest]);
      } finally {
        await reopened.close();
      }
    });
  });
}
