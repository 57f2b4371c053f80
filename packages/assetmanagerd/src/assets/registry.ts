import { createHash } from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import type { Readable } from "node:stream";
import {
  FailedPreconditionError,
  InvalidArgumentError,
  type LimitsResolver,
  type Logger,
  NotFoundError,
  newId,
  PermissionDeniedError,
  readFileChunks,
  type TenantContext,
} from "@kiln/kit";
import {
  AssetIdTakenError,
  AssetLeasedError,
  AssetNotAvailableError,
  AssetNotFoundError,
  LeaseIdTakenError,
  StorageQuotaError,
  UnsafePathError,
  UploadTooLargeError,
} from "../errors.js";
import {
  type BlobStore,
  type BlobWriter,
  isDigest,
  SizeMismatchError,
  verifyExpected,
} from "../store/blob-store.js";
import { isErrno } from "../store/local.js";
import { type CollectOptions, type Collector, createCollector, type GcCounters } from "./gc.js";
import type { Asset, AssetPage, AssetQuery, AssetSpec, Labels, Lease } from "./model.js";
import { placeFiles, resolveVmTarget, stableFileName } from "./prepare.js";
import type { AssetRow, AssetStore, LeaseRow } from "./store.js";

export interface RegistrySettings {
  /** PrepareAssets places under here. */
  vmRoot: string;
  /** RegisterAsset may import host files only from under these. */
  importDirs: readonly string[];
  maxUploadSize: number;
  /** TTL for leases acquired without one; 0 = none. */
  leaseDefaultTtlMs: number;
  /** GarbageCollect's default max age for unreferenced assets. */
  gcRetentionMs: number;
}

export interface RegistryDeps {
  store: AssetStore;
  blobs: BlobStore;
  settings: RegistrySettings;
  limits: LimitsResolver;
  log: Logger;
  /** Reads `s3://bucket/key` objects for RegisterAsset (the S3 backend only). */
  openExternal?: (url: string) => Promise<{ body: Readable; size: number }>;
  gcCounters?: GcCounters;
  clock?: () => number;
}

/** Who is calling: internal services may import host files, external callers may not. */
export type Caller = "internal" | "external" | "anonymous";

export interface UploadInput extends AssetSpec {
  /** Declared size; undefined = unknown. */
  sizeBytes?: number;
  /** Declared "sha256:…"; undefined = not checked. */
  checksum?: string;
}

export interface RegisterInput extends UploadInput {
  backend: "local" | "s3";
  /** An absolute host path, a "sha256:…" digest, or "s3://bucket/key". */
  location: string;
}

/** A build QueryAssets asks for: what to build, and how to start it (the caller's RPC client). */
export interface AutoBuild {
  dockerImage: string;
  timeoutSeconds: number;
  suggestedAssetId?: string;
  start(req: {
    dockerImage: string;
    timeoutSeconds: number;
    suggestedAssetId?: string;
    idempotencyKey: string;
    labels: Labels;
  }): Promise<{ buildId: string; status: string }>;
}

export interface TriggeredBuild {
  buildId: string;
  dockerImage: string;
  status: string;
}

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$/;
const LABEL_KEY = /^[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?$/;
const DEFAULT_PAGE = 100;
/** Concurrent QueryAssets calls for one image within this window share one build. */
const AUTO_BUILD_WINDOW_MS = 10 * 60_000;

/**
 * The asset registry: every RPC's behaviour, free of Connect. Tenant-scoped throughout — every
 * read and write names the tenant, and another tenant's asset is AssetNotFoundError.
 *
 * Writing an asset: an UPLOADING row reserves the id; the bytes stream into a blob ingest,
 * hashed on the way; once verified, one transaction takes the digest's blob row (inserting it
 * when new) and points the asset at it; then the blob is committed to the store and the asset
 * becomes AVAILABLE. A failure anywhere removes the row and the ingest; a crash leaves an
 * UPLOADING row and an ingest leftover, both removed at the next start (`recover`).
 */
export function createAssetRegistry(deps: RegistryDeps) {
  const { store, blobs, settings, log } = deps;
  const clock = deps.clock ?? Date.now;
  const startedAt = clock();
  const collector: Collector = createCollector({
    store,
    blobs,
    log,
    counters: deps.gcCounters,
    clock,
    startedAt,
  });

  // ---- reading ------------------------------------------------------------------------------

  async function hydrate(rows: AssetRow[]): Promise<Asset[]> {
    const ids = rows.map((r) => r.id);
    const [labels, leases] = await Promise.all([store.labelsOf(ids), store.activeLeaseCounts(ids, clock())]);
    return rows.map((r) => ({
      id: r.id,
      tenantId: r.tenant_id,
      name: r.name,
      type: r.type,
      status: r.status,
      backend: blobs.backend,
      location: r.digest ? blobs.location(r.digest) : "",
      sizeBytes: Number(r.size_bytes),
      checksum: r.digest ?? "",
      labels: labels.get(r.id) ?? {},
      createdBy: r.created_by,
      createdAt: new Date(Number(r.created_at)),
      lastAccessedAt: new Date(Number(r.last_accessed_at)),
      referenceCount: leases.get(r.id) ?? 0,
      buildId: r.build_id,
      sourceImage: r.source_image,
      imageConfig: r.image_config ? (JSON.parse(r.image_config) as Asset["imageConfig"]) : undefined,
    }));
  }

  async function get(tenant: TenantContext, id: string): Promise<Asset> {
    const row = await store.getAsset(tenant.tenantId, id);
    if (!row) throw new AssetNotFoundError(id, tenant.tenantId);
    return (await hydrate([row]))[0]!;
  }

  async function list(tenant: TenantContext, q: AssetQuery): Promise<AssetPage> {
    checkLabels(q.labels ?? {}, "label_selector");
    const filter = {
      tenantId: tenant.tenantId,
      status: q.status ?? "AVAILABLE",
      type: q.type,
      labels: q.labels,
    };
    const limit = q.pageSize && q.pageSize > 0 ? Math.min(q.pageSize, 1000) : DEFAULT_PAGE;
    const after = q.pageToken ? decodePageToken(q.pageToken) : undefined;
    const [rows, totalCount] = await Promise.all([
      store.listAssets(filter, { limit: limit + 1, after }),
      store.countAssets(filter),
    ]);
    const page = rows.slice(0, limit);
    const last = page[page.length - 1];
    return {
      assets: await hydrate(page),
      nextPageToken: rows.length > limit && last ? encodePageToken(Number(last.created_at), last.id) : "",
      totalCount,
    };
  }

  async function query(
    tenant: TenantContext,
    q: AssetQuery,
    build?: AutoBuild,
  ): Promise<AssetPage & { triggeredBuilds: TriggeredBuild[] }> {
    const page = await list(tenant, q);
    const triggeredBuilds: TriggeredBuild[] = [];
    if (build) {
      const image = build.dockerImage.trim();
      if (image === "") {
        throw new InvalidArgumentError(
          "build_options.docker_image is required when enable_auto_build is set",
          {
            field: "build_options.docker_image",
          },
        );
      }
      checkLabels({ docker_image: image }, "build_options");
      if (!(await store.hasRootfsFor(tenant.tenantId, image))) {
        const window = Math.floor(clock() / AUTO_BUILD_WINDOW_MS);
        const started = await build.start({
          dockerImage: image,
          timeoutSeconds: build.timeoutSeconds,
          suggestedAssetId: build.suggestedAssetId,
          // Callers polling for the same missing image get the same build (builderd dedupes
          // by key per tenant), yet a failed build can be retried in the next window.
          idempotencyKey: `auto-build:${sha256Hex(image).slice(0, 32)}:${window}`,
          labels: { docker_image: image },
        });
        log.info(
          { tenant_id: tenant.tenantId, build_id: started.buildId, docker_image: image },
          "rootfs missing: build started",
        );
        triggeredBuilds.push({ buildId: started.buildId, dockerImage: image, status: started.status });
      }
    }
    return { ...page, triggeredBuilds };
  }

  // ---- writing ------------------------------------------------------------------------------

  /** Validates a new asset and reserves its id with an UPLOADING row. */
  async function reserve(tenant: TenantContext, spec: UploadInput): Promise<AssetRow> {
    if (!NAME.test(spec.name)) {
      throw new InvalidArgumentError(
        `name ${JSON.stringify(spec.name)}: use letters, digits, '.', '_' and '-' (no '/'), starting with a letter or digit`,
        { field: "name" },
      );
    }
    checkLabels(spec.labels ?? {}, "labels");
    if (spec.sourceImage && /[\0\n]/.test(spec.sourceImage)) {
      throw new InvalidArgumentError("source_image must not contain NUL or newlines", {
        field: "source_image",
      });
    }
    if (spec.checksum && !isDigest(spec.checksum)) {
      throw new InvalidArgumentError(`checksum ${JSON.stringify(spec.checksum)}: expected sha256:<64 hex>`, {
        field: "checksum",
      });
    }
    await checkSize(tenant, spec.sizeBytes ?? 0);
    const now = clock();
    const row: AssetRow = {
      id: spec.id || newId("ast"),
      tenant_id: tenant.tenantId,
      name: spec.name,
      type: spec.type,
      status: "UPLOADING",
      digest: null,
      size_bytes: spec.sizeBytes ?? 0,
      created_by: spec.createdBy,
      build_id: spec.buildId ?? "",
      source_image: spec.sourceImage ?? "",
      image_config: spec.imageConfig ? JSON.stringify(spec.imageConfig) : null,
      created_at: now,
      last_accessed_at: now,
    };
    try {
      await store.transaction(async (tx) => {
        if (await tx.assetIdTaken(row.id)) throw new AssetIdTakenError(row.id);
        await tx.insertAsset(row, spec.labels ?? {});
      });
    } catch (err) {
      if (isUniqueViolation(err)) throw new AssetIdTakenError(row.id);
      throw err;
    }
    return row;
  }

  /**
   * Bytes this tenant may still add: the upload limit, or what is left of its storage quota.
   * `own` is what the asset being written already counts for (its declared size).
   */
  async function checkSize(tenant: TenantContext, declared: number, own = 0): Promise<number> {
    if (declared > settings.maxUploadSize)
      throw new UploadTooLargeError(settings.maxUploadSize, `declared size ${declared}`);
    const quota = (await deps.limits(tenant)).maxStorageBytes;
    if (quota <= 0) return settings.maxUploadSize;
    const used = (await store.tenantUsage(tenant.tenantId)) - own;
    if (used + declared > quota) throw new StorageQuotaError(tenant.tenantId, quota, used);
    return Math.min(settings.maxUploadSize, quota - used);
  }

  /**
   * Streams `chunks` into a writer, refusing content beyond `limit` bytes or, when a size was
   * declared, beyond it (without reading the rest).
   */
  async function fill(
    writer: BlobWriter,
    chunks: AsyncIterable<Uint8Array>,
    limit: number,
    tenant: TenantContext,
    declared?: number,
  ): Promise<void> {
    for await (const chunk of chunks) {
      if (declared && writer.size + chunk.byteLength > declared) {
        throw new SizeMismatchError(declared, writer.size + chunk.byteLength);
      }
      if (writer.size + chunk.byteLength > limit) {
        if (limit < settings.maxUploadSize) {
          const quota = (await deps.limits(tenant)).maxStorageBytes;
          throw new StorageQuotaError(tenant.tenantId, quota, await store.tenantUsage(tenant.tenantId));
        }
        throw new UploadTooLargeError(settings.maxUploadSize, "upload");
      }
      if (chunk.byteLength > 0) await writer.write(chunk);
    }
  }

  /**
   * Ingests content for a reserved asset and makes it AVAILABLE. On failure nothing is kept:
   * the ingest is aborted, the row removed, and a blob this attempt created but nobody else
   * references is deleted.
   */
  async function ingestInto(
    tenant: TenantContext,
    row: AssetRow,
    expected: { size?: number; checksum?: string },
    content: (writer: BlobWriter, limit: number) => Promise<void>,
    adopt?: (ref: string) => Promise<BlobWriter | undefined>,
  ): Promise<{ asset: Asset; deduplicated: boolean }> {
    let writer: BlobWriter | undefined;
    let digest: string | undefined;
    const started = performance.now();
    try {
      const limit = await checkSize(tenant, 0, Number(row.size_bytes));
      writer = (await adopt?.(`asset-${row.id}`)) ?? (await blobs.ingest(`asset-${row.id}`));
      await content(writer, limit);
      const streamed = performance.now();
      const actual = { digest: writer.digest(), size: writer.size };
      verifyExpected(actual, { size: expected.size, digest: expected.checksum });
      digest = actual.digest;
      const sealed = actual.digest;
      const deduplicated = await store.transaction(async (tx) => {
        let existed = (await tx.lockBlob(sealed)) !== undefined;
        if (!existed) {
          const inserted = await tx.insertBlob({
            digest: sealed,
            size_bytes: actual.size,
            backend: blobs.backend,
            location: blobs.location(sealed),
            created_at: clock(),
          });
          // Lost a race with another writer of the same bytes: take its row.
          if (!inserted) existed = (await tx.lockBlob(sealed)) !== undefined;
        }
        const n = await tx.updateAsset(row.id, { digest: sealed, size_bytes: actual.size });
        if (n === 0) throw new AssetNotFoundError(row.id, tenant.tenantId);
        return existed;
      });
      await writer.commit({ digest: sealed, size: actual.size });
      writer = undefined;
      if ((await store.finishUpload(row.id, "AVAILABLE")) === 0) {
        throw new AssetNotFoundError(row.id, tenant.tenantId); // deleted while uploading
      }
      log.info(
        {
          tenant_id: tenant.tenantId,
          asset_id: row.id,
          digest: sealed,
          bytes: actual.size,
          deduplicated,
          // Where the time went: receiving + hashing + writing, then fsync + publish.
          stream_ms: Math.round(streamed - started),
          commit_ms: Math.round(performance.now() - streamed),
        },
        "asset stored",
      );
      return { asset: await get(tenant, row.id), deduplicated };
    } catch (err) {
      await writer?.abort().catch(() => {});
      await store
        .transaction(async (tx) => {
          const current = await tx.lockAsset(tenant.tenantId, row.id);
          if (current?.status === "UPLOADING") await tx.deleteAsset(row.id);
        })
        .catch((e: unknown) =>
          log.error({ err: e, asset_id: row.id }, "could not remove a failed upload's row"),
        );
      if (digest) {
        await collector
          .deleteBlobIfUnreferenced(digest)
          .catch((e: unknown) => log.error({ err: e, digest }, "could not remove a failed upload's blob"));
      }
      throw err;
    }
  }

  async function upload(
    tenant: TenantContext,
    input: UploadInput,
    chunks: AsyncIterable<Uint8Array>,
  ): Promise<{ asset: Asset; deduplicated: boolean }> {
    const row = await reserve(tenant, input);
    return ingestInto(tenant, row, { size: input.sizeBytes, checksum: input.checksum }, (w, limit) =>
      fill(w, chunks, limit, tenant, input.sizeBytes),
    );
  }

  async function register(tenant: TenantContext, input: RegisterInput, caller: Caller): Promise<Asset> {
    const location = input.location.trim();
    if (isDigest(location)) return registerDigest(tenant, input, location);
    if (location.startsWith("s3://")) {
      if (caller !== "internal")
        throw new PermissionDeniedError("s3:// locations are accepted only from internal callers");
      if (input.backend !== "s3" || !deps.openExternal) {
        throw new FailedPreconditionError(
          "s3:// locations need backend STORAGE_BACKEND_S3 and assetmanagerd running with UNKEY_ASSETMANAGERD_STORAGE_BACKEND=s3",
        );
      }
      const object = await deps.openExternal(location);
      let row: AssetRow;
      try {
        if (input.sizeBytes && input.sizeBytes !== object.size) {
          throw new InvalidArgumentError(
            `size_bytes ${input.sizeBytes} does not match ${location} (${object.size} bytes)`,
            {
              field: "size_bytes",
            },
          );
        }
        row = await reserve(tenant, { ...input, sizeBytes: input.sizeBytes || object.size });
      } catch (err) {
        object.body.destroy();
        throw err;
      }
      return (
        await ingestInto(tenant, row, { size: object.size, checksum: input.checksum }, (w, limit) =>
          fill(w, object.body, limit, tenant),
        )
      ).asset;
    }
    if (location.startsWith("/")) {
      if (caller !== "internal") {
        throw new PermissionDeniedError(
          "file locations are accepted only from internal callers; upload the file instead",
        );
      }
      const file = await importableFile(location);
      const size = (await fsp.stat(file)).size;
      if (input.sizeBytes && input.sizeBytes !== size) {
        throw new InvalidArgumentError(
          `size_bytes ${input.sizeBytes} does not match ${location} (${size} bytes)`,
          {
            field: "size_bytes",
          },
        );
      }
      const row = await reserve(tenant, { ...input, sizeBytes: size });
      // On the store's filesystem the file is taken by hard link and only read to hash it
      // (builderd's rootfs images: no second copy of hundreds of MB). Hashing is done with a
      // chunk when it asks for the next, so two reused buffers do (a 156 MiB image: ~25 ms less
      // than a buffer per chunk); a copy into another store keeps its own stream.
      let adopted = false;
      const chunks = 4 * 1024 * 1024;
      return (
        await ingestInto(
          tenant,
          row,
          { size, checksum: input.checksum },
          (w, limit) =>
            fill(
              w,
              adopted ? readFileChunks(file, chunks) : fs.createReadStream(file, { highWaterMark: chunks }),
              limit,
              tenant,
            ),
          blobs.adopt
            ? async (ref) => {
                const writer = await blobs.adopt!(ref, file);
                adopted = writer !== undefined;
                return writer;
              }
            : undefined,
        )
      ).asset;
    }
    throw new InvalidArgumentError(
      `location ${JSON.stringify(location)}: expected an absolute file path, a sha256:… digest or s3://bucket/key`,
      { field: "location" },
    );
  }

  /**
   * A second asset on content the tenant already stores. Only the tenant's own blobs qualify:
   * knowing a digest is not proof of having the bytes, and the answer must not reveal whether
   * another tenant stores them.
   */
  async function registerDigest(tenant: TenantContext, input: RegisterInput, digest: string): Promise<Asset> {
    if (input.checksum && input.checksum !== digest) {
      throw new InvalidArgumentError(`checksum ${input.checksum} does not match location ${digest}`, {
        field: "checksum",
      });
    }
    const notStored = () =>
      new NotFoundError(`no content ${digest} stored for this tenant: upload it instead`);
    const [known] = await store.blobsByDigest([digest]);
    if (!known || !(await store.tenantHasDigest(tenant.tenantId, digest))) throw notStored();
    const size = Number(known.size_bytes);
    if (input.sizeBytes && input.sizeBytes !== size) {
      throw new InvalidArgumentError(
        `size_bytes ${input.sizeBytes} does not match ${digest} (${size} bytes)`,
        {
          field: "size_bytes",
        },
      );
    }
    const row = await reserve(tenant, { ...input, sizeBytes: size });
    try {
      await store.transaction(async (tx) => {
        // Under the blob's row lock the tenant's reference is re-checked: a concurrent delete
        // of its last asset on this digest may have freed the blob.
        const blob = await tx.lockBlob(digest);
        if (!blob || !(await tx.tenantHasDigest(tenant.tenantId, digest))) throw notStored();
        await tx.updateAsset(row.id, { digest, size_bytes: size, status: "AVAILABLE" });
      });
    } catch (err) {
      await store.transaction(async (tx) => {
        const current = await tx.lockAsset(tenant.tenantId, row.id);
        if (current?.status === "UPLOADING") await tx.deleteAsset(row.id);
      });
      throw err;
    }
    log.info({ tenant_id: tenant.tenantId, asset_id: row.id, digest }, "asset registered on stored content");
    return get(tenant, row.id);
  }

  /** The real path of an importable host file, or why not. */
  async function importableFile(location: string): Promise<string> {
    if (location.split("/").some((s) => s === "..")) {
      throw new UnsafePathError("location", location, "must not contain '..'");
    }
    let real: string;
    try {
      real = await fsp.realpath(location);
    } catch (err) {
      if (isErrno(err, "ENOENT", "ENOTDIR")) throw new NotFoundError(`file ${location} not found`);
      throw err;
    }
    const dirs = await Promise.all(
      settings.importDirs.map((d) => fsp.realpath(d).catch(() => path.resolve(d))),
    );
    if (!dirs.some((d) => real.startsWith(d.endsWith("/") ? d : `${d}/`))) {
      throw new UnsafePathError(
        "location",
        location,
        `is outside the directories assets may be imported from (${settings.importDirs.join(", ") || "none"}; UNKEY_ASSETMANAGERD_IMPORT_DIRS)`,
      );
    }
    const st = await fsp.stat(real);
    if (!st.isFile())
      throw new InvalidArgumentError(`location ${location} is not a regular file`, { field: "location" });
    return real;
  }

  // ---- leases -------------------------------------------------------------------------------

  /**
   * Takes a lease. With `leaseId` (chosen by the caller) it is idempotent: the same id, asset and
   * holder again returns the lease as it is, so a caller can record the id first and a crash or a
   * retry never leaves a lease nobody knows about.
   */
  async function acquire(
    tenant: TenantContext,
    assetId: string,
    holder: string,
    ttlSeconds: number,
    leaseId?: string,
  ): Promise<Lease> {
    if (holder.trim() === "" || holder.length > 256) {
      throw new InvalidArgumentError("holder: 1-256 characters naming who holds the lease, e.g. vm:<vm_id>", {
        field: "holder",
      });
    }
    const ttlMs = ttlSeconds > 0 ? ttlSeconds * 1000 : settings.leaseDefaultTtlMs;
    const now = clock();
    const lease: LeaseRow = {
      lease_id: leaseId || newId("lse"),
      asset_id: assetId,
      tenant_id: tenant.tenantId,
      holder,
      acquired_at: now,
      expires_at: ttlMs > 0 ? now + ttlMs : null,
    };
    let existing: LeaseRow | undefined;
    try {
      existing = await store.transaction(async (tx) => {
        // The asset row lock orders this against DeleteAsset and GC: a lease is never added to
        // an asset being deleted, and a delete sees every lease committed before it.
        const row = await tx.lockAsset(tenant.tenantId, assetId);
        if (!row) throw new AssetNotFoundError(assetId, tenant.tenantId);
        if (row.status !== "AVAILABLE") throw new AssetNotAvailableError(assetId, row.status);
        const same = leaseId ? await tx.getLease(tenant.tenantId, leaseId) : undefined;
        if (same) {
          if (same.asset_id !== assetId || same.holder !== holder) throw new LeaseIdTakenError(same.lease_id);
          return same;
        }
        await tx.insertLease(lease);
        await tx.touchAssets([assetId], now);
        return undefined;
      });
    } catch (err) {
      // Another tenant's lease has that id (getLease only sees this tenant's).
      if (leaseId && isUniqueViolation(err)) throw new LeaseIdTakenError(leaseId);
      throw err;
    }
    if (existing) return toLease(existing);
    log.info(
      { tenant_id: tenant.tenantId, asset_id: assetId, lease_id: lease.lease_id, holder },
      "lease acquired",
    );
    return toLease(lease);
  }

  /** Ends a lease; false when it was already released or had expired. */
  async function release(tenant: TenantContext, leaseId: string): Promise<boolean> {
    const now = clock();
    return store.transaction(async (tx) => {
      const lease = await tx.getLease(tenant.tenantId, leaseId);
      if (!lease) return false;
      await tx.deleteLease(leaseId);
      const expired = lease.expires_at !== null && lease.expires_at <= now;
      await tx.touchAssets([lease.asset_id], expired ? lease.expires_at! : now);
      return !expired;
    });
  }

  // ---- deleting -----------------------------------------------------------------------------

  async function remove(tenant: TenantContext, id: string, force: boolean): Promise<boolean> {
    const now = clock();
    const digest = await store.transaction(async (tx) => {
      const row = await tx.lockAsset(tenant.tenantId, id);
      if (!row) throw new AssetNotFoundError(id, tenant.tenantId);
      const leases = await tx.activeLeases(id, now);
      if (leases.length > 0 && !force)
        throw new AssetLeasedError(
          id,
          leases.map((l) => l.holder),
        );
      await tx.deleteAsset(id);
      if (leases.length > 0) {
        log.warn(
          { tenant_id: tenant.tenantId, asset_id: id, leases: leases.length },
          "asset force-deleted: leases ended",
        );
      }
      return row.digest;
    });
    if (digest) await collector.deleteBlobIfUnreferenced(digest);
    log.info({ tenant_id: tenant.tenantId, asset_id: id }, "asset deleted");
    return true;
  }

  async function garbageCollect(
    tenant: TenantContext,
    opts: Omit<CollectOptions, "maxAgeMs"> & { maxAgeMs?: number },
  ): Promise<{ deleted: Asset[]; bytesFreed: number; leasesExpired: number }> {
    const maxAgeMs = opts.maxAgeMs && opts.maxAgeMs > 0 ? opts.maxAgeMs : settings.gcRetentionMs;
    // Describe candidates before they are gone (labels go with the rows).
    const preview = await collector.collect(tenant.tenantId, { ...opts, dryRun: true, maxAgeMs });
    const described = new Map((await hydrate(preview.deleted)).map((a) => [a.id, a]));
    if (opts.dryRun)
      return {
        deleted: [...described.values()],
        bytesFreed: preview.bytesFreed,
        leasesExpired: preview.leasesExpired,
      };
    const res = await collector.collect(tenant.tenantId, { ...opts, dryRun: false, maxAgeMs });
    const deleted = await Promise.all(
      res.deleted.map(async (r) => described.get(r.id) ?? (await hydrate([r]))[0]!),
    );
    return { deleted, bytesFreed: res.bytesFreed, leasesExpired: res.leasesExpired };
  }

  // ---- placing ------------------------------------------------------------------------------

  async function prepare(
    tenant: TenantContext,
    assetIds: readonly string[],
    targetPath: string,
    preparedFor: string,
  ): Promise<Record<string, string>> {
    const ids = [...new Set(assetIds)];
    if (ids.length === 0)
      throw new InvalidArgumentError("asset_ids: name at least one asset", { field: "asset_ids" });
    const rows = await store.getAssets(tenant.tenantId, ids);
    const byId = new Map(rows.map((r) => [r.id, r]));
    for (const id of ids) {
      const row = byId.get(id);
      if (!row) throw new AssetNotFoundError(id, tenant.tenantId);
      if (row.status !== "AVAILABLE" || !row.digest) throw new AssetNotAvailableError(id, row.status);
    }
    const dir = await resolveVmTarget(settings.vmRoot, targetPath);
    const placed = await placeFiles(
      dir,
      ids.map((id) => {
        const row = byId.get(id)!;
        const digest = row.digest!;
        return {
          assetId: id,
          fileName: stableFileName(row.type, row.name),
          digest,
          localPath: blobs.localPath(digest),
          open: () => blobs.openRead(digest),
        };
      }),
      async (placed) => {
        const now = clock();
        await store.transaction(async (tx) => {
          await tx.touchAssets(ids, now);
          await tx.insertPlacements(
            placed.map((p) => ({
              id: newId("plc"),
              tenant_id: tenant.tenantId,
              asset_id: p.assetId,
              path: p.path,
              prepared_for: preparedFor,
              method: p.method,
              created_at: now,
            })),
          );
        });
      },
    );
    log.info(
      {
        tenant_id: tenant.tenantId,
        target: dir,
        prepared_for: preparedFor,
        methods: placed.map((p) => p.method),
      },
      "assets prepared",
    );
    return Object.fromEntries(placed.map((p) => [p.assetId, p.path]));
  }

  // ---- lifecycle ----------------------------------------------------------------------------

  /**
   * Start-up recovery: uploads an earlier process left UPLOADING (it died mid-stream) are
   * removed with their ingest leftovers, then unreferenced blobs are collected. Nothing a
   * crashed upload wrote stays visible. (Assumes this process is the only assetmanagerd using
   * its database and store.)
   */
  async function recover(): Promise<{ uploadsRemoved: number }> {
    const stale = await store.staleUploads(startedAt);
    for (const row of stale) {
      await store.transaction(async (tx) => {
        const current = await tx.lockAsset(row.tenant_id, row.id);
        if (current?.status === "UPLOADING") await tx.deleteAsset(row.id);
      });
    }
    if (stale.length > 0) log.warn({ assets: stale.map((r) => r.id) }, "interrupted uploads removed");
    const removed = await blobs.cleanup({ olderThan: new Date(startedAt) });
    if (removed > 0) log.info({ ingests: removed }, "upload leftovers removed");
    return { uploadsRemoved: stale.length };
  }

  return {
    get,
    list,
    query,
    upload,
    register,
    acquire,
    release,
    delete: remove,
    garbageCollect,
    prepare,
    recover,
    sweep: collector.sweep,
  };
}

export type AssetRegistry = ReturnType<typeof createAssetRegistry>;

function toLease(row: LeaseRow): Lease {
  return {
    leaseId: row.lease_id,
    assetId: row.asset_id,
    holder: row.holder,
    acquiredAt: new Date(Number(row.acquired_at)),
    expiresAt: row.expires_at === null ? undefined : new Date(Number(row.expires_at)),
  };
}

/** Labels end up in logs, queries and (as docker_image) build requests: no path tricks in them. */
function checkLabels(labels: Labels, field: string): void {
  const entries = Object.entries(labels);
  if (entries.length > 64) throw new InvalidArgumentError(`${field}: at most 64 labels`, { field });
  for (const [key, value] of entries) {
    if (!LABEL_KEY.test(key)) {
      throw new InvalidArgumentError(
        `${field}: key ${JSON.stringify(key)} is not a label key (1-63 of [a-z0-9._/-])`,
        {
          field: `${field}[${key}]`,
        },
      );
    }
    for (const [what, v] of [
      ["key", key],
      ["value", value],
    ] as const) {
      if (v.length > 256 || hasControlCharacters(v)) {
        throw new InvalidArgumentError(`${field}[${key}]: ${what} too long or has control characters`, {
          field: `${field}[${key}]`,
        });
      }
      if (v.startsWith("/") || v.split("/").some((s) => s === "..")) {
        throw new UnsafePathError(
          `${field}[${key}]`,
          v,
          `${what} must not be an absolute path or contain '..'`,
        );
      }
    }
  }
}

function encodePageToken(createdAt: number, id: string): string {
  return Buffer.from(JSON.stringify([createdAt, id])).toString("base64url");
}

function decodePageToken(token: string): { createdAt: number; id: string } {
  try {
    const [createdAt, id] = JSON.parse(Buffer.from(token, "base64url").toString("utf8")) as [
      unknown,
      unknown,
    ];
    if (typeof createdAt === "number" && typeof id === "string") return { createdAt, id };
  } catch {
    // fall through
  }
  throw new InvalidArgumentError(
    "page_token is not a token this service issued: pass next_page_token as is",
    {
      field: "page_token",
    },
  );
}

function sha256Hex(s: string): string {
  return createHash("sha256").update(s).digest("hex");
}

function isUniqueViolation(err: unknown): boolean {
  const e = err as { code?: string; message?: string };
  return (
    e?.code === "23505" ||
    e?.code === "SQLITE_CONSTRAINT_PRIMARYKEY" ||
    e?.code === "SQLITE_CONSTRAINT_UNIQUE"
  );
}

function hasControlCharacters(s: string): boolean {
  for (let i = 0; i < s.length; i++) if (s.charCodeAt(i) < 0x20) return true;
  return false;
}
