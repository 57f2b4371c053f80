import { createHash, type Hash } from "node:crypto";
import fsp from "node:fs/promises";
import path from "node:path";
import type { Readable } from "node:stream";
import { fsyncPath, type Logger } from "@kiln/kit";
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
import { adoptedFile, createStagingPool, type IngestFile, openIngestFile } from "./ingest-file.js";

/**
 * Blobs as files under `root` (`<data dir>/assets`):
 *
 *   sha256/ab/<hex>   committed blobs, read-only (0444), published with link(2) so an existing
 *                     blob is never replaced and a reader never sees a partial file
 *   ingest/<ref>      writes in progress, hashed as they stream
 *
 * Commit: fsync the ingest file, verify, chmod 0444, link it to its digest path (EEXIST: the
 * content is already stored), fsync that directory, unlink the ingest. How the bytes reach the
 * ingest file (staged, past the page cache where possible): ingest-file.ts.
 */
export function createLocalBlobStore(opts: {
  root: string;
  log?: Logger;
  /** Write ingests past the page cache where the filesystem can (default true). */
  directIo?: boolean;
}): BlobStore {
  const root = path.resolve(opts.root);
  const staging = createStagingPool();
  const blobsDir = path.join(root, "sha256");
  const ingestDir = path.join(root, "ingest");
  const active = new Set<string>();
  const blobPath = (digest: string) => {
    const hex = digestHex(digest);
    return path.join(blobsDir, hex.slice(0, 2), hex);
  };

  return {
    backend: "local",

    async stat(digest) {
      const file = blobPath(digest);
      try {
        const st = await fsp.stat(file);
        return { digest, size: st.size, location: file, modifiedAt: st.mtime };
      } catch (err) {
        if (isErrno(err, "ENOENT")) return undefined;
        throw err;
      }
    },

    async openRead(digest) {
      const file = blobPath(digest);
      const handle = await fsp.open(file, "r").catch((err: unknown) => {
        if (isErrno(err, "ENOENT")) throw new BlobNotFoundError(digest);
        throw err;
      });
      return handle.createReadStream({ highWaterMark: 1024 * 1024 }) as Readable;
    },

    localPath: blobPath,
    location: blobPath,

    async ingest(ref) {
      checkRef(ref);
      if (active.has(ref)) throw new IngestInUseError(ref);
      active.add(ref);
      try {
        await fsp.mkdir(ingestDir, { recursive: true });
        const file = path.join(ingestDir, ref);
        // Truncates a stale leftover of the same ref: an ingest is not resumable through
        // UploadAsset (the stream carries no offsets), so starting over is the only option.
        const sink = await openIngestFile(file, { pool: staging, direct: opts.directIo ?? true });
        return localWriter({ ref, file, sink, blobPath, log: opts.log, done: () => active.delete(ref) });
      } catch (err) {
        active.delete(ref);
        throw err;
      }
    },

    async adopt(ref, source) {
      checkRef(ref);
      if (active.has(ref)) throw new IngestInUseError(ref);
      active.add(ref);
      try {
        await fsp.mkdir(ingestDir, { recursive: true });
        const file = path.join(ingestDir, ref);
        await fsp.rm(file, { force: true });
        try {
          await fsp.link(source, file);
        } catch (err) {
          if (isErrno(err, "EXDEV", "EPERM", "EMLINK")) {
            active.delete(ref);
            return undefined;
          }
          throw err;
        }
        const sink = adoptedFile(await fsp.open(file, "r"));
        return localWriter({ ref, file, sink, blobPath, log: opts.log, done: () => active.delete(ref) });
      } catch (err) {
        active.delete(ref);
        throw err;
      }
    },

    async delete(digest) {
      try {
        await fsp.unlink(blobPath(digest));
        return true;
      } catch (err) {
        if (isErrno(err, "ENOENT")) return false;
        throw err;
      }
    },

    async *list(): AsyncIterable<BlobInfo> {
      const prefixes = await readdirIfExists(blobsDir);
      for (const prefix of prefixes.sort()) {
        if (!/^[a-f0-9]{2}$/.test(prefix)) continue;
        const dir = path.join(blobsDir, prefix);
        for (const name of (await readdirIfExists(dir)).sort()) {
          if (!/^[a-f0-9]{64}$/.test(name) || !name.startsWith(prefix)) continue;
          const file = path.join(dir, name);
          const st = await fsp.stat(file).catch(() => undefined);
          if (st?.isFile())
            yield { digest: `sha256:${name}`, size: st.size, location: file, modifiedAt: st.mtime };
        }
      }
    },

    async cleanup({ olderThan }) {
      let removed = 0;
      for (const name of await readdirIfExists(ingestDir)) {
        if (active.has(name)) continue;
        const file = path.join(ingestDir, name);
        const st = await fsp.lstat(file).catch(() => undefined);
        if (!st || st.mtimeMs >= olderThan.getTime()) continue;
        await fsp.rm(file, { recursive: true, force: true });
        removed++;
      }
      return removed;
    },

    async close() {},
  };
}

function localWriter(w: {
  ref: string;
  file: string;
  sink: IngestFile;
  blobPath: (digest: string) => string;
  log: Logger | undefined;
  done: () => void;
}): BlobWriter {
  const hash: Hash = createHash("sha256");
  let size = 0;
  let finished = false;
  const discard = async () => {
    finished = true;
    await w.sink.close().catch(() => {});
    await fsp.rm(w.file, { force: true });
    w.done();
  };
  return {
    ref: w.ref,
    get size() {
      return size;
    },
    async write(chunk) {
      if (finished) throw new Error(`ingest ${w.ref} is finished`);
      size += chunk.byteLength;
      hash.update(chunk);
      await w.sink.write(chunk);
    },
    digest: () => `sha256:${hash.copy().digest("hex")}`,
    async commit(expected): Promise<CommitResult> {
      if (finished) throw new Error(`ingest ${w.ref} is finished`);
      finished = true;
      try {
        await w.sink.finish();
        await w.sink.close();
        const digest = `sha256:${hash.digest("hex")}`;
        verifyExpected({ digest, size }, expected);
        const target = w.blobPath(digest);
        await fsp.chmod(w.file, 0o444);
        await fsp.mkdir(path.dirname(target), { recursive: true });
        let created = true;
        try {
          await fsp.link(w.file, target);
        } catch (err) {
          if (!isErrno(err, "EEXIST")) throw err;
          created = false;
        }
        // Past the point of no return: the blob is visible, so a failure to make its name
        // durable is logged, not returned (a crash would at worst lose the blob again).
        if (created) {
          await fsyncPath(path.dirname(target)).catch((err: unknown) =>
            w.log?.warn({ err, digest }, "could not fsync the blob directory"),
          );
        }
        return { digest, size, created };
      } finally {
        await w.sink.close().catch(() => {});
        await fsp.rm(w.file, { force: true }).catch(() => {});
        w.done();
      }
    },
    async abort() {
      if (finished) return;
      await discard();
    },
  };
}

async function readdirIfExists(dir: string): Promise<string[]> {
  try {
    return await fsp.readdir(dir);
  } catch (err) {
    if (isErrno(err, "ENOENT")) return [];
    throw err;
  }
}

export function isErrno(err: unknown, ...codes: string[]): boolean {
  return typeof err === "object" && err !== null && codes.includes((err as NodeJS.ErrnoException).code ?? "");
}
