import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import type { Readable } from "node:stream";
import type { ExtractedArchive } from "./archive.js";
import { digestHex } from "./digest.js";
import { ImageNotFoundError, MalformedImageError } from "./errors.js";
import { isInside } from "./policy.js";

/**
 * Files of a local image (an OCI layout directory or an extracted archive) by their names inside
 * it. Reads never leave the image: a layout's symlinks pointing elsewhere are refused.
 */
export interface LayoutStore {
  /** A small file (index.json, manifest.json, configs), at most maxBytes. */
  read(name: string, maxBytes: number): Promise<Buffer>;
  open(name: string): Promise<Readable>;
  exists(name: string): Promise<boolean>;
}

export function blobName(digest: string): string {
  return `blobs/sha256/${digestHex(digest)}`;
}

async function readCapped(file: string, maxBytes: number, label: string): Promise<Buffer> {
  const fd = await fsp.open(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  try {
    const st = await fd.stat();
    if (!st.isFile()) throw new MalformedImageError(`${label} is not a regular file`);
    if (st.size > maxBytes)
      throw new MalformedImageError(`${label} is ${st.size} bytes, more than the ${maxBytes} allowed`);
    return await fd.readFile();
  } finally {
    await fd.close();
  }
}

/** A directory on disk (an OCI image layout); `root` is already a real path. */
export function createDirStore(root: string, label: string): LayoutStore {
  async function locate(name: string): Promise<string> {
    const joined = path.join(root, name);
    let real: string;
    try {
      real = await fsp.realpath(joined);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") {
        throw new ImageNotFoundError(label, `${name} is missing from the image layout`);
      }
      throw err;
    }
    if (!isInside(root, real)) {
      throw new MalformedImageError(
        `${label}: ${name} is a symlink that leads outside the image layout; refusing to read it`,
      );
    }
    return real;
  }
  return {
    async read(name, maxBytes) {
      return readCapped(await locate(name), maxBytes, `${label}: ${name}`);
    },
    async open(name) {
      const file = await locate(name);
      const fd = await fsp.open(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
      const st = await fd.stat();
      if (!st.isFile()) {
        await fd.close();
        throw new MalformedImageError(`${label}: ${name} is not a regular file`);
      }
      return fd.createReadStream();
    },
    async exists(name) {
      return fsp
        .lstat(path.join(root, name))
        .then(() => true)
        .catch(() => false);
    },
  };
}

/** An archive extracted by ./archive.ts, read by its member names. */
export function createArchiveStore(archive: ExtractedArchive, label: string): LayoutStore {
  const locate = (name: string) => {
    const found = archive.lookup(name);
    if (!found) throw new ImageNotFoundError(label, `${name} is missing from the archive`);
    return found.file;
  };
  return {
    read: async (name, maxBytes) => readCapped(locate(name), maxBytes, `${label}: ${name}`),
    open: async (name) => fs.createReadStream(locate(name)),
    exists: async (name) => archive.lookup(name) !== undefined,
  };
}
