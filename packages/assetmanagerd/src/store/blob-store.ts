import type { Readable } from "node:stream";
import { AlreadyExistsError, InvalidArgumentError, NotFoundError } from "@kiln/kit";

/**
 * Content-addressed blob storage, split like containerd's content store so each caller takes
 * only the part it needs.
 *
 * Terms:
 * - A **blob** is immutable content named by its digest, `sha256:<64 hex>`. Once committed it is
 *   complete and never changes; a digest names the same bytes in every tenant.
 * - An **ingest** is a blob being written, named by a caller-chosen **ref** (unique per writer).
 *   Bytes are hashed as they stream in; nothing of an ingest is visible under its digest until
 *   `commit`, which verifies the expected digest and size, makes the bytes durable and then
 *   publishes them under the digest in one atomic step. A crash leaves at most an ingest
 *   leftover, which `cleanup` removes; never a partial blob.
 * - Committing content that is already stored keeps the existing blob (`created: false`).
 *
 * Importing a file: `const w = await store.ingest(ref)`, `await w.write(chunk)` for each chunk,
 * `await w.commit({ digest: "sha256:…" })`. On any error call `w.abort()`.
 *
 * The store knows nothing of tenants or assets: which blobs are referenced, and so which may be
 * deleted, is the registry's business (assets/store.ts keeps that in the database).
 */
export interface BlobInfo {
  readonly digest: string;
  readonly size: number;
  /** Where it lives: a file path (local) or `s3://bucket/key`. */
  readonly location: string;
  /** When it was written, when the backend knows. */
  readonly modifiedAt?: Date;
}

export type StorageBackendName = "local" | "s3";

/** Reads committed blobs. */
export interface BlobReader {
  readonly backend: StorageBackendName;
  /** The blob's size and location, or undefined when it is not stored. */
  stat(digest: string): Promise<BlobInfo | undefined>;
  /** The blob's bytes. Throws BlobNotFoundError when it is not stored. */
  openRead(digest: string): Promise<Readable>;
  /** A path on this host holding the blob, when the backend keeps blobs as local files. */
  localPath(digest: string): string | undefined;
  /** Where the blob lives or would live (`Asset.location`). */
  location(digest: string): string;
}

/** What `commit` found out. */
export interface CommitResult {
  readonly digest: string;
  readonly size: number;
  /** False when the content was already stored (this ingest was discarded). */
  readonly created: boolean;
}

/** One ingest in progress. Not safe for concurrent `write` calls: await each. */
export interface BlobWriter {
  readonly ref: string;
  /** Bytes written so far. */
  readonly size: number;
  /**
   * Appends bytes, hashing them. Writes may still be in flight when this resolves: the caller
   * must not modify `chunk` afterwards. Write errors surface here or at commit.
   */
  write(chunk: Uint8Array): Promise<void>;
  /** `sha256:…` of the bytes written so far. */
  digest(): string;
  /**
   * Verifies the bytes against `expected` (a mismatch throws DigestMismatchError or
   * SizeMismatchError and keeps nothing), makes them durable and publishes them under their
   * digest. The writer is finished afterwards, whatever the outcome.
   */
  commit(expected?: { digest?: string; size?: number }): Promise<CommitResult>;
  /** Discards the ingest. Safe to call after commit or twice. */
  abort(): Promise<void>;
}

/** Writes new blobs. */
export interface BlobIngester {
  /**
   * Starts an ingest under `ref` ([A-Za-z0-9._-], at most 128 characters). A ref already being
   * written by this process is refused (AlreadyExists); a stale leftover under it is discarded.
   */
  ingest(ref: string): Promise<BlobWriter>;
  /**
   * Local stores: starts an ingest that takes `file`'s bytes by hard link instead of a copy
   * (`write` then only hashes what the caller reads from the file). Undefined when the file is on
   * another filesystem or the backend cannot link; stream it through `ingest` then. The file must
   * not change afterwards: it becomes the blob.
   */
  adopt?(ref: string, file: string): Promise<BlobWriter | undefined>;
}

/** Lists, deletes and tidies blobs (the garbage collector's view). */
export interface BlobManager {
  /** Deletes a blob; false when it was not stored. */
  delete(digest: string): Promise<boolean>;
  /** Every committed blob. */
  list(): AsyncIterable<BlobInfo>;
  /**
   * Removes ingest leftovers (crashed or abandoned writes) last touched before `olderThan`;
   * ingests this process is writing are kept. Returns how many were removed.
   */
  cleanup(opts: { olderThan: Date }): Promise<number>;
}

export interface BlobStore extends BlobReader, BlobIngester, BlobManager {
  /** Releases clients and handles. */
  close(): Promise<void>;
}

const DIGEST = /^sha256:([a-f0-9]{64})$/;
const REF = /^[A-Za-z0-9._-]{1,128}$/;

/** The hex part of a `sha256:…` digest; anything else is refused (digests become paths and keys). */
export function digestHex(digest: string): string {
  const m = DIGEST.exec(digest);
  if (!m)
    throw new InvalidArgumentError(`invalid digest ${JSON.stringify(digest)}: expected sha256:<64 hex>`);
  return m[1]!;
}

export function isDigest(value: string): boolean {
  return DIGEST.test(value);
}

export function checkRef(ref: string): string {
  if (!REF.test(ref) || ref === "." || ref === "..") {
    throw new InvalidArgumentError(`invalid ingest ref ${JSON.stringify(ref)}: use 1-128 of [A-Za-z0-9._-]`);
  }
  return ref;
}

export class BlobNotFoundError extends NotFoundError {
  constructor(readonly digest: string) {
    super(`blob ${digest} is not stored`);
  }
}

export class IngestInUseError extends AlreadyExistsError {
  constructor(readonly ref: string) {
    super(`ingest ${ref} is already being written`);
  }
}

/** The content's digest is not the one the caller declared; nothing was kept. */
export class DigestMismatchError extends InvalidArgumentError {
  constructor(
    readonly expected: string,
    readonly actual: string,
  ) {
    super(`checksum mismatch: declared ${expected}, content is ${actual}; nothing was stored`, {
      field: "checksum",
    });
  }
}

/** The content's size is not the one the caller declared; nothing was kept. */
export class SizeMismatchError extends InvalidArgumentError {
  constructor(
    readonly expected: number,
    readonly actual: number,
  ) {
    super(
      `size mismatch: declared ${expected} bytes, received ${actual > expected ? "at least " : ""}${actual}; nothing was stored`,
      {
        field: "size_bytes",
      },
    );
  }
}

/** Shared by the writers: throws when the finished content is not what was declared. */
export function verifyExpected(
  actual: { digest: string; size: number },
  expected: { digest?: string; size?: number } | undefined,
): void {
  if (expected?.size !== undefined && expected.size !== actual.size) {
    throw new SizeMismatchError(expected.size, actual.size);
  }
  if (expected?.digest && expected.digest !== actual.digest) {
    throw new DigestMismatchError(expected.digest, actual.digest);
  }
}
