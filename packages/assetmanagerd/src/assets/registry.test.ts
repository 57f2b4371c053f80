import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import {
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  ResourceExhaustedError,
  tierLimits,
} from "@kiln/kit";
import { afterEach, describe, expect, it } from "vitest";
import { AssetIdTakenError, AssetLeasedError, AssetNotFoundError, LeaseIdTakenError } from "../errors.js";
import { DigestMismatchError } from "../store/blob-store.js";
import { sha256 } from "../store/blob-store.suite.js";
import {
  chunksOf,
  manualClock,
  openTestRegistry,
  type RegistryFixture,
  type TestDialect,
  tenantA,
  tenantB,
} from "../testing/registry-fixture.js";

const spec = (over: Partial<Parameters<RegistryFixture["registry"]["upload"]>[1]> = {}) => ({
  name: "rootfs.ext4",
  type: "ROOTFS" as const,
  createdBy: "internal",
  ...over,
});

/** Files under the local store's sha256/ tree. */
function storedBlobFiles(fx: RegistryFixture): string[] {
  const root = path.join(fx.dataDir, "assets", "sha256");
  if (!fs.existsSync(root)) return [];
  return fs.readdirSync(root).flatMap((p) => fs.readdirSync(path.join(root, p)));
}

function ingestLeftovers(fx: RegistryFixture): string[] {
  const dir = path.join(fx.dataDir, "assets", "ingest");
  return fs.existsSync(dir) ? fs.readdirSync(dir) : [];
}

describe.each<TestDialect>(["sqlite", "postgres"])("asset registry on %s", (dialect) => {
  let fx: RegistryFixture;
  afterEach(async () => {
    await fx?.close();
  });

  describe("uploads", () => {
    it("stores streamed content under its digest and makes the asset AVAILABLE", async () => {
      fx = await openTestRegistry(dialect);
      const bytes = randomBytes(200_000);
      const { asset, deduplicated } = await fx.registry.upload(
        tenantA,
        spec({
          labels: { docker_image: "docker.io/library/nginx:1.27" },
          sourceImage: "nginx:1.27",
          sizeBytes: bytes.length,
        }),
        chunksOf(bytes),
      );
      expect(deduplicated).toBe(false);
      expect(asset).toMatchObject({
        tenantId: "acme",
        name: "rootfs.ext4",
        type: "ROOTFS",
        status: "AVAILABLE",
        backend: "local",
        checksum: sha256(bytes),
        sizeBytes: bytes.length,
        labels: { docker_image: "docker.io/library/nginx:1.27" },
        sourceImage: "nginx:1.27",
        referenceCount: 0,
      });
      expect(fs.readFileSync(asset.location).equals(bytes)).toBe(true);
      expect(await fx.registry.get(tenantA, asset.id)).toEqual(asset);
    });

    it("stores the same bytes once across uploads and tenants", async () => {
      fx = await openTestRegistry(dialect);
      const bytes = randomBytes(50_000);
      const first = await fx.registry.upload(tenantA, spec(), chunksOf(bytes));
      const second = await fx.registry.upload(tenantA, spec({ name: "again" }), chunksOf(bytes));
      const other = await fx.registry.upload(tenantB, spec(), chunksOf(bytes));
      expect([first.deduplicated, second.deduplicated, other.deduplicated]).toEqual([false, true, true]);
      expect(new Set([first, second, other].map((r) => r.asset.location)).size).toBe(1);
      expect(storedBlobFiles(fx)).toHaveLength(1);
    });

    it("stores identical content uploaded concurrently once", async () => {
      fx = await openTestRegistry(dialect);
      const bytes = randomBytes(3 * 1024 * 1024);
      const results = await Promise.all(
        Array.from({ length: 8 }, (_, i) =>
          fx.registry.upload(
            i % 2 ? tenantA : tenantB,
            spec({ name: `copy-${i}` }),
            chunksOf(bytes, 256 * 1024),
          ),
        ),
      );
      expect(results.filter((r) => !r.deduplicated)).toHaveLength(1);
      for (const r of results) {
        expect(r.asset.status).toBe("AVAILABLE");
        expect(r.asset.checksum).toBe(sha256(bytes));
      }
      expect(storedBlobFiles(fx)).toEqual([sha256(bytes).slice(7)]);
      expect(ingestLeftovers(fx)).toEqual([]);
    });

    it("rejects a declared checksum that does not match and keeps nothing", async () => {
      fx = await openTestRegistry(dialect);
      const bytes = randomBytes(10_000);
      const err = await fx.registry
        .upload(tenantA, spec({ checksum: sha256(Buffer.from("other")) }), chunksOf(bytes))
        .catch((e: unknown) => e);
      expect(err).toBeInstanceOf(DigestMismatchError);
      expect(err).toBeInstanceOf(InvalidArgumentError);
      for (const status of ["UPLOADING", "AVAILABLE"] as const) {
        expect((await fx.registry.list(tenantA, { status })).totalCount).toBe(0);
      }
      expect(storedBlobFiles(fx)).toEqual([]);
      expect(ingestLeftovers(fx)).toEqual([]);
      expect(await fx.store.unreferencedBlobs()).toEqual([]);
    });

    it("rejects a declared size that does not match, without reading past it", async () => {
      fx = await openTestRegistry(dialect);
      await expect(
        fx.registry.upload(tenantA, spec({ sizeBytes: 11 }), chunksOf(Buffer.from("ten bytes!"))),
      ).rejects.toThrow(/size mismatch: declared 11 bytes, received 10/);
      let read = 0;
      async function* endless() {
        for (;;) {
          read++;
          yield Buffer.alloc(1000);
        }
      }
      await expect(fx.registry.upload(tenantA, spec({ sizeBytes: 2500 }), endless())).rejects.toThrow(
        /declared 2500 bytes, received at least 3000/,
      );
      expect(read).toBe(3);
      expect(storedBlobFiles(fx)).toEqual([]);
    });

    it("refuses uploads over the size limit or the tenant's storage quota, keeping nothing", async () => {
      fx = await openTestRegistry(dialect, {
        settings: { maxUploadSize: 100_000 },
        limits: tierLimits((_, l) => ({ ...l, maxStorageBytes: 150_000 })),
      });
      await expect(
        fx.registry.upload(tenantA, spec({ sizeBytes: 200_000 }), chunksOf(Buffer.alloc(0))),
      ).rejects.toThrow(/declared size 200000 exceeds the 100000-byte limit/);
      const tooBig = await fx.registry
        .upload(tenantA, spec(), chunksOf(randomBytes(100_001)))
        .catch((e: unknown) => e);
      expect(tooBig).toBeInstanceOf(ResourceExhaustedError);
      // A declared size counts once: the upload may use all that is left of the quota.
      await fx.registry.upload(tenantA, spec({ sizeBytes: 90_000 }), chunksOf(randomBytes(90_000)));
      const overQuota = await fx.registry
        .upload(tenantA, spec(), chunksOf(randomBytes(90_000)))
        .catch((e: unknown) => e);
      expect(overQuota).toBeInstanceOf(ResourceExhaustedError);
      expect(String(overQuota)).toMatch(/tenant acme storage quota \(150000 bytes; 90000 used\)/);
      // Another tenant has its own quota.
      await fx.registry.upload(tenantB, spec(), chunksOf(randomBytes(90_000)));
      expect(storedBlobFiles(fx)).toHaveLength(2);
      expect(ingestLeftovers(fx)).toEqual([]);
    });

    it("keeps nothing when the stream fails midway", async () => {
      fx = await openTestRegistry(dialect);
      async function* broken() {
        yield randomBytes(1000);
        throw new Error("client went away");
      }
      await expect(fx.registry.upload(tenantA, spec(), broken())).rejects.toThrow(/client went away/);
      expect((await fx.registry.list(tenantA, { status: "UPLOADING" })).totalCount).toBe(0);
      expect(ingestLeftovers(fx)).toEqual([]);
    });

    it("honours a suggested id and refuses a taken one", async () => {
      fx = await openTestRegistry(dialect);
      const { asset } = await fx.registry.upload(
        tenantA,
        spec({ id: "ast_mine" }),
        chunksOf(Buffer.from("x")),
      );
      expect(asset.id).toBe("ast_mine");
      await expect(
        fx.registry.upload(tenantB, spec({ id: "ast_mine" }), chunksOf(Buffer.from("y"))),
      ).rejects.toBeInstanceOf(AssetIdTakenError);
    });

    it("refuses names and labels that try to escape", async () => {
      fx = await openTestRegistry(dialect);
      for (const name of ["../etc/passwd", "a/b", ".hidden", ""]) {
        await expect(
          fx.registry.upload(tenantA, spec({ name }), chunksOf(Buffer.from("x"))),
        ).rejects.toBeInstanceOf(InvalidArgumentError);
      }
      for (const labels of [
        { path: "../../etc" },
        { path: "/etc/passwd" },
        { "a/../b": "x" },
        { bad: "x\ny" },
      ] as Array<Record<string, string>>) {
        await expect(
          fx.registry.upload(tenantA, spec({ labels }), chunksOf(Buffer.from("x"))),
        ).rejects.toBeInstanceOf(InvalidArgumentError);
      }
      await expect(fx.registry.list(tenantA, { labels: { docker_image: "../x" } })).rejects.toBeInstanceOf(
        InvalidArgumentError,
      );
      expect(storedBlobFiles(fx)).toEqual([]);
    });
  });

  describe("registering", () => {
    it("imports a host file from an allowed directory by hard link, for internal callers only", async () => {
      fx = await openTestRegistry(dialect);
      const dir = fx.settings.importDirs[0]!;
      fs.mkdirSync(dir, { recursive: true });
      const file = path.join(dir, "rootfs.ext4");
      const bytes = randomBytes(70_000);
      fs.writeFileSync(file, bytes);
      const input = { ...spec(), backend: "local" as const, location: file, checksum: sha256(bytes) };
      await expect(fx.registry.register(tenantA, input, "external")).rejects.toBeInstanceOf(
        PermissionDeniedError,
      );
      const asset = await fx.registry.register(tenantA, input, "internal");
      expect(asset).toMatchObject({ status: "AVAILABLE", checksum: sha256(bytes), sizeBytes: bytes.length });
      // On the store's filesystem the file itself becomes the blob (no copy), made read-only; the
      // importer (builderd) then drops its own name for it.
      expect(fs.statSync(asset.location).ino).toBe(fs.statSync(file).ino);
      expect(fs.statSync(file).mode & 0o777).toBe(0o444);
      expect(fs.readFileSync(asset.location).equals(bytes)).toBe(true);
    });

    it("hashes an imported file of several read chunks right", async () => {
      fx = await openTestRegistry(dialect);
      const dir = fx.settings.importDirs[0]!;
      fs.mkdirSync(dir, { recursive: true });
      const file = path.join(dir, "big.ext4");
      const bytes = randomBytes(9 * 1024 * 1024 + 5); // three 4 MiB reads, the last one short
      fs.writeFileSync(file, bytes);
      const asset = await fx.registry.register(
        tenantA,
        { ...spec(), backend: "local" as const, location: file },
        "internal",
      );
      expect(asset).toMatchObject({ status: "AVAILABLE", checksum: sha256(bytes), sizeBytes: bytes.length });
    });

    it("verifies an imported file's checksum and size", async () => {
      fx = await openTestRegistry(dialect);
      const dir = fx.settings.importDirs[0]!;
      fs.mkdirSync(dir, { recursive: true });
      fs.writeFileSync(path.join(dir, "f"), "content");
      const base = { ...spec(), backend: "local" as const, location: path.join(dir, "f") };
      await expect(
        fx.registry.register(tenantA, { ...base, checksum: sha256(Buffer.from("other")) }, "internal"),
      ).rejects.toBeInstanceOf(DigestMismatchError);
      await expect(fx.registry.register(tenantA, { ...base, sizeBytes: 3 }, "internal")).rejects.toThrow(
        /size_bytes 3 does not match/,
      );
      expect(storedBlobFiles(fx)).toEqual([]);
      expect((await fx.registry.list(tenantA, { status: "UPLOADING" })).totalCount).toBe(0);
    });

    it("refuses files outside the import directories, also through symlinks and '..'", async () => {
      fx = await openTestRegistry(dialect);
      const dir = fx.settings.importDirs[0]!;
      fs.mkdirSync(dir, { recursive: true });
      const outside = path.join(fx.dataDir, "secret");
      fs.writeFileSync(outside, "secret");
      fs.symlinkSync(outside, path.join(dir, "link"));
      for (const location of [outside, path.join(dir, "link"), `${dir}/../secret`]) {
        const err = await fx.registry
          .register(tenantA, { ...spec(), backend: "local", location }, "internal")
          .catch((e: unknown) => e);
        expect(err, location).toBeInstanceOf(InvalidArgumentError);
      }
      await expect(
        fx.registry.register(
          tenantA,
          { ...spec(), backend: "local", location: path.join(dir, "missing") },
          "internal",
        ),
      ).rejects.toBeInstanceOf(NotFoundError);
      await expect(
        fx.registry.register(tenantA, { ...spec(), backend: "local", location: "relative/path" }, "internal"),
      ).rejects.toBeInstanceOf(InvalidArgumentError);
    });

    it("registers a second asset on content the tenant stores, but not on another tenant's", async () => {
      fx = await openTestRegistry(dialect);
      const { asset } = await fx.registry.upload(tenantA, spec(), chunksOf(Buffer.from("kernel")));
      const again = await fx.registry.register(
        tenantA,
        { ...spec({ name: "alias", labels: { app: "web" } }), backend: "local", location: asset.checksum },
        "external",
      );
      expect(again).toMatchObject({
        checksum: asset.checksum,
        status: "AVAILABLE",
        sizeBytes: 6,
        labels: { app: "web" },
      });
      const err = await fx.registry
        .register(tenantB, { ...spec(), backend: "local", location: asset.checksum }, "internal")
        .catch((e: unknown) => e);
      expect(err).toBeInstanceOf(NotFoundError);
      expect((await fx.registry.list(tenantB, { status: "UPLOADING" })).totalCount).toBe(0);
    });
  });

  describe("listing", () => {
    it("filters by type, status and labels and pages newest first", async () => {
      const clock = manualClock();
      fx = await openTestRegistry(dialect, { clock: clock.now });
      const ids: string[] = [];
      for (let i = 0; i < 7; i++) {
        clock.advance(1000);
        const { asset } = await fx.registry.upload(
          tenantA,
          spec({ name: `a${i}`, type: i < 5 ? "ROOTFS" : "KERNEL", labels: { app: i % 2 ? "odd" : "even" } }),
          chunksOf(Buffer.from(`content ${i}`)),
        );
        ids.push(asset.id);
      }
      await fx.registry.upload(tenantB, spec({ labels: { app: "even" } }), chunksOf(Buffer.from("b")));

      const pages: string[][] = [];
      let token: string | undefined;
      do {
        const page = await fx.registry.list(tenantA, { pageSize: 3, pageToken: token });
        expect(page.totalCount).toBe(7);
        pages.push(page.assets.map((a) => a.id));
        token = page.nextPageToken || undefined;
      } while (token);
      expect(pages.map((p) => p.length)).toEqual([3, 3, 1]);
      expect(pages.flat()).toEqual([...ids].reverse());

      expect((await fx.registry.list(tenantA, { type: "KERNEL" })).assets.map((a) => a.id)).toEqual([
        ids[6],
        ids[5],
      ]);
      const even = await fx.registry.list(tenantA, { labels: { app: "even" }, type: "ROOTFS" });
      expect(even.assets.map((a) => a.id)).toEqual([ids[4], ids[2], ids[0]]);
      expect(even.totalCount).toBe(3);
      expect((await fx.registry.list(tenantA, { status: "UPLOADING" })).assets).toEqual([]);
      await expect(fx.registry.list(tenantA, { pageToken: "garbage" })).rejects.toThrow(/page_token/);
    });

    it("starts a build for a missing rootfs once, and not when one exists", async () => {
      fx = await openTestRegistry(dialect);
      const calls: Array<Record<string, unknown>> = [];
      const build = {
        dockerImage: "docker.io/library/nginx:1.27",
        timeoutSeconds: 0,
        start: async (req: Record<string, unknown>) => {
          calls.push(req);
          return { buildId: "bld_1", status: "BUILD_STATE_PENDING" };
        },
      };
      const res = await fx.registry.query(tenantA, { type: "ROOTFS" }, build);
      expect(res.triggeredBuilds).toEqual([
        { buildId: "bld_1", dockerImage: "docker.io/library/nginx:1.27", status: "BUILD_STATE_PENDING" },
      ]);
      expect(calls[0]).toMatchObject({
        dockerImage: "docker.io/library/nginx:1.27",
        labels: { docker_image: "docker.io/library/nginx:1.27" },
        idempotencyKey: expect.stringMatching(/^auto-build:[a-f0-9]{32}:\d+$/),
      });
      // Another tenant's rootfs does not count; the tenant's own does.
      await fx.registry.upload(
        tenantB,
        spec({ labels: { docker_image: "docker.io/library/nginx:1.27" } }),
        chunksOf(Buffer.from("r")),
      );
      expect((await fx.registry.query(tenantA, {}, build)).triggeredBuilds).toHaveLength(1);
      await fx.registry.upload(
        tenantA,
        spec({ labels: { docker_image: "docker.io/library/nginx:1.27" } }),
        chunksOf(Buffer.from("r")),
      );
      const found = await fx.registry.query(tenantA, { type: "ROOTFS" }, build);
      expect(found.triggeredBuilds).toEqual([]);
      expect(found.assets).toHaveLength(1);
      expect(calls).toHaveLength(2);
      await expect(fx.registry.query(tenantA, {}, { ...build, dockerImage: "" })).rejects.toThrow(
        /docker_image is required/,
      );
    });
  });

  describe("leases and deletion", () => {
    it("counts leases, refuses to delete a leased asset unless forced, and releases idempotently", async () => {
      fx = await openTestRegistry(dialect);
      const { asset } = await fx.registry.upload(tenantA, spec(), chunksOf(Buffer.from("leased")));
      const l1 = await fx.registry.acquire(tenantA, asset.id, "vm:one", 0);
      const l2 = await fx.registry.acquire(tenantA, asset.id, "vm:two", 3600);
      expect(l1.expiresAt).toBeUndefined();
      expect(l2.expiresAt!.getTime() - l2.acquiredAt.getTime()).toBe(3_600_000);
      expect((await fx.registry.get(tenantA, asset.id)).referenceCount).toBe(2);

      const err = await fx.registry.delete(tenantA, asset.id, false).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(AssetLeasedError);
      expect(err).toBeInstanceOf(FailedPreconditionError);
      expect(String(err)).toMatch(/vm:one, vm:two/);

      expect(await fx.registry.release(tenantA, l1.leaseId)).toBe(true);
      expect(await fx.registry.release(tenantA, l1.leaseId)).toBe(false);
      expect((await fx.registry.get(tenantA, asset.id)).referenceCount).toBe(1);

      expect(await fx.registry.delete(tenantA, asset.id, true)).toBe(true);
      await expect(fx.registry.get(tenantA, asset.id)).rejects.toBeInstanceOf(AssetNotFoundError);
      expect(await fx.registry.release(tenantA, l2.leaseId)).toBe(false);
      expect(storedBlobFiles(fx)).toEqual([]);
    });

    it("takes a lease under the caller's id once; no other asset, holder or tenant gets that id", async () => {
      fx = await openTestRegistry(dialect);
      const { asset } = await fx.registry.upload(tenantA, spec(), chunksOf(Buffer.from("chosen")));
      const other = await fx.registry.upload(tenantA, spec(), chunksOf(Buffer.from("other")));
      const first = await fx.registry.acquire(tenantA, asset.id, "vm:one", 0, "lse_chosen1");
      expect(first.leaseId).toBe("lse_chosen1");
      // Again (a retry, or a caller recovering after a crash): the same lease, not a second one.
      expect(await fx.registry.acquire(tenantA, asset.id, "vm:one", 0, "lse_chosen1")).toEqual(first);
      expect((await fx.registry.get(tenantA, asset.id)).referenceCount).toBe(1);
      for (const [assetId, holder] of [
        [other.asset.id, "vm:one"],
        [asset.id, "vm:two"],
      ] as const) {
        await expect(fx.registry.acquire(tenantA, assetId, holder, 0, "lse_chosen1")).rejects.toBeInstanceOf(
          LeaseIdTakenError,
        );
      }
      const theirs = await fx.registry.upload(tenantB, spec(), chunksOf(Buffer.from("chosen")));
      await expect(
        fx.registry.acquire(tenantB, theirs.asset.id, "vm:one", 0, "lse_chosen1"),
      ).rejects.toBeInstanceOf(LeaseIdTakenError);
      expect((await fx.registry.get(tenantB, theirs.asset.id)).referenceCount).toBe(0);
      expect(await fx.registry.release(tenantA, "lse_chosen1")).toBe(true);
      expect((await fx.registry.get(tenantA, asset.id)).referenceCount).toBe(0);
    });

    it("deletes a blob only when its last asset goes", async () => {
      fx = await openTestRegistry(dialect);
      const a = await fx.registry.upload(tenantA, spec(), chunksOf(Buffer.from("shared")));
      const b = await fx.registry.upload(tenantB, spec(), chunksOf(Buffer.from("shared")));
      await fx.registry.delete(tenantA, a.asset.id, false);
      expect(storedBlobFiles(fx)).toHaveLength(1);
      expect(fs.readFileSync(b.asset.location, "utf8")).toBe("shared");
      await fx.registry.delete(tenantB, b.asset.id, false);
      expect(storedBlobFiles(fx)).toEqual([]);
    });

    it("never loses the blob of an upload racing the delete of the same content", async () => {
      fx = await openTestRegistry(dialect);
      const bytes = randomBytes(256 * 1024);
      let holder = (await fx.registry.upload(tenantA, spec(), chunksOf(bytes))).asset;
      for (let i = 0; i < 15; i++) {
        // The delete frees the blob (its last reference) while the upload dedupes onto it.
        const [, uploaded] = await Promise.all([
          fx.registry.delete(tenantA, holder.id, false),
          fx.registry.upload(tenantB, spec({ name: `n${i}` }), chunksOf(bytes, 32 * 1024)),
        ]);
        const asset = await fx.registry.get(tenantB, uploaded.asset.id);
        expect(asset.status).toBe("AVAILABLE");
        expect(fs.readFileSync(asset.location).equals(bytes), `iteration ${i}`).toBe(true);
        holder = { ...asset, tenantId: "globex" };
        // Next round: tenant B's asset is the one deleted while tenant A uploads.
        const [, next] = await Promise.all([
          fx.registry.delete(tenantB, asset.id, false),
          fx.registry.upload(tenantA, spec({ name: `m${i}` }), chunksOf(bytes, 32 * 1024)),
        ]);
        expect(fs.readFileSync((await fx.registry.get(tenantA, next.asset.id)).location).equals(bytes)).toBe(
          true,
        );
        holder = next.asset;
      }
      expect(storedBlobFiles(fx)).toHaveLength(1);
    });

    it("answers not_found for another tenant's asset on every call", async () => {
      fx = await openTestRegistry(dialect);
      const { asset } = await fx.registry.upload(tenantA, spec(), chunksOf(Buffer.from("mine")));
      const lease = await fx.registry.acquire(tenantA, asset.id, "vm:a", 0);
      const calls = [
        () => fx.registry.get(tenantB, asset.id),
        () => fx.registry.acquire(tenantB, asset.id, "vm:b", 0),
        () => fx.registry.delete(tenantB, asset.id, true),
        () => fx.registry.prepare(tenantB, [asset.id], "vm-b", "vm:b"),
      ];
      for (const call of calls) await expect(call()).rejects.toBeInstanceOf(AssetNotFoundError);
      // Another tenant cannot end the lease either; it simply is not theirs.
      expect(await fx.registry.release(tenantB, lease.leaseId)).toBe(false);
      expect((await fx.registry.list(tenantB, {})).totalCount).toBe(0);
      expect((await fx.registry.get(tenantA, asset.id)).referenceCount).toBe(1);
      const gc = await fx.registry.garbageCollect(tenantB, {
        dryRun: false,
        deleteUnreferenced: true,
        maxAgeMs: 1,
      });
      expect(gc.deleted).toEqual([]);
    });
  });

  describe("garbage collection", () => {
    it("releases an expired lease, then deletes the asset once past retention", async () => {
      const clock = manualClock();
      fx = await openTestRegistry(dialect, { clock: clock.now });
      const bytes = randomBytes(5000);
      const { asset } = await fx.registry.upload(tenantA, spec(), chunksOf(bytes));
      await fx.registry.acquire(tenantA, asset.id, "vm:a", 60);
      const gcOpts = { dryRun: false, deleteUnreferenced: true, maxAgeMs: 30_000 };

      clock.advance(59_000);
      expect(await fx.registry.garbageCollect(tenantA, gcOpts)).toEqual({
        deleted: [],
        bytesFreed: 0,
        leasesExpired: 0,
      });

      clock.advance(2_000); // the lease ran out a second ago
      expect((await fx.registry.get(tenantA, asset.id)).referenceCount).toBe(0);
      const first = await fx.registry.garbageCollect(tenantA, gcOpts);
      expect(first).toEqual({ deleted: [], bytesFreed: 0, leasesExpired: 1 });

      clock.advance(30_000); // retention counts from the lease's end
      const dry = await fx.registry.garbageCollect(tenantA, { ...gcOpts, dryRun: true });
      expect(dry.deleted.map((a) => a.id)).toEqual([asset.id]);
      expect(dry.bytesFreed).toBe(5000);
      expect(storedBlobFiles(fx)).toHaveLength(1);
      expect((await fx.registry.get(tenantA, asset.id)).status).toBe("AVAILABLE");

      const real = await fx.registry.garbageCollect(tenantA, gcOpts);
      expect(real.deleted.map((a) => a.id)).toEqual([asset.id]);
      expect(real.bytesFreed).toBe(5000);
      await expect(fx.registry.get(tenantA, asset.id)).rejects.toBeInstanceOf(AssetNotFoundError);
      expect(storedBlobFiles(fx)).toEqual([]);
    });

    it("only releases leases unless asked to delete, and keeps blobs other assets use", async () => {
      const clock = manualClock();
      fx = await openTestRegistry(dialect, { clock: clock.now });
      const a = await fx.registry.upload(tenantA, spec(), chunksOf(Buffer.from("shared")));
      await fx.registry.upload(tenantB, spec(), chunksOf(Buffer.from("shared")));
      clock.advance(3_600_000);
      expect(
        (await fx.registry.garbageCollect(tenantA, { dryRun: false, deleteUnreferenced: false, maxAgeMs: 1 }))
          .deleted,
      ).toEqual([]);
      const res = await fx.registry.garbageCollect(tenantA, {
        dryRun: false,
        deleteUnreferenced: true,
        maxAgeMs: 1000,
      });
      expect(res.deleted.map((d) => d.id)).toEqual([a.asset.id]);
      expect(res.bytesFreed).toBe(0);
      expect(storedBlobFiles(fx)).toHaveLength(1);
    });
  });

  describe("recovery", () => {
    it("removes uploads a crashed process left behind, and orphan blobs", async () => {
      const clock = manualClock();
      fx = await openTestRegistry(dialect, { clock: clock.now });
      const kept = await fx.registry.upload(tenantA, spec(), chunksOf(Buffer.from("kept")));
      // A crash mid-upload: an UPLOADING row and a partial ingest, never finished.
      const writer = await fx.blobs.ingest("asset-ast_crashed");
      await writer.write(Buffer.from("half of it"));
      await fx.store.insertAsset(
        {
          id: "ast_crashed",
          tenant_id: "acme",
          name: "x",
          type: "ROOTFS",
          status: "UPLOADING",
          digest: null,
          size_bytes: 0,
          created_by: "internal",
          build_id: "",
          source_image: "",
          image_config: null,
          created_at: clock.now(),
          last_accessed_at: clock.now(),
        },
        {},
      );
      // A blob file without a row (died between deleting a row and its file), and a row
      // nobody references (died between deleting the asset and its blob).
      const orphan = await fx.blobs.ingest("orphan");
      await orphan.write(Buffer.from("orphan bytes"));
      await orphan.commit();
      const unref = await fx.registry.upload(tenantA, spec(), chunksOf(Buffer.from("unreferenced")));
      await fx.store.deleteAsset(unref.asset.id);
      expect((await fx.registry.get(tenantA, "ast_crashed")).status).toBe("UPLOADING");

      // The process "restarts": a new registry over the same database and store. The ingest's
      // file handle of the dead process is simply abandoned.
      clock.advance(1000);
      await new Promise((r) => setTimeout(r, 20)); // ingest mtime strictly before the restart
      const restarted = fx.restart({ clock: () => Date.now() + 1000 });
      expect(await restarted.recover()).toEqual({ uploadsRemoved: 1 });
      await expect(restarted.get(tenantA, "ast_crashed")).rejects.toBeInstanceOf(AssetNotFoundError);
      expect(ingestLeftovers(fx)).toEqual([]);
      const swept = await restarted.sweep();
      expect(swept.blobsDeleted).toBe(2);
      expect(storedBlobFiles(fx)).toEqual([kept.asset.checksum.slice(7)]);
      expect(fs.readFileSync(kept.asset.location, "utf8")).toBe("kept");
      await writer.abort().catch(() => {});
    });
  });
});
