/**
 * The contract between layer extraction and Kiln's ext4 writer (writer.ts): file content goes
 * straight into the image file while layers are extracted, and the rootfs tree keeps, in place
 * of each such file, a placeholder saying where its content is. The tree still carries every
 * name, mode, owner, time and hard link, so whiteouts, optimization and init injection work on
 * it unchanged; the writer then adds only metadata around content that is already in place,
 * instead of copying every byte again as `mkfs.ext4 -d` does.
 *
 * A placeholder is a 64-byte head — a magic, the build's random nonce, the content's first block
 * and length, and the size of what follows — then the file's extended attributes, if it has any
 * (Node cannot set them on the tree's files; the writer puts them in the inode). Only a file whose
 * size is exactly what its head says, starting with the magic and this build's nonce, is one; any
 * other file (injected by init, rewritten by optimization, or content that happens to look alike)
 * is copied into the image as it is. A placeholder follows its inode: hard links share it, and
 * replacing or deleting the file drops it. A file with attributes but no content has one too.
 */
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import type { Xattr } from "./xattrs.js";

export const BLOCK_SIZE = 4096;
/**
 * Where file content starts in the image: block 0 holds the superblock and blocks 1–64 the
 * group descriptors (32 bytes each, 128 per block: room for 8192 groups of 128 MiB, 1 TiB).
 */
export const DATA_START_BLOCK = 65;
/** The largest image Kiln's writer makes: what 64 blocks of group descriptors describe. */
export const MAX_IMAGE_BYTES = 64 * 128 * 32768 * BLOCK_SIZE;

/** A placeholder's head; its attributes follow. */
export const PLACEHOLDER_BYTES = 64;
/** The largest placeholder: attributes beyond a block would not fit ext4's one attribute block. */
export const MAX_PLACEHOLDER_BYTES = PLACEHOLDER_BYTES + BLOCK_SIZE;
export const NONCE_BYTES = 16;
const MAGIC = Buffer.from("kiln-ext4-data\n\0", "latin1");

/** Where one file's content lies in the image: `length` bytes from block `block` on. */
export interface DataExtent {
  block: number;
  length: number;
}

/** What a placeholder says of its file: where its content is, and its extended attributes. */
export interface Placeholder extends DataExtent {
  xattrs: Xattr[];
}

export function newNonce(): Buffer {
  return randomBytes(NONCE_BYTES);
}

export function encodePlaceholder(nonce: Buffer, extent: DataExtent, xattrs: readonly Xattr[] = []): Buffer {
  // A short nonce would make placeholders no writer recognizes (and copies as content).
  if (nonce.length !== NONCE_BYTES) throw new RangeError(`a placeholder nonce is ${NONCE_BYTES} bytes`);
  const attrs = xattrs.map(({ name, value }) => {
    const n = Buffer.from(name, "utf8");
    const b = Buffer.alloc(4 + n.length + value.length);
    b.writeUInt16LE(n.length, 0);
    n.copy(b, 2);
    b.writeUInt16LE(value.length, 2 + n.length);
    value.copy(b, 4 + n.length);
    return b;
  });
  const head = Buffer.alloc(PLACEHOLDER_BYTES);
  MAGIC.copy(head, 0);
  nonce.copy(head, 16);
  head.writeBigUInt64LE(BigInt(extent.block), 32);
  head.writeBigUInt64LE(BigInt(extent.length), 40);
  const b = Buffer.concat([head, ...attrs]);
  if (b.length > MAX_PLACEHOLDER_BYTES)
    throw new RangeError("a placeholder's extended attributes exceed a block");
  b.writeUInt32LE(b.length - PLACEHOLDER_BYTES, 48);
  return b;
}

/** Whether a file of `size` bytes may be a placeholder (and is worth reading to find out). */
export function placeholderSized(size: number): boolean {
  return size >= PLACEHOLDER_BYTES && size <= MAX_PLACEHOLDER_BYTES;
}

/** What a placeholder says, or undefined when `content` is not one of this build's placeholders. */
export function decodePlaceholder(content: Buffer, nonce: Buffer): Placeholder | undefined {
  if (!placeholderSized(content.length)) return undefined;
  if (!content.subarray(0, 16).equals(MAGIC) || !content.subarray(16, 32).equals(nonce)) return undefined;
  if (content.readUInt32LE(48) !== content.length - PLACEHOLDER_BYTES) return undefined;
  const xattrs: Xattr[] = [];
  for (let at = PLACEHOLDER_BYTES; at < content.length; ) {
    const nameLen = content.readUInt16LE(at);
    const name = content.toString("utf8", at + 2, at + 2 + nameLen);
    if (at + 4 + nameLen > content.length) return undefined;
    const valueLen = content.readUInt16LE(at + 2 + nameLen);
    const start = at + 4 + nameLen;
    if (start + valueLen > content.length) return undefined;
    xattrs.push({ name, value: Buffer.from(content.subarray(start, start + valueLen)) });
    at = start + valueLen;
  }
  return {
    block: Number(content.readBigUInt64LE(32)),
    length: Number(content.readBigUInt64LE(40)),
    xattrs,
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
 * the image like any other file. Inode, mode, owner and times stay as they were; extended
 * attributes, which only the placeholder held, are dropped (these files have none in practice).
 */
export async function restoreContent(file: string, image: string, nonce: Buffer): Promise<void> {
  const fh = await fsp.open(file, fs.constants.O_RDWR | fs.constants.O_NOFOLLOW).catch(() => undefined);
  if (!fh) return;
  try {
    const st = await fh.stat();
    if (!st.isFile() || !placeholderSized(st.size)) return;
    const { buffer } = await fh.read(Buffer.alloc(st.size), 0, st.size, 0);
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
