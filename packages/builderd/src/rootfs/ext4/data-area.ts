/**
 * The contract between layer extraction and Kiln's ext4 writer (writer.ts): file content goes
 * straight into the image file while layers are extracted, and the rootfs tree keeps, in place
 * of each such file, a placeholder saying where its content is. The tree still carries every
 * name, mode, owner, time and hard link, so whiteouts, optimization and init injection work on
 * it unchanged; the writer then adds only metadata around content that is already in place,
 * instead of copying every byte again as `mkfs.ext4 -d` does.
 *
 * A placeholder is a 64-byte file: a magic, the build's random nonce, and the content's first
 * block and length. Only a file of exactly that size that starts with the magic and this build's
 * nonce is one; any other file (injected by init, rewritten by optimization, or content that
 * happens to be 64 bytes) is copied into the image as it is. A placeholder follows its inode:
 * hard links share it, and replacing or deleting the file drops it.
 */
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";

export const BLOCK_SIZE = 4096;
/**
 * Where file content starts in the image: block 0 holds the superblock and blocks 1–64 the
 * group descriptors (32 bytes each, 128 per block: room for 8192 groups of 128 MiB, 1 TiB).
 */
export const DATA_START_BLOCK = 65;
/** The largest image Kiln's writer makes: what 64 blocks of group descriptors describe. */
export const MAX_IMAGE_BYTES = 64 * 128 * 32768 * BLOCK_SIZE;

export const PLACEHOLDER_BYTES = 64;
export const NONCE_BYTES = 16;
const MAGIC = Buffer.from("kiln-ext4-data\n\0", "latin1");

/** Where one file's content lies in the image: `length` bytes from block `block` on. */
export interface DataExtent {
  block: number;
  length: number;
}

export function newNonce(): Buffer {
  return randomBytes(NONCE_BYTES);
}

export function encodePlaceholder(nonce: Buffer, extent: DataExtent): Buffer {
  // A short nonce would make placeholders no writer recognizes (and copies as content).
  if (nonce.length !== NONCE_BYTES) throw new RangeError(`a placeholder nonce is ${NONCE_BYTES} bytes`);
  const b = Buffer.alloc(PLACEHOLDER_BYTES);
  MAGIC.copy(b, 0);
  nonce.copy(b, 16);
  b.writeBigUInt64LE(BigInt(extent.block), 32);
  b.writeBigUInt64LE(BigInt(extent.length), 40);
  return b;
}

/** The extent a placeholder names, or undefined when `content` is not this build's placeholder. */
export function decodePlaceholder(content: Buffer, nonce: Buffer): DataExtent | undefined {
  if (content.length !== PLACEHOLDER_BYTES) return undefined;
  if (!content.subarray(0, 16).equals(MAGIC) || !content.subarray(16, 32).equals(nonce)) return undefined;
  return {
    block: Number(content.readBigUInt64LE(32)),
    length: Number(content.readBigUInt64LE(40)),
  };
}

/** Blocks that `bytes` of content take. */
export function blocksFor(bytes: number): number {
  return Math.ceil(bytes / BLOCK_SIZE);
}

/**
 * Puts the content of the placeholder at `file` back into the file, read from the image (a no-op
 * for any other file). For the few files a build reads before the image is written (the image's
 * /etc/passwd and /etc/group, to resolve the workload's user); the writer then copies them into
 * the image like any other file. Inode, mode, owner and times stay as they were.
 */
export async function restoreContent(file: string, image: string, nonce: Buffer): Promise<void> {
  const fh = await fsp.open(file, fs.constants.O_RDWR | fs.constants.O_NOFOLLOW).catch(() => undefined);
  if (!fh) return;
  try {
    const st = await fh.stat();
    if (!st.isFile() || st.size !== PLACEHOLDER_BYTES) return;
    const { buffer } = await fh.read(Buffer.alloc(PLACEHOLDER_BYTES), 0, PLACEHOLDER_BYTES, 0);
    const extent = decodePlaceholder(buffer, nonce);
    if (!extent) return;
    const content = Buffer.alloc(extent.length);
    const img = await fsp.open(image, "r");
    try {
      await img.read(content, 0, extent.length, extent.block * BLOCK_SIZE);
    } finally {
      await img.close();
    }
    await fh.truncate(0);
    await fh.write(content, 0, content.length, 0);
    await fh.utimes(st.atime, st.mtime);
  } finally {
    await fh.close();
  }
}
