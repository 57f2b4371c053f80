import { createHash } from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { pipeline as pipe } from "node:stream";
import { pipeline } from "node:stream/promises";
import zlib from "node:zlib";
import { readTar } from "../extract/tar-reader.js";
import { MalformedImageError } from "./errors.js";

/**
 * Reads an image archive (a tar, optionally gzip-compressed) into a scratch directory without
 * trusting any of its names: each wanted regular file is written under a sequential name of our
 * own, so no entry can land outside `dest`; symlinks are only remembered (docker save uses them
 * to share identical layers) and resolved against the archive's own names later.
 */

export interface ArchiveFile {
  /** Where its bytes are now (inside dest). */
  file: string;
  size: number;
  digest: string;
}

export interface ExtractedArchive {
  files: Map<string, ArchiveFile>;
  links: Map<string, string>;
  /** The regular file an archive name stands for, following its symlinks (at most 8). */
  lookup(name: string): ArchiveFile | undefined;
}

/** An archive member name in canonical form, or undefined when it is unsafe (`..`, absolute). */
export function normalizeEntryName(name: string): string | undefined {
  if (name.startsWith("/") || name.includes("\0")) return undefined;
  const normal = path.posix.normalize(name).replace(/\/+$/, "");
  if (normal === "." || normal === "" || normal === ".." || normal.startsWith("../")) return undefined;
  return normal.replace(/^\.\//, "");
}

async function isGzip(file: string): Promise<boolean> {
  const fd = await fsp.open(file, "r");
  try {
    const buf = Buffer.alloc(2);
    const { bytesRead } = await fd.read(buf, 0, 2, 0);
    return bytesRead === 2 && buf[0] === 0x1f && buf[1] === 0x8b;
  } finally {
    await fd.close();
  }
}

export async function extractArchive(
  archive: string,
  dest: string,
  wanted: (name: string) => boolean,
  signal?: AbortSignal,
): Promise<ExtractedArchive> {
  await fsp.mkdir(dest, { recursive: true });
  const files = new Map<string, ArchiveFile>();
  const links = new Map<string, string>();
  const read = fs.createReadStream(archive, signal ? { signal } : {});
  const tarStream = (await isGzip(archive)) ? pipe(read, zlib.createGunzip(), () => {}) : read;
  let seq = 0;
  try {
    for await (const entry of readTar(tarStream, "image archive")) {
      const name = normalizeEntryName(entry.header.name);
      const type = entry.header.type;
      if (name !== undefined && wanted(name) && (type === "file" || type === "contiguous-file")) {
        const file = path.join(dest, `entry-${seq++}`);
        const hash = createHash("sha256");
        let size = 0;
        await pipeline(
          async function* () {
            for await (const chunk of entry) {
              hash.update(chunk);
              size += chunk.length;
              yield chunk;
            }
          },
          fs.createWriteStream(file, { flags: "wx", mode: 0o600 }),
        );
        files.set(name, { file, size, digest: `sha256:${hash.digest("hex")}` });
        links.delete(name);
      } else if (name !== undefined && wanted(name) && type === "symlink" && entry.header.linkname) {
        links.set(name, entry.header.linkname);
        files.delete(name);
      }
    }
  } catch (err) {
    if (err instanceof Error && err.name === "AbortError") throw err;
    throw new MalformedImageError(
      `cannot read image archive ${archive}: ${err instanceof Error ? err.message : String(err)}`,
      {
        cause: err,
      },
    );
  }
  return {
    files,
    links,
    lookup(name) {
      let current = normalizeEntryName(name);
      for (let hops = 0; current !== undefined && hops <= 8; hops++) {
        const found = files.get(current);
        if (found) return found;
        const target = links.get(current);
        if (target === undefined) return undefined;
        current = target.startsWith("/")
          ? normalizeEntryName(target.slice(1))
          : normalizeEntryName(path.posix.join(path.posix.dirname(current), target));
      }
      return undefined;
    },
  };
}
