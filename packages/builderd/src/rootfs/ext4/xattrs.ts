/**
 * Extended attributes as ext4 stores them (the kernel's fs/ext4/xattr.h, e2fsprogs'
 * lib/ext2fs/ext2_ext_attr.h): in the inode, in the space after its fixed fields, when they fit;
 * otherwise in one attribute block the inode points at (i_file_acl). Both hold the same entries:
 *
 *   entry  e_name_len u8, e_name_index u8, e_value_offs u16, e_value_inum u32 (0: value here),
 *          e_value_size u32, e_hash u32, then the name without its prefix, padded to 4 bytes
 *
 * sorted by (index, name length, name) as the kernel's lookup in a block expects, ended by four
 * zero bytes, with the values (each padded to 4 bytes) packed at the end of the space. In the inode
 * the space starts with a 4-byte magic and value offsets count from the first entry; a block starts
 * with a 32-byte header (magic, refcount, blocks, hash) and offsets count from the block's start.
 *
 * Only the namespaces a container image's layers carry and ext4 stores as plain bytes: `user.`,
 * `trusted.` and `security.` (file capabilities are `security.capability`). POSIX ACLs
 * (`system.posix_acl_*`) would need converting to ext4's own ACL format and are not written.
 */
import { BLOCK_SIZE } from "./data-area.js";

export interface Xattr {
  /** The full name, prefix included: `security.capability`. */
  name: string;
  value: Buffer;
}

const MAGIC = 0xea020000;
/** e_name_index of each namespace Kiln writes. */
const INDEX: ReadonlyArray<[prefix: string, index: number]> = [
  ["user.", 1],
  ["trusted.", 4],
  ["security.", 6],
];
const ENTRY_BYTES = 16;
const BLOCK_HEADER_BYTES = 32;

const pad4 = (n: number) => (n + 3) & ~3;

/** The namespace index and the name's rest, or undefined for a namespace Kiln does not write. */
export function xattrIndex(name: string): { index: number; suffix: Buffer } | undefined {
  for (const [prefix, index] of INDEX) {
    if (!name.startsWith(prefix)) continue;
    const suffix = Buffer.from(name.slice(prefix.length), "utf8");
    if (suffix.length === 0 || suffix.length > 255) return undefined;
    return { index, suffix };
  }
  return undefined;
}

interface Encoded {
  index: number;
  suffix: Buffer;
  value: Buffer;
}

function prepare(attrs: readonly Xattr[]): Encoded[] {
  return attrs
    .map(({ name, value }) => {
      const at = xattrIndex(name);
      if (!at)
        throw new RangeError(`extended attribute ${JSON.stringify(name)} is not in a namespace ext4 stores`);
      return { ...at, value };
    })
    .sort(
      (a, b) => a.index - b.index || a.suffix.length - b.suffix.length || Buffer.compare(a.suffix, b.suffix),
    );
}

/** Bytes the entries take with their terminator, and the values, each padded. */
function sizes(attrs: readonly Encoded[]): { entries: number; values: number } {
  let entries = 4;
  let values = 0;
  for (const a of attrs) {
    entries += pad4(ENTRY_BYTES + a.suffix.length);
    values += pad4(a.value.length);
  }
  return { entries, values };
}

/** e2fsprogs' ext2fs_ext_attr_hash_entry: the name's bytes, then the value as padded LE words. */
function entryHash(a: Encoded): number {
  let hash = 0;
  for (const c of a.suffix) hash = ((hash << 5) ^ (hash >>> 27) ^ c) >>> 0;
  const padded = Buffer.alloc(pad4(a.value.length));
  a.value.copy(padded);
  for (let i = 0; i < padded.length; i += 4)
    hash = ((hash << 16) ^ (hash >>> 16) ^ padded.readUInt32LE(i)) >>> 0;
  return hash;
}

/**
 * Writes entries at `entriesAt` of `space` and values down from its end; offsets count from
 * `offsetBase`. Returns the entries' hashes in order.
 */
function writeEntries(
  space: Buffer,
  entriesAt: number,
  offsetBase: number,
  attrs: readonly Encoded[],
): number[] {
  let at = entriesAt;
  let valueAt = space.length;
  const hashes: number[] = [];
  for (const a of attrs) {
    valueAt -= pad4(a.value.length);
    a.value.copy(space, valueAt);
    const hash = entryHash(a);
    hashes.push(hash);
    space.writeUInt8(a.suffix.length, at);
    space.writeUInt8(a.index, at + 1);
    space.writeUInt16LE(a.value.length === 0 ? 0 : valueAt - offsetBase, at + 2);
    space.writeUInt32LE(0, at + 4);
    space.writeUInt32LE(a.value.length, at + 8);
    space.writeUInt32LE(hash, at + 12);
    a.suffix.copy(space, at + ENTRY_BYTES);
    at += pad4(ENTRY_BYTES + a.suffix.length);
  }
  return hashes; // the terminator is the zeroes already there
}

/**
 * An inode's attribute space of `spaceBytes` (what follows i_extra_isize: format.ts
 * INODE_XATTR_OFFSET), or undefined when the attributes do not fit there.
 */
export function encodeInodeXattrs(attrs: readonly Xattr[], spaceBytes: number): Buffer | undefined {
  const prepared = prepare(attrs);
  const space = Buffer.alloc(spaceBytes);
  const { entries, values } = sizes(prepared);
  if (4 + entries + values > space.length) return undefined;
  space.writeUInt32LE(MAGIC, 0);
  writeEntries(space, 4, 4, prepared);
  return space;
}

/** Whether `attrs` fit one attribute block (so ext4 can hold them at all). */
export function xattrsFitBlock(attrs: readonly Xattr[]): boolean {
  const { entries, values } = sizes(prepare(attrs));
  return BLOCK_HEADER_BYTES + entries + values <= BLOCK_SIZE;
}

/** One attribute block holding `attrs`, or undefined when they do not fit in a block. */
export function encodeXattrBlock(attrs: readonly Xattr[]): Buffer | undefined {
  if (!xattrsFitBlock(attrs)) return undefined;
  const prepared = prepare(attrs);
  const block = Buffer.alloc(BLOCK_SIZE);
  block.writeUInt32LE(MAGIC, 0);
  block.writeUInt32LE(1, 4); // h_refcount: one inode per block
  block.writeUInt32LE(1, 8); // h_blocks
  // e2fsprogs' ext2fs_ext_attr_block_rehash: the entries' hashes folded together.
  let hash = 0;
  for (const h of writeEntries(block, BLOCK_HEADER_BYTES, 0, prepared)) {
    hash = ((hash << 16) ^ (hash >>> 16) ^ h) >>> 0;
  }
  block.writeUInt32LE(hash, 12);
  return block;
}
