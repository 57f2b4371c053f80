/**
 * The on-disk structures Kiln's ext4 writer produces, encoded as the Linux kernel's
 * Documentation/filesystems/ext4 and e2fsprogs' lib/ext2fs/ext2_fs.h lay them out (little-endian;
 * the journal superblock is big-endian, as jbd2's). Only what the writer uses: 4 KiB blocks,
 * 256-byte inodes, 32-byte group descriptors, extents, linear directories, no checksums.
 */
import { BLOCK_SIZE } from "./data-area.js";

export const INODE_SIZE = 256;
export const BLOCKS_PER_GROUP = 8 * BLOCK_SIZE;
export const DESC_SIZE = 32;
export const ROOT_INO = 2;
export const JOURNAL_INO = 8;
export const FIRST_INO = 11;
/** Most extents in the inode itself; more need a leaf block (depth 1). */
export const INODE_EXTENTS = 4;
export const BLOCK_EXTENTS = (BLOCK_SIZE - 12) / 12;
/** Longest run one initialized extent maps. */
export const MAX_EXTENT_BLOCKS = 32768;
/** Symlink targets shorter than this live in the inode ("fast" symlinks). */
export const FAST_SYMLINK_MAX = 60;
export const MAX_LINKS = 65000;

const COMPAT_HAS_JOURNAL = 0x4;
const COMPAT_EXT_ATTR = 0x8;
const COMPAT_DIR_INDEX = 0x20;
/** Backup superblocks only where s_backup_bgs says (none): file data may run across any group. */
const COMPAT_SPARSE_SUPER2 = 0x200;
const INCOMPAT_FILETYPE = 0x2;
const INCOMPAT_EXTENTS = 0x40;
/** Bitmaps and inode tables may live anywhere, here after the data. */
const INCOMPAT_FLEX_BG = 0x200;
const RO_COMPAT_LARGE_FILE = 0x2;
const RO_COMPAT_DIR_NLINK = 0x20;
const RO_COMPAT_EXTRA_ISIZE = 0x40;
const EXTRA_ISIZE = 32;
/** Where an inode's extended attribute space starts, and its size (xattrs.ts). */
export const INODE_XATTR_OFFSET = 128 + EXTRA_ISIZE;
export const INODE_XATTR_BYTES = INODE_SIZE - INODE_XATTR_OFFSET;
export const EXTENTS_FL = 0x80000;
const EXTENT_MAGIC = 0xf30a;

export const FT = { unknown: 0, file: 1, dir: 2, chr: 3, blk: 4, fifo: 5, sock: 6, symlink: 7 } as const;

export interface SuperblockFields {
  inodesCount: number;
  blocksCount: number;
  freeBlocks: number;
  freeInodes: number;
  inodesPerGroup: number;
  /** Seconds since the epoch: creation, write and check time. */
  now: number;
  uuid: Buffer;
  hashSeed: Buffer;
  label: string;
  /** The journal inode's i_block and size, backed up in the superblock (s_jnl_blocks). */
  journal?: { iblock: Buffer; sizeBytes: number };
}

/** The 1024-byte superblock (written at byte 1024 of the image). */
export function encodeSuperblock(f: SuperblockFields): Buffer {
  const b = Buffer.alloc(1024);
  b.writeUInt32LE(f.inodesCount, 0x00);
  b.writeUInt32LE(f.blocksCount % 2 ** 32, 0x04);
  b.writeUInt32LE(f.freeBlocks % 2 ** 32, 0x0c);
  b.writeUInt32LE(f.freeInodes, 0x10);
  b.writeUInt32LE(0, 0x14); // s_first_data_block: 0 with 4 KiB blocks
  b.writeUInt32LE(2, 0x18); // s_log_block_size: 1024 << 2
  b.writeUInt32LE(2, 0x1c); // s_log_cluster_size
  b.writeUInt32LE(BLOCKS_PER_GROUP, 0x20);
  b.writeUInt32LE(BLOCKS_PER_GROUP, 0x24);
  b.writeUInt32LE(f.inodesPerGroup, 0x28);
  b.writeUInt32LE(f.now, 0x30); // s_wtime
  b.writeUInt16LE(0xffff, 0x36); // s_max_mnt_count: no forced checks
  b.writeUInt16LE(0xef53, 0x38);
  b.writeUInt16LE(1, 0x3a); // s_state: clean
  b.writeUInt16LE(1, 0x3c); // s_errors: continue
  b.writeUInt32LE(f.now, 0x40); // s_lastcheck
  b.writeUInt32LE(1, 0x4c); // s_rev_level: dynamic
  b.writeUInt32LE(FIRST_INO, 0x54);
  b.writeUInt16LE(INODE_SIZE, 0x58);
  b.writeUInt32LE(
    COMPAT_EXT_ATTR | COMPAT_DIR_INDEX | COMPAT_SPARSE_SUPER2 | (f.journal ? COMPAT_HAS_JOURNAL : 0),
    0x5c,
  );
  b.writeUInt32LE(INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_FLEX_BG, 0x60);
  b.writeUInt32LE(RO_COMPAT_LARGE_FILE | RO_COMPAT_DIR_NLINK | RO_COMPAT_EXTRA_ISIZE, 0x64);
  f.uuid.copy(b, 0x68, 0, 16);
  b.write(f.label, 0x78, 16, "utf8");
  f.hashSeed.copy(b, 0xec, 0, 16);
  b.writeUInt8(1, 0xfc); // s_def_hash_version: half_md4, for directories the kernel indexes later
  if (f.journal) {
    b.writeUInt32LE(JOURNAL_INO, 0xe0);
    b.writeUInt8(1, 0xfd); // s_jnl_backup_type: EXT3_JNL_BACKUP_BLOCKS
    f.journal.iblock.copy(b, 0x10c, 0, 60);
    b.writeUInt32LE(Math.floor(f.journal.sizeBytes / 2 ** 32), 0x10c + 15 * 4);
    b.writeUInt32LE(f.journal.sizeBytes % 2 ** 32, 0x10c + 16 * 4);
  }
  b.writeUInt32LE(f.now, 0x108); // s_mkfs_time
  b.writeUInt32LE(Math.floor(f.blocksCount / 2 ** 32), 0x150);
  b.writeUInt32LE(Math.floor(f.freeBlocks / 2 ** 32), 0x158);
  b.writeUInt16LE(EXTRA_ISIZE, 0x15c); // s_min_extra_isize
  b.writeUInt16LE(EXTRA_ISIZE, 0x15e); // s_want_extra_isize
  // s_flags: directory hashes signed as on x86 (e2fsprogs sets it by the build's char signedness).
  b.writeUInt32LE(0x1, 0x160);
  b.writeUInt8(4, 0x174); // s_log_groups_per_flex: 16 groups, the kernel's allocator hint
  return b;
}

export interface GroupDesc {
  blockBitmap: number;
  inodeBitmap: number;
  inodeTable: number;
  freeBlocks: number;
  freeInodes: number;
  usedDirs: number;
}

export function encodeGroupDesc(g: GroupDesc, into: Buffer, at: number): void {
  into.writeUInt32LE(g.blockBitmap, at + 0x00);
  into.writeUInt32LE(g.inodeBitmap, at + 0x04);
  into.writeUInt32LE(g.inodeTable, at + 0x08);
  into.writeUInt16LE(g.freeBlocks, at + 0x0c);
  into.writeUInt16LE(g.freeInodes, at + 0x0e);
  into.writeUInt16LE(g.usedDirs, at + 0x10);
}

/** A timestamp as ext4 stores it: low 32 bits of seconds, and epoch bits + nanoseconds. */
function encodeTime(ns: bigint): { lo: number; extra: number } {
  let sec = ns / 1_000_000_000n;
  let nsec = ns % 1_000_000_000n;
  if (nsec < 0n) {
    nsec += 1_000_000_000n;
    sec -= 1n;
  }
  const lo = BigInt.asIntN(32, sec);
  const epoch = Number(((sec - lo) >> 32n) & 3n);
  return { lo: Number(BigInt.asUintN(32, sec)), extra: (Number(nsec) << 2) | epoch };
}

export interface InodeFields {
  mode: number;
  uid: number;
  gid: number;
  size: number;
  links: number;
  /** 512-byte sectors the inode holds, extent blocks included. */
  sectors: number;
  flags: number;
  /** The 60-byte i_block: an extent tree root, a fast symlink target or a device number. */
  iblock: Buffer;
  atimeNs: bigint;
  mtimeNs: bigint;
  ctimeNs: bigint;
  /** The extended attribute block (i_file_acl), if any; its 8 sectors are in `sectors`. */
  fileAcl?: number;
  /** The in-inode extended attribute space (xattrs.ts encodeInodeXattrs), if any. */
  xattrs?: Buffer;
}

export function encodeInode(f: InodeFields, into: Buffer, at: number): void {
  into.writeUInt16LE(f.mode & 0xffff, at + 0x00);
  into.writeUInt16LE(f.uid & 0xffff, at + 0x02);
  into.writeUInt32LE(f.size % 2 ** 32, at + 0x04);
  const atime = encodeTime(f.atimeNs);
  const ctime = encodeTime(f.ctimeNs);
  const mtime = encodeTime(f.mtimeNs);
  into.writeUInt32LE(atime.lo, at + 0x08);
  into.writeUInt32LE(ctime.lo, at + 0x0c);
  into.writeUInt32LE(mtime.lo, at + 0x10);
  into.writeUInt16LE(f.gid & 0xffff, at + 0x18);
  into.writeUInt16LE(f.links, at + 0x1a);
  into.writeUInt32LE(f.sectors % 2 ** 32, at + 0x1c);
  into.writeUInt32LE(f.flags, at + 0x20);
  f.iblock.copy(into, at + 0x28, 0, 60);
  into.writeUInt32LE((f.fileAcl ?? 0) % 2 ** 32, at + 0x68);
  into.writeUInt32LE(Math.floor(f.size / 2 ** 32), at + 0x6c);
  into.writeUInt16LE(Math.floor(f.sectors / 2 ** 32), at + 0x74);
  into.writeUInt16LE(Math.floor((f.fileAcl ?? 0) / 2 ** 32), at + 0x76);
  into.writeUInt16LE(f.uid >>> 16, at + 0x78);
  into.writeUInt16LE(f.gid >>> 16, at + 0x7a);
  into.writeUInt16LE(EXTRA_ISIZE, at + 0x80);
  into.writeUInt32LE(ctime.extra >>> 0, at + 0x84);
  into.writeUInt32LE(mtime.extra >>> 0, at + 0x88);
  into.writeUInt32LE(atime.extra >>> 0, at + 0x8c);
  into.writeUInt32LE(ctime.lo, at + 0x90); // i_crtime: when the image was made
  into.writeUInt32LE(ctime.extra >>> 0, at + 0x94);
  f.xattrs?.copy(into, at + INODE_XATTR_OFFSET);
}

/** A run of physical blocks mapped at a logical block of a file. */
export interface Extent {
  logical: number;
  start: number;
  length: number;
}

/** Splits a contiguous run into extents no longer than ext4 allows. */
export function extentsOf(start: number, blocks: number): Extent[] {
  const out: Extent[] = [];
  for (let done = 0; done < blocks; done += MAX_EXTENT_BLOCKS) {
    out.push({ logical: done, start: start + done, length: Math.min(MAX_EXTENT_BLOCKS, blocks - done) });
  }
  return out;
}

function writeExtentHeader(b: Buffer, at: number, entries: number, max: number, depth: number): void {
  b.writeUInt16LE(EXTENT_MAGIC, at);
  b.writeUInt16LE(entries, at + 2);
  b.writeUInt16LE(max, at + 4);
  b.writeUInt16LE(depth, at + 6);
}

function writeExtent(b: Buffer, at: number, e: Extent): void {
  b.writeUInt32LE(e.logical, at);
  b.writeUInt16LE(e.length, at + 4);
  b.writeUInt16LE(Math.floor(e.start / 2 ** 32), at + 6);
  b.writeUInt32LE(e.start % 2 ** 32, at + 8);
}

/**
 * An extent tree: the inode's i_block, and the leaf blocks it points to when the extents do not
 * fit in the inode (depth 1; `leafBlocks` are where those leaves go, one per 340 extents).
 */
export function encodeExtentTree(
  extents: Extent[],
  leafBlocks: number[],
): { iblock: Buffer; leaves: Buffer[] } {
  const iblock = Buffer.alloc(60);
  if (extents.length <= INODE_EXTENTS) {
    writeExtentHeader(iblock, 0, extents.length, INODE_EXTENTS, 0);
    for (const [i, e] of extents.entries()) writeExtent(iblock, 12 + 12 * i, e);
    return { iblock, leaves: [] };
  }
  const need = Math.ceil(extents.length / BLOCK_EXTENTS);
  if (need > INODE_EXTENTS) throw new RangeError(`a file of ${extents.length} extents is too large`);
  if (leafBlocks.length !== need) throw new RangeError(`${need} extent leaf blocks needed`);
  writeExtentHeader(iblock, 0, need, INODE_EXTENTS, 1);
  const leaves = leafBlocks.map((block, i) => {
    const part = extents.slice(i * BLOCK_EXTENTS, (i + 1) * BLOCK_EXTENTS);
    const leaf = Buffer.alloc(BLOCK_SIZE);
    writeExtentHeader(leaf, 0, part.length, BLOCK_EXTENTS, 0);
    for (const [j, e] of part.entries()) writeExtent(leaf, 12 + 12 * j, e);
    // The index entry: first logical block it covers, and the leaf's block.
    iblock.writeUInt32LE(part[0]!.logical, 12 + 12 * i);
    iblock.writeUInt32LE(block % 2 ** 32, 12 + 12 * i + 4);
    iblock.writeUInt16LE(Math.floor(block / 2 ** 32), 12 + 12 * i + 8);
    return leaf;
  });
  return { iblock, leaves };
}

/** Leaf blocks an extent tree of `n` extents needs (0 when they fit in the inode). */
export function extentLeafBlocks(n: number): number {
  return n <= INODE_EXTENTS ? 0 : Math.ceil(n / BLOCK_EXTENTS);
}

export interface DirEntry {
  ino: number;
  name: Buffer;
  type: number;
}

/** Linear directory blocks holding `.`, `..` and the entries, none split across blocks. */
export function encodeDirectory(self: number, parent: number, entries: DirEntry[], minBlocks = 1): Buffer {
  const all: DirEntry[] = [
    { ino: self, name: Buffer.from("."), type: FT.dir },
    { ino: parent, name: Buffer.from(".."), type: FT.dir },
    ...entries,
  ];
  const blocks: Buffer[] = [];
  let block = Buffer.alloc(BLOCK_SIZE);
  let at = 0;
  let last = -1;
  const close = () => {
    // The last entry's record reaches the end of the block.
    if (last >= 0) block.writeUInt16LE(BLOCK_SIZE - last, last + 4);
    blocks.push(block);
  };
  for (const e of all) {
    const rec = (8 + e.name.length + 3) & ~3;
    if (at + rec > BLOCK_SIZE) {
      close();
      block = Buffer.alloc(BLOCK_SIZE);
      at = 0;
    }
    block.writeUInt32LE(e.ino, at);
    block.writeUInt16LE(rec, at + 4);
    block.writeUInt8(e.name.length, at + 6);
    block.writeUInt8(e.type, at + 7);
    e.name.copy(block, at + 8);
    last = at;
    at += rec;
  }
  close();
  while (blocks.length < minBlocks) {
    // An empty block: one unused entry spanning it.
    const empty = Buffer.alloc(BLOCK_SIZE);
    empty.writeUInt16LE(BLOCK_SIZE, 4);
    blocks.push(empty);
  }
  return Buffer.concat(blocks);
}

/** jbd2's superblock for an empty, clean internal journal of `blocks` blocks. */
export function encodeJournalSuperblock(blocks: number, uuid: Buffer): Buffer {
  const b = Buffer.alloc(1024);
  b.writeUInt32BE(0xc03b3998, 0x0); // JBD2_MAGIC_NUMBER
  b.writeUInt32BE(4, 0x4); // JBD2_SUPERBLOCK_V2
  b.writeUInt32BE(BLOCK_SIZE, 0xc);
  b.writeUInt32BE(blocks, 0x10); // s_maxlen
  b.writeUInt32BE(1, 0x14); // s_first
  b.writeUInt32BE(1, 0x18); // s_sequence
  // s_start 0: nothing to replay.
  uuid.copy(b, 0x30, 0, 16);
  b.writeUInt32BE(1, 0x40); // s_nr_users
  return b;
}

/** A device number in i_block as the kernel stores it (ext4_update_other_inode's old/new encoding). */
export function encodeDevice(rdev: number): Buffer {
  // glibc's dev_t layout: major in bits 8–19, minor in bits 0–7 and 20–31.
  const major = Math.floor(rdev / 256) & 0xfff;
  const minor = (rdev & 0xff) | (Math.floor(rdev / 4096) & 0xfff00);
  const b = Buffer.alloc(60);
  if (major < 256 && minor < 256) b.writeUInt32LE((major << 8) | minor, 0);
  else b.writeUInt32LE(((minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12)) >>> 0, 4);
  return b;
}

const MiB = 1 << 20;

/** mke2fs's default journal size (ext2fs_default_journal_size) for a filesystem of `fsBytes`. */
export function journalBytes(fsBytes: number): number {
  const blocks = fsBytes / BLOCK_SIZE;
  if (blocks < 2048) return 0;
  if (blocks < 32768) return 4 * MiB;
  if (blocks < 256 * 1024) return 16 * MiB;
  if (blocks < 512 * 1024) return 32 * MiB;
  if (blocks < 4096 * 1024) return 64 * MiB;
  if (blocks < 8192 * 1024) return 128 * MiB;
  if (blocks < 16384 * 1024) return 256 * MiB;
  if (blocks < 32768 * 1024) return 512 * MiB;
  return 1024 * MiB;
}
