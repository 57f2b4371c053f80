import { createHash } from "node:crypto";
import { Readable } from "node:stream";
import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CopyObjectCommand,
  CreateMultipartUploadCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  ListMultipartUploadsCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  UploadPartCommand,
  UploadPartCopyCommand,
} from "@aws-sdk/client-s3";
import { InvalidArgumentError, type Logger, NotFoundError, UnavailableError } from "@kiln/kit";
import {
  type BlobInfo,
  BlobNotFoundError,
  type BlobStore,
  type BlobWriter,
  type CommitResult,
  checkRef,
  digestHex,
  IngestInUseError,
  verifyExpected,
} from "./blob-store.js";

export interface S3StoreOptions {
  /** e.g. http://127.0.0.1:9000; undefined = AWS. Always addressed path-style. */
  endpoint?: string;
  region: string;
  bucket: string;
  /** Key prefix ("" or ending in "/"). */
  prefix: string;
  credentials?: { accessKeyId: string; secretAccessKey: string };
  /** Multipart part size in bytes (≥ 5 MiB). */
  partSize: number;
  /** Parts in flight per upload. */
  queueSize?: number;
  log?: Logger;
}

/** S3's limit for a single CopyObject; larger objects are copied part by part. */
const MAX_SINGLE_COPY = 5 * 1024 ** 3;
const COPY_PART = 1024 ** 3;

/** The S3 store plus reading objects it does not own (RegisterAsset's `s3://bucket/key`). */
export interface S3BlobStore extends BlobStore {
  readonly bucket: string;
  /** Checks that the bucket answers (readiness). */
  ping(): Promise<void>;
  /** Reads any object the credentials can reach, by `s3://bucket/key`. */
  openObject(url: string): Promise<{ body: Readable; size: number }>;
}

/**
 * Blobs as objects `<prefix>sha256/ab/<hex>` in one bucket. Writes are multipart uploads to
 * `<prefix>ingest/<ref>`, hashed while the parts stream out; commit verifies the digest before
 * completing the upload, then copies the object to its digest key (server-side) and deletes the
 * ingest object. Content smaller than one part skips the ingest object and is put directly under
 * its digest once verified. An object under a digest key is therefore always complete.
 */
export function createS3BlobStore(opts: S3StoreOptions): S3BlobStore {
  const client = new S3Client({
    region: opts.region,
    endpoint: opts.endpoint || undefined,
    forcePathStyle: true,
    credentials: opts.credentials,
    // Flexible checksums (aws-chunked trailers) are not understood by every S3 implementation;
    // content integrity is ours to check anyway (sha256 of every blob).
    requestChecksumCalculation: "WHEN_REQUIRED",
    responseChecksumValidation: "WHEN_REQUIRED",
  });
  const { bucket, prefix } = opts;
  const queueSize = opts.queueSize ?? 4;
  const active = new Set<string>();
  const blobKey = (digest: string) => {
    const hex = digestHex(digest);
    return `${prefix}sha256/${hex.slice(0, 2)}/${hex}`;
  };
  const ingestKey = (ref: string) => `${prefix}ingest/${ref}`;
  const location = (digest: string) => `s3://${bucket}/${blobKey(digest)}`;
  // S3 has no create-if-absent for copies: writers of the same content in this process publish
  // one at a time, so the later ones find the object and skip a redundant copy.
  const publishes = new Map<string, Promise<unknown>>();
  const publishing = <T>(key: string, fn: () => Promise<T>): Promise<T> => {
    const previous = publishes.get(key) ?? Promise.resolve();
    const next = previous.then(fn, fn);
    const settled = next.catch(() => {});
    publishes.set(key, settled);
    void settled.then(() => {
      if (publishes.get(key) === settled) publishes.delete(key);
    });
    return next;
  };

  const head = async (key: string) => {
    try {
      const res = await client.send(new HeadObjectCommand({ Bucket: bucket, Key: key }));
      return { size: res.ContentLength ?? 0, modifiedAt: res.LastModified };
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw wrap(err, `HEAD s3://${bucket}/${key}`);
    }
  };
  const deleteKey = async (key: string) => {
    await client.send(new DeleteObjectCommand({ Bucket: bucket, Key: key })).catch((err: unknown) => {
      if (!isNotFound(err)) throw wrap(err, `DELETE s3://${bucket}/${key}`);
    });
  };
  const copy = async (from: string, to: string, size: number) => {
    const source = `${bucket}/${from}`;
    if (size <= MAX_SINGLE_COPY) {
      await client.send(new CopyObjectCommand({ Bucket: bucket, Key: to, CopySource: source }));
      return;
    }
    const { UploadId } = await client.send(new CreateMultipartUploadCommand({ Bucket: bucket, Key: to }));
    try {
      const parts: Array<{ PartNumber: number; ETag: string | undefined }> = [];
      for (let start = 0, n = 1; start < size; start += COPY_PART, n++) {
        const end = Math.min(start + COPY_PART, size) - 1;
        const res = await client.send(
          new UploadPartCopyCommand({
            Bucket: bucket,
            Key: to,
            UploadId,
            PartNumber: n,
            CopySource: source,
            CopySourceRange: `bytes=${start}-${end}`,
          }),
        );
        parts.push({ PartNumber: n, ETag: res.CopyPartResult?.ETag });
      }
      await client.send(
        new CompleteMultipartUploadCommand({
          Bucket: bucket,
          Key: to,
          UploadId,
          MultipartUpload: { Parts: parts },
        }),
      );
    } catch (err) {
      await client
        .send(new AbortMultipartUploadCommand({ Bucket: bucket, Key: to, UploadId }))
        .catch(() => {});
      throw err;
    }
  };

  async function* listKeys(keyPrefix: string) {
    let token: string | undefined;
    do {
      const res = await client.send(
        new ListObjectsV2Command({ Bucket: bucket, Prefix: keyPrefix, ContinuationToken: token }),
      );
      for (const o of res.Contents ?? []) if (o.Key) yield o;
      token = res.IsTruncated ? res.NextContinuationToken : undefined;
    } while (token);
  }

  return {
    backend: "s3",
    bucket,

    async stat(digest) {
      const h = await head(blobKey(digest));
      return h && { digest, size: h.size, location: location(digest), modifiedAt: h.modifiedAt };
    },

    async openRead(digest) {
      try {
        const res = await client.send(new GetObjectCommand({ Bucket: bucket, Key: blobKey(digest) }));
        return asReadable(res.Body);
      } catch (err) {
        if (isNotFound(err)) throw new BlobNotFoundError(digest);
        throw wrap(err, `GET ${location(digest)}`);
      }
    },

    localPath: () => undefined,
    location,

    async ingest(ref) {
      checkRef(ref);
      if (active.has(ref)) throw new IngestInUseError(ref);
      active.add(ref);
      return s3Writer({
        ref,
        client,
        bucket,
        key: ingestKey(ref),
        partSize: opts.partSize,
        queueSize,
        blobKey,
        head,
        copy,
        publishing,
        deleteKey,
        done: () => active.delete(ref),
      });
    },

    async delete(digest) {
      const key = blobKey(digest);
      if (!(await head(key))) return false;
      await deleteKey(key);
      return true;
    },

    async *list(): AsyncIterable<BlobInfo> {
      for await (const o of listKeys(`${prefix}sha256/`)) {
        const m = /sha256\/([a-f0-9]{2})\/([a-f0-9]{64})$/.exec(o.Key!);
        if (!m || !m[2]!.startsWith(m[1]!)) continue;
        const digest = `sha256:${m[2]}`;
        yield { digest, size: o.Size ?? 0, location: location(digest), modifiedAt: o.LastModified };
      }
    },

    async cleanup({ olderThan }) {
      let removed = 0;
      for await (const o of listKeys(`${prefix}ingest/`)) {
        const ref = o.Key!.slice(`${prefix}ingest/`.length);
        if (active.has(ref) || (o.LastModified && o.LastModified >= olderThan)) continue;
        await deleteKey(o.Key!);
        removed++;
      }
      // Unfinished multipart uploads hold storage too. Not every S3 implementation lists them.
      try {
        const res = await client.send(
          new ListMultipartUploadsCommand({ Bucket: bucket, Prefix: `${prefix}ingest/` }),
        );
        for (const u of res.Uploads ?? []) {
          const ref = (u.Key ?? "").slice(`${prefix}ingest/`.length);
          if (active.has(ref) || (u.Initiated && u.Initiated >= olderThan)) continue;
          await client.send(
            new AbortMultipartUploadCommand({ Bucket: bucket, Key: u.Key, UploadId: u.UploadId }),
          );
          removed++;
        }
      } catch (err) {
        opts.log?.debug({ err }, "could not list unfinished multipart uploads");
      }
      return removed;
    },

    async ping() {
      try {
        await client.send(new HeadBucketCommand({ Bucket: bucket }));
      } catch (err) {
        throw wrap(err, `HEAD bucket ${bucket}`);
      }
    },

    async openObject(url) {
      const m = /^s3:\/\/([^/]+)\/(.+)$/.exec(url);
      if (!m)
        throw new InvalidArgumentError(`location ${JSON.stringify(url)}: expected s3://bucket/key`, {
          field: "location",
        });
      try {
        const res = await client.send(new GetObjectCommand({ Bucket: m[1], Key: m[2] }));
        return { body: asReadable(res.Body), size: res.ContentLength ?? 0 };
      } catch (err) {
        if (isNotFound(err)) throw new NotFoundError(`object ${url} not found`);
        throw wrap(err, `GET ${url}`);
      }
    },

    async close() {
      client.destroy();
    },
  };
}

function s3Writer(w: {
  ref: string;
  client: S3Client;
  bucket: string;
  key: string;
  partSize: number;
  queueSize: number;
  blobKey: (digest: string) => string;
  head: (key: string) => Promise<{ size: number } | undefined>;
  copy: (from: string, to: string, size: number) => Promise<void>;
  /** Runs `fn` alone among this process's writers publishing the same key. */
  publishing: <T>(key: string, fn: () => Promise<T>) => Promise<T>;
  deleteKey: (key: string) => Promise<void>;
  done: () => void;
}): BlobWriter {
  const hash = createHash("sha256");
  let size = 0;
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  let uploadId: string | undefined;
  let partNumber = 0;
  const parts: Array<{ PartNumber: number; ETag: string | undefined }> = [];
  const inflight = new Set<Promise<void>>();
  let failure: unknown;
  let finished = false;

  const takePending = () => {
    const body = Buffer.concat(pending, pendingBytes);
    pending = [];
    pendingBytes = 0;
    return body;
  };
  const sendPart = async (body: Buffer) => {
    if (!uploadId) {
      const res = await w.client.send(new CreateMultipartUploadCommand({ Bucket: w.bucket, Key: w.key }));
      uploadId = res.UploadId;
    }
    const n = ++partNumber;
    const sent = w.client
      .send(
        new UploadPartCommand({
          Bucket: w.bucket,
          Key: w.key,
          UploadId: uploadId,
          PartNumber: n,
          Body: body,
          ContentLength: body.byteLength,
        }),
      )
      .then(
        (res) => void parts.push({ PartNumber: n, ETag: res.ETag }),
        (err: unknown) => {
          failure ??= err;
        },
      );
    const tracked: Promise<void> = sent.finally(() => inflight.delete(tracked));
    inflight.add(tracked);
    while (inflight.size >= w.queueSize) await Promise.race(inflight);
    if (failure) throw wrap(failure, `upload part ${n} of s3://${w.bucket}/${w.key}`);
  };
  const abortUpload = async () => {
    await Promise.allSettled(inflight);
    if (uploadId) {
      await w.client
        .send(new AbortMultipartUploadCommand({ Bucket: w.bucket, Key: w.key, UploadId: uploadId }))
        .catch(() => {});
    }
  };

  return {
    ref: w.ref,
    get size() {
      return size;
    },
    async write(chunk) {
      if (finished) throw new Error(`ingest ${w.ref} is finished`);
      hash.update(chunk);
      size += chunk.byteLength;
      pending.push(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
      pendingBytes += chunk.byteLength;
      if (pendingBytes >= w.partSize) await sendPart(takePending());
    },
    digest: () => `sha256:${hash.copy().digest("hex")}`,
    async commit(expected): Promise<CommitResult> {
      if (finished) throw new Error(`ingest ${w.ref} is finished`);
      finished = true;
      try {
        const digest = `sha256:${hash.digest("hex")}`;
        verifyExpected({ digest, size }, expected);
        const target = w.blobKey(digest);
        if (!uploadId) {
          // Smaller than one part: no ingest object at all.
          const body = takePending();
          return await w.publishing(target, async () => {
            if (await w.head(target)) return { digest, size, created: false };
            await w.client.send(
              new PutObjectCommand({
                Bucket: w.bucket,
                Key: target,
                Body: body,
                ContentLength: body.byteLength,
              }),
            );
            return { digest, size, created: true };
          });
        }
        if (pendingBytes > 0) await sendPart(takePending());
        await Promise.all(inflight);
        if (failure) throw wrap(failure, `upload to s3://${w.bucket}/${w.key}`);
        parts.sort((a, b) => a.PartNumber - b.PartNumber);
        await w.client.send(
          new CompleteMultipartUploadCommand({
            Bucket: w.bucket,
            Key: w.key,
            UploadId: uploadId,
            MultipartUpload: { Parts: parts },
          }),
        );
        uploadId = undefined;
        try {
          return await w.publishing(target, async () => {
            if (await w.head(target)) return { digest, size, created: false };
            await w.copy(w.key, target, size);
            return { digest, size, created: true };
          });
        } finally {
          await w.deleteKey(w.key).catch(() => {});
        }
      } catch (err) {
        await abortUpload();
        throw err;
      } finally {
        pending = [];
        w.done();
      }
    },
    async abort() {
      if (finished) return;
      finished = true;
      pending = [];
      await abortUpload();
      w.done();
    },
  };
}

function asReadable(body: unknown): Readable {
  if (body instanceof Readable) return body;
  throw new Error("S3 response body is not a Node.js stream");
}

function isNotFound(err: unknown): boolean {
  const e = err as { name?: string; $metadata?: { httpStatusCode?: number } };
  return e?.name === "NotFound" || e?.name === "NoSuchKey" || e?.$metadata?.httpStatusCode === 404;
}

function wrap(err: unknown, what: string): Error {
  if (err instanceof BlobNotFoundError || err instanceof UnavailableError) return err;
  const reason = err instanceof Error ? `${err.name}: ${err.message}` : String(err);
  return new UnavailableError(`S3 ${what} failed: ${reason}`, { cause: err });
}
