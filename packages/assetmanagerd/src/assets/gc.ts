import type { Logger } from "@kiln/kit";
import type { BlobManager, BlobReader } from "../store/blob-store.js";
import type { AssetRow, AssetStore, LeaseRow } from "./store.js";

export interface CollectOptions {
  /** Report what would go without changing anything. */
  dryRun: boolean;
  /** Also delete assets without active leases not accessed for maxAgeMs. */
  deleteUnreferenced: boolean;
  maxAgeMs: number;
}

export interface CollectResult {
  /** Assets deleted (or, in a dry run, that would be), as they were before deletion. */
  deleted: AssetRow[];
  /** Bytes of blobs freed by deleting those assets (or that would be). */
  bytesFreed: number;
  leasesExpired: number;
}

export interface SweepResult {
  leasesExpired: number;
  blobsDeleted: number;
  bytesFreed: number;
  ingestsRemoved: number;
}

export interface GcCounters {
  deleted(kind: "asset" | "blob" | "lease", n: number): void;
}

/**
 * Garbage collection: leases past their expiry are released, assets nobody leases and nobody
 * used for the retention period are deleted (on request: they are tenant data), and blobs no
 * asset references are deleted — a blob only ever under its row lock with no reference present
 * (see AssetStore), so a concurrent upload of the same bytes never loses its blob.
 */
export function createCollector(deps: {
  store: AssetStore;
  blobs: BlobReader & BlobManager;
  log: Logger;
  counters?: GcCounters;
  clock: () => number;
  /** Ingest leftovers older than this are removed (this process's start). */
  startedAt: number;
}) {
  const { store, blobs, log } = deps;
  const count = (kind: "asset" | "blob" | "lease", n: number) => {
    if (n > 0) deps.counters?.deleted(kind, n);
  };

  /** Deletes the blob if no asset references it: the bytes freed, undefined when kept or absent. */
  async function deleteBlobIfUnreferenced(digest: string): Promise<number | undefined> {
    const freed = await store.transaction(async (tx) => {
      const blob = await tx.lockBlob(digest);
      if (!blob || (await tx.blobReferenced(digest))) return undefined;
      await tx.deleteBlobRow(digest);
      // Inside the transaction, holding the row: a writer of the same digest waits for us and
      // then writes the blob anew instead of finding a file about to vanish.
      await blobs.delete(digest);
      return blob.size_bytes;
    });
    if (freed !== undefined) {
      count("blob", 1);
      log.info({ digest, bytes: freed }, "blob deleted: no asset references it");
    }
    return freed;
  }

  /** Releases expired leases (of one tenant, or all); returns them. */
  async function expireLeases(tenantId: string | undefined, dryRun: boolean): Promise<LeaseRow[]> {
    const now = deps.clock();
    const expired = await store.expiredLeases(tenantId, now);
    if (dryRun || expired.length === 0) return expired;
    await store.transaction(async (tx) => {
      for (const lease of expired) {
        await tx.deleteLease(lease.lease_id);
        // The asset was in use until the lease ran out: retention counts from then.
        await tx.touchAssets([lease.asset_id], lease.expires_at ?? now);
      }
    });
    count("lease", expired.length);
    log.info({ leases: expired.length, tenant_id: tenantId }, "expired leases released");
    return expired;
  }

  /** The tenant-scoped GarbageCollect. `describe` runs on candidates before they are deleted. */
  async function collect(tenantId: string, opts: CollectOptions): Promise<CollectResult> {
    const expired = await expireLeases(tenantId, opts.dryRun);
    if (!opts.deleteUnreferenced) return { deleted: [], bytesFreed: 0, leasesExpired: expired.length };
    const now = deps.clock();
    const cutoff = now - opts.maxAgeMs;
    const candidates = await store.unreferencedAssets(tenantId, cutoff);
    if (opts.dryRun) {
      const digests = await store.digestsOnlyReferencedBy(candidates.map((c) => c.id));
      const blobsFreed = await store.blobsByDigest(digests);
      return {
        deleted: candidates,
        bytesFreed: blobsFreed.reduce((n, b) => n + b.size_bytes, 0),
        leasesExpired: expired.length,
      };
    }
    const deleted: AssetRow[] = [];
    for (const c of candidates) {
      const gone = await store.transaction(async (tx) => {
        // Re-check under the row lock: a lease or a use may have arrived since the scan.
        const row = await tx.lockAsset(tenantId, c.id);
        if (!row || row.last_accessed_at >= cutoff || row.status === "UPLOADING") return false;
        if ((await tx.activeLeases(c.id, deps.clock())).length > 0) return false;
        await tx.deleteAsset(c.id);
        return true;
      });
      if (gone) deleted.push(c);
    }
    count("asset", deleted.length);
    let bytesFreed = 0;
    for (const digest of new Set(deleted.map((d) => d.digest).filter((d): d is string => d !== null))) {
      bytesFreed += (await deleteBlobIfUnreferenced(digest)) ?? 0;
    }
    if (deleted.length > 0) {
      log.info(
        { tenant_id: tenantId, assets: deleted.length, bytes_freed: bytesFreed },
        "unreferenced assets deleted",
      );
    }
    return { deleted, bytesFreed, leasesExpired: expired.length };
  }

  /**
   * Housekeeping for all tenants (start-up and the background timer): expired leases, blobs no
   * asset references (rows and files without rows), ingest leftovers of earlier processes.
   */
  async function sweep(): Promise<SweepResult> {
    const leases = await expireLeases(undefined, false);
    let blobsDeleted = 0;
    let bytesFreed = 0;
    for (const blob of await store.unreferencedBlobs()) {
      const freed = await deleteBlobIfUnreferenced(blob.digest);
      if (freed === undefined) continue;
      blobsDeleted++;
      bytesFreed += freed;
    }
    // Files without a row: left when a process died between deleting a row and its file.
    let batch: Array<{ digest: string; size: number; location: string }> = [];
    const flush = async () => {
      const known = new Set((await store.blobsByDigest(batch.map((b) => b.digest))).map((b) => b.digest));
      for (const b of batch) {
        if (known.has(b.digest)) continue;
        const removed = await store.transaction(async (tx) => {
          // Claim the digest with a placeholder row so a concurrent writer of it waits for us.
          const claimed = await tx.insertBlob({
            digest: b.digest,
            size_bytes: b.size,
            backend: blobs.backend,
            location: b.location,
            created_at: deps.clock(),
          });
          if (!claimed) return false;
          await blobs.delete(b.digest);
          await tx.deleteBlobRow(b.digest);
          return true;
        });
        if (removed) {
          blobsDeleted++;
          bytesFreed += b.size;
          count("blob", 1);
          log.warn({ digest: b.digest, bytes: b.size }, "orphan blob file deleted (no database row)");
        }
      }
      batch = [];
    };
    for await (const b of blobs.list()) {
      batch.push(b);
      if (batch.length >= 500) await flush();
    }
    if (batch.length > 0) await flush();
    const ingestsRemoved = await blobs.cleanup({ olderThan: new Date(deps.startedAt) });
    if (ingestsRemoved > 0) log.info({ ingests: ingestsRemoved }, "upload leftovers removed");
    return { leasesExpired: leases.length, blobsDeleted, bytesFreed, ingestsRemoved };
  }

  return { deleteBlobIfUnreferenced, expireLeases, collect, sweep };
}

export type Collector = ReturnType<typeof createCollector>;
