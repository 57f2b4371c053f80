/**
 * Kiln's ext4 writer: makes the image of a rootfs tree whose file content is already in the image
 * file (data-area.ts), adding only the metadata around it. Where `mkfs.ext4 -d` reads every file
 * of the tree and writes it again, this reads only the tree's metadata and the few files that are
 * not yet in the image (those init injected or optimization rewrote), so a build writes its
 * content once.
 *
 * Layout, all in 4 KiB blocks: block 0 the superblock, then the group descriptors, then from
 * DATA_START_BLOCK the content the extractor appended, then what this writer appends (files it
 * copies, directories, long symlink targets, extent leaves), then the journal, the block and
 * inode bitmaps and the inode tables (flex_bg lets them live anywhere), then free space. There
 * are no backup superblocks (sparse_super2 with none), so content runs across group boundaries.
 * Blocks of content a later layer replaced or deleted stay in the data area as free blocks.
 *
 * Synchronous on purpose, like the extractor: it runs in the applier's worker thread.
 */
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import { FailedPreconditionError, InternalError } from "@kiln/kit/errors";
import { writeAllSync } from "@kiln/kit/fs";
import {
  BLOCK_SIZE,
  blocksFor,
  DATA_START_BLOCK,
  type DataExtent,
  decodePlaceholder,
  MAX_IMAGE_BYTES,
  placeholderSized,
} from "./data-area.js";
import {
  BLOCKS_PER_GROUP,
  DESC_SIZE,
  type DirEntry,
  EXTENTS_FL,
  type Extent,
  encodeDevice,
  encodeDirectory,
  encodeExtentTree,
  encodeGroupDesc,
  encodeInode,
  encodeJournalSuperblock,
  encodeSuperblock,
  extentLeafBlocks,
  extentsOf,
  FAST_SYMLINK_MAX,
  FIRST_INO,
  FT,
  INODE_SIZE,
  INODE_XATTR_BYTES,
  JOURNAL_INO,
  journalBytes,
  MAX_LINKS,
  ROOT_INO,
} from "./format.js";
import { encodeInodeXattrs, encodeXattrBlock, type Xattr } from "./xattrs.js";

const MiB = 1 << 20;
const COPY_CHUNK = MiB;
/** lost+found gets 16 KiB, as mke2fs makes it, so e2fsck need not grow it. */
const LOST_FOUND_BLOCKS = 4;

export interface WriteImageOptions {
  /** The rootfs tree, with placeholders for content already in the image. */
  rootfs: string;
  /** The image file the content was written into (created if nothing was). */
  image: string;
  /** The build's placeholder nonce. */
  nonce: Buffer;
  /** First block after the extracted content (DATA_START_BLOCK when there is none). */
  nextBlock: number;
  /** Free space on top of the content (default 32 MiB)… */
  headroomBytes?: number;
  /** …or this fraction of the content, whichever is larger (default 0.1). */
  headroomRatio?: number;
  /** Filesystem label (default "rootfs"; at most 16 bytes). */
  label?: string;
}

export interface WrittenImage {
  sizeBytes: number;
  inodes: number;
  /** Bytes of file content in the image (what the tree holds). */
  contentBytes: number;
}

type Kind = "file" | "dir" | "symlink" | "chr" | "blk" | "fifo" | "sock";

/** What the inode keeps of a tree entry's lstat. */
interface Meta {
  mode: number;
  uid: number;
  gid: number;
  rdev: number;
  atimeNs: bigint;
  mtimeNs: bigint;
  ctimeNs: bigint;
}

interface Node {
  ino: number;
  kind: Kind;
  meta: Meta;
  links: number;
  /** Files: where the content is; directories and long symlinks: their blocks. */
  data?: DataExtent;
  entries?: Array<{ name: Buffer; node: Node }>;
  parent?: Node;
  target?: Buffer;
  /** Extent leaf blocks, when the extents do not fit in the inode. */
  leaves?: number[];
  /** Files: extended attributes, from the placeholder. */
  xattrs?: Xattr[];
  /** Where they went: the inode's own space, or a block of their own. */
  inodeXattrs?: Buffer;
  xattrBlock?: number;
}

/** Writes the image; returns its size. Throws FailedPreconditionError for trees ext4 cannot hold. */
export function writeExt4Image(opts: WriteImageOptions): WrittenImage {
  const label = opts.label ?? "rootfs";
  if (Buffer.byteLength(label) > 16) {
    throw new FailedPreconditionError(`ext4 label ${JSON.stringify(label)} must be at most 16 bytes`);
  }
  if (opts.nextBlock < DATA_START_BLOCK) {
    throw new InternalError(`image content cannot start before block ${DATA_START_BLOCK}`);
  }
  const fd = fs.openSync(opts.image, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o644);
  try {
    return write(fd, opts, label);
  } finally {
    fs.closeSync(fd);
  }
}

function write(fd: number, opts: WriteImageOptions, label: string): WrittenImage {
  let cursor = opts.nextBlock;
  const append = (buf: Buffer): number => {
    const at = cursor;
    writeAllSync(fd, buf, at * BLOCK_SIZE);
    cursor += blocksFor(buf.length);
    return at;
  };

  // 1. The tree: every inode once (hard links share one), numbered in walk order.
  const nodes: Node[] = [];
  const byInode = new Map<string, Node>();
  let nextIno = FIRST_INO + 1;
  let contentBytes = 0;
  const rootPath = Buffer.from(opts.rootfs);
  const root = newNode(rootPath, ROOT_INO, fs.lstatSync(rootPath, { bigint: true }));
  if (root.kind !== "dir") throw new FailedPreconditionError(`rootfs ${opts.rootfs} is not a directory`);
  let lostFound: Node | undefined;

  function newNode(p: Buffer, ino: number, st: fs.BigIntStats): Node {
    const meta: Meta = {
      mode: Number(st.mode),
      uid: Number(st.uid),
      gid: Number(st.gid),
      rdev: Number(st.rdev),
      atimeNs: st.atimeNs,
      mtimeNs: st.mtimeNs,
      ctimeNs: st.ctimeNs,
    };
    const node: Node = { ino, kind: kindOf(st, p), meta, links: 0 };
    nodes.push(node);
    if (node.kind === "file") placeFile(node, p, Number(st.size));
    else if (node.kind === "symlink") node.target = fs.readlinkSync(p, { encoding: "buffer" });
    return node;
  }

  function placeFile(node: Node, p: Buffer, size: number): void {
    // A file that may be a placeholder is read whole; if it is not one, those bytes are its content.
    const small = placeholderSized(size) ? readSmall(p, size) : undefined;
    if (small) {
      const ph = decodePlaceholder(small, opts.nonce);
      if (ph) {
        const end = ph.block + blocksFor(ph.length);
        if (ph.block < DATA_START_BLOCK || end > opts.nextBlock) {
          throw new InternalError(`placeholder ${p} points outside the image's content (${ph.block}…${end})`);
        }
        if (ph.length > 0) node.data = { block: ph.block, length: ph.length };
        if (ph.xattrs.length > 0) node.xattrs = ph.xattrs;
        contentBytes += ph.length;
        return;
      }
    }
    if (size === 0) return;
    node.data = { block: cursor, length: size };
    if (!small) copyInto(fd, p, cursor, size);
    else if (small.length === size) writeAllSync(fd, small, cursor * BLOCK_SIZE);
    else throw new InternalError(`${p} shrank while it was copied into the image`);
    cursor += blocksFor(size);
    contentBytes += size;
  }

  const walk = (dir: Node, dirPath: Buffer) => {
    const names = fs.readdirSync(dirPath, { encoding: "buffer" }).sort(Buffer.compare);
    dir.entries = [];
    for (const name of names) {
      const p = Buffer.concat([dirPath, SLASH, name]);
      let node: Node | undefined;
      const isLostFound = dir === root && name.equals(LOST_FOUND);
      const st = fs.lstatSync(p, { bigint: true });
      const key = `${st.dev}:${st.ino}`;
      if (!st.isDirectory() && st.nlink > 1n) node = byInode.get(key);
      if (!node) {
        node = newNode(p, isLostFound && st.isDirectory() ? FIRST_INO : nextIno++, st);
        if (node.ino === FIRST_INO) lostFound = node;
        if (!st.isDirectory() && st.nlink > 1n) byInode.set(key, node);
      }
      if (++node.links > MAX_LINKS && node.kind !== "dir") {
        throw new FailedPreconditionError(`${p} has more than ${MAX_LINKS} hard links, ext4's limit`);
      }
      dir.entries.push({ name, node });
      if (node.kind === "dir") {
        node.parent = dir;
        walk(node, p);
      }
    }
  };
  walk(root, rootPath);
  if (!lostFound && !root.entries!.some((e) => e.name.equals(LOST_FOUND))) {
    const now = BigInt(Date.now()) * 1_000_000n;
    const meta: Meta = { mode: 0o40700, uid: 0, gid: 0, rdev: 0, atimeNs: now, mtimeNs: now, ctimeNs: now };
    lostFound = { ino: FIRST_INO, kind: "dir", meta, links: 1, entries: [], parent: root };
    nodes.push(lostFound);
    root.entries!.push({ name: LOST_FOUND, node: lostFound });
    root.entries!.sort((a, b) => Buffer.compare(a.name, b.name));
  }

  // 2. Directories, long symlink targets and extent leaves, after the content.
  for (const node of nodes) {
    if (node.kind === "dir") {
      const entries: DirEntry[] = node.entries!.map((e) => ({
        ino: e.node.ino,
        name: e.name,
        type: FT[e.node.kind],
      }));
      const blocks = encodeDirectory(
        node.ino,
        (node.parent ?? node).ino,
        entries,
        node === lostFound ? LOST_FOUND_BLOCKS : 1,
      );
      node.data = { block: append(blocks), length: blocks.length };
    } else if (node.kind === "symlink" && node.target!.length >= FAST_SYMLINK_MAX) {
      node.data = { block: append(node.target!), length: node.target!.length };
    }
  }
  // Extended attributes: in the inode when they fit, else in a block of their own.
  for (const node of nodes) {
    if (!node.xattrs) continue;
    node.inodeXattrs = encodeInodeXattrs(node.xattrs, INODE_XATTR_BYTES);
    if (node.inodeXattrs) continue;
    const block = encodeXattrBlock(node.xattrs);
    // Extraction keeps only attributes that fit a block (extract/xattrs.ts).
    if (!block) throw new InternalError(`inode ${node.ino}'s extended attributes do not fit an ext4 block`);
    node.xattrBlock = append(block);
  }
  for (const node of nodes) {
    const n = node.data ? extentsOf(node.data.block, blocksFor(node.data.length)).length : 0;
    const leaves = extentLeafBlocks(n);
    if (leaves > 0) {
      node.leaves = Array.from({ length: leaves }, (_, i) => cursor + i);
      cursor += leaves;
    }
  }

  // 3. Size: content plus headroom, a journal as mke2fs would make, bitmaps and inode tables.
  const usedInodes = nextIno - 1;
  const contentBlocks = cursor - DATA_START_BLOCK;
  const headroom = Math.max(
    opts.headroomBytes ?? 32 * MiB,
    (opts.headroomRatio ?? 0.1) * contentBlocks * BLOCK_SIZE,
  );
  const wantedInodes = Math.max(Math.ceil(nodes.length * 1.2) + 4096, usedInodes);
  // At most 512 MiB: four extents, all the inode holds.
  const journalBlocks = Math.min(journalBytes(cursor * BLOCK_SIZE + headroom), 512 * MiB) / BLOCK_SIZE;
  // The metadata's size depends on the group count, which depends on the size: settle both.
  const fixed = cursor + journalBlocks + blocksFor(headroom);
  let layout = planGroups(fixed, wantedInodes);
  let totalBlocks: number;
  for (;;) {
    // Inodes may need more groups than the blocks do (many small files): the last group then
    // still has to exist, with a few MiB of its own.
    totalBlocks = Math.max(
      roundUp(fixed + layout.metaBlocks, MiB / BLOCK_SIZE),
      (layout.groups - 1) * BLOCKS_PER_GROUP + (4 * MiB) / BLOCK_SIZE,
    );
    const next = planGroups(totalBlocks, wantedInodes);
    if (next.groups === layout.groups && next.inodesPerGroup === layout.inodesPerGroup) break;
    layout = next;
  }
  const { groups, inodesPerGroup, tableBlocks } = layout;
  const gdtBlocks = blocksFor(groups * DESC_SIZE);
  if (1 + gdtBlocks > DATA_START_BLOCK || totalBlocks * BLOCK_SIZE > MAX_IMAGE_BYTES) {
    throw new FailedPreconditionError(
      `the rootfs needs an image of ${totalBlocks * BLOCK_SIZE} bytes, over Kiln's ext4 writer's ${MAX_IMAGE_BYTES}`,
    );
  }
  const journalStart = cursor;
  const blockBitmaps = journalStart + journalBlocks;
  const inodeBitmaps = blockBitmaps + groups;
  const inodeTables = inodeBitmaps + groups;
  const metaEnd = inodeTables + groups * tableBlocks;

  // 4. Block bitmap: every block something owns, each owned once.
  const bitmap = Buffer.alloc(groups * BLOCK_SIZE);
  const claim = (start: number, count: number, what: string) => {
    for (let b = start; b < start + count; b++) {
      const byte = b >> 3;
      const bit = 1 << (b & 7);
      if (bitmap[byte]! & bit) throw new InternalError(`block ${b} of the image is claimed twice (${what})`);
      bitmap[byte]! |= bit;
    }
  };
  claim(0, 1 + gdtBlocks, "superblock and group descriptors");
  for (const node of nodes) {
    if (node.data) claim(node.data.block, blocksFor(node.data.length), `inode ${node.ino}`);
    for (const leaf of node.leaves ?? []) claim(leaf, 1, `inode ${node.ino}'s extents`);
    if (node.xattrBlock !== undefined) claim(node.xattrBlock, 1, `inode ${node.ino}'s extended attributes`);
  }
  claim(journalStart, metaEnd - journalStart, "journal, bitmaps and inode tables");
  setBits(bitmap, totalBlocks, groups * BLOCKS_PER_GROUP);

  // 5. Inodes.
  const table = Buffer.alloc(usedInodes * INODE_SIZE);
  const usedDirs = new Array<number>(groups).fill(0);
  const uuid = randomUuid();
  for (const node of nodes) {
    writeInode(fd, node, table);
    if (node.kind === "dir") usedDirs[Math.floor((node.ino - 1) / inodesPerGroup)]!++;
  }
  const journal = journalBlocks > 0 ? writeJournal(fd, table, journalStart, journalBlocks, uuid) : undefined;

  // 6. Inode bitmaps: the reserved inodes and every one used, padding past the group set.
  // Inodes are numbered from 1 without gaps, so a group's used ones are a prefix of it.
  const inodesUsedIn = (g: number) => Math.min(inodesPerGroup, Math.max(0, usedInodes - g * inodesPerGroup));
  const inodeBitmap = Buffer.alloc(groups * BLOCK_SIZE);
  for (let g = 0; g < groups; g++) {
    const base = g * BLOCK_SIZE * 8;
    setBits(inodeBitmap, base, base + inodesUsedIn(g));
    setBits(inodeBitmap, base + inodesPerGroup, base + BLOCK_SIZE * 8);
  }

  // 7. Group descriptors and superblock.
  const gdt = Buffer.alloc(gdtBlocks * BLOCK_SIZE);
  let freeBlocks = 0;
  let freeInodes = 0;
  for (let g = 0; g < groups; g++) {
    const first = g * BLOCKS_PER_GROUP;
    const last = Math.min(totalBlocks, first + BLOCKS_PER_GROUP);
    let free = 0;
    for (let b = first; b < last; b++) if (!(bitmap[b >> 3]! & (1 << (b & 7)))) free++;
    freeBlocks += free;
    freeInodes += inodesPerGroup - inodesUsedIn(g);
    encodeGroupDesc(
      {
        blockBitmap: blockBitmaps + g,
        inodeBitmap: inodeBitmaps + g,
        inodeTable: inodeTables + g * tableBlocks,
        freeBlocks: free,
        freeInodes: inodesPerGroup - inodesUsedIn(g),
        usedDirs: usedDirs[g]!,
      },
      gdt,
      g * DESC_SIZE,
    );
  }
  writeAllSync(fd, bitmap, blockBitmaps * BLOCK_SIZE);
  writeAllSync(fd, inodeBitmap, inodeBitmaps * BLOCK_SIZE);
  writeAllSync(fd, table, inodeTables * BLOCK_SIZE);
  writeAllSync(fd, gdt, BLOCK_SIZE);
  const sb = encodeSuperblock({
    inodesCount: groups * inodesPerGroup,
    blocksCount: totalBlocks,
    freeBlocks,
    freeInodes,
    inodesPerGroup,
    now: Math.floor(Date.now() / 1000),
    uuid,
    hashSeed: randomUuid(),
    label,
    journal: journal && { iblock: journal, sizeBytes: journalBlocks * BLOCK_SIZE },
  });
  // Block 0: 1024 bytes of boot area (zero), then the superblock.
  writeAllSync(fd, Buffer.concat([Buffer.alloc(1024), sb, Buffer.alloc(BLOCK_SIZE - 2048)]), 0);
  fs.ftruncateSync(fd, totalBlocks * BLOCK_SIZE);
  return { sizeBytes: totalBlocks * BLOCK_SIZE, inodes: groups * inodesPerGroup, contentBytes };
}

/** Groups for `blocks` blocks and `inodes` inodes, and the blocks their bitmaps and tables take. */
function planGroups(blocks: number, inodes: number) {
  const groups = Math.max(Math.ceil(blocks / BLOCKS_PER_GROUP), Math.ceil(inodes / (BLOCK_SIZE * 8)));
  // Whole inode-table blocks: a multiple of 16 inodes per group.
  const inodesPerGroup = Math.min(
    BLOCK_SIZE * 8,
    roundUp(Math.ceil(inodes / groups), BLOCK_SIZE / INODE_SIZE),
  );
  const tableBlocks = (inodesPerGroup * INODE_SIZE) / BLOCK_SIZE;
  return { groups, inodesPerGroup, tableBlocks, metaBlocks: groups * (2 + tableBlocks) };
}

function writeInode(fd: number, node: Node, table: Buffer): void {
  const { meta } = node;
  let iblock: Buffer = Buffer.alloc(60);
  let flags = 0;
  let sectors = 0;
  let size = 0;
  if (node.data) {
    const blocks = blocksFor(node.data.length);
    const extents: Extent[] = extentsOf(node.data.block, blocks);
    const tree = encodeExtentTree(extents, node.leaves ?? []);
    tree.leaves.forEach((leaf, i) => {
      writeAllSync(fd, leaf, node.leaves![i]! * BLOCK_SIZE);
    });
    iblock = tree.iblock;
    flags = EXTENTS_FL;
    sectors = (blocks + tree.leaves.length) * (BLOCK_SIZE / 512);
    size = node.data.length;
  } else if (node.kind === "file") {
    // An empty file still gets an (empty) extent tree, as the kernel makes one.
    iblock = encodeExtentTree([], []).iblock;
    flags = EXTENTS_FL;
  } else if (node.kind === "symlink") {
    node.target!.copy(iblock);
    size = node.target!.length;
  } else if (node.kind === "chr" || node.kind === "blk") {
    iblock = encodeDevice(meta.rdev);
  }
  if (node.xattrBlock !== undefined) sectors += BLOCK_SIZE / 512;
  const subdirs = node.entries?.filter((e) => e.node.kind === "dir").length ?? 0;
  const links = node.kind === "dir" ? (2 + subdirs > MAX_LINKS ? 1 : 2 + subdirs) : node.links;
  encodeInode(
    {
      ...meta,
      size,
      links,
      sectors,
      flags,
      iblock,
      fileAcl: node.xattrBlock,
      xattrs: node.inodeXattrs,
    },
    table,
    (node.ino - 1) * INODE_SIZE,
  );
}

/** An empty journal in `blocks` blocks from `start`, and its inode (8); returns the inode's i_block. */
function writeJournal(fd: number, table: Buffer, start: number, blocks: number, uuid: Buffer): Buffer {
  const { iblock } = encodeExtentTree(extentsOf(start, blocks), []);
  const now = BigInt(Date.now()) * 1_000_000n;
  encodeInode(
    {
      mode: 0o100600,
      uid: 0,
      gid: 0,
      size: blocks * BLOCK_SIZE,
      links: 1,
      sectors: blocks * (BLOCK_SIZE / 512),
      flags: EXTENTS_FL,
      iblock,
      atimeNs: now,
      mtimeNs: now,
      ctimeNs: now,
    },
    table,
    (JOURNAL_INO - 1) * INODE_SIZE,
  );
  writeAllSync(fd, encodeJournalSuperblock(blocks, uuid), start * BLOCK_SIZE);
  return iblock;
}

const SLASH = Buffer.from("/");
const LOST_FOUND = Buffer.from("lost+found");

function kindOf(st: fs.BigIntStats, p: Buffer): Kind {
  if (st.isFile()) return "file";
  if (st.isDirectory()) return "dir";
  if (st.isSymbolicLink()) return "symlink";
  if (st.isCharacterDevice()) return "chr";
  if (st.isBlockDevice()) return "blk";
  if (st.isFIFO()) return "fifo";
  if (st.isSocket()) return "sock";
  throw new InternalError(`${p} has an unknown file type`);
}

function readSmall(p: Buffer, size: number): Buffer {
  const fd = fs.openSync(p, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  try {
    const b = Buffer.alloc(size);
    const n = fs.readSync(fd, b, 0, b.length, 0);
    return b.subarray(0, n);
  } finally {
    fs.closeSync(fd);
  }
}

/** Copies a file of the tree into the image at `block`. */
function copyInto(out: number, p: Buffer, block: number, size: number): void {
  const fd = fs.openSync(p, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  try {
    const buf = Buffer.allocUnsafe(Math.min(COPY_CHUNK, size));
    let done = 0;
    while (done < size) {
      const n = fs.readSync(fd, buf, 0, Math.min(buf.length, size - done), done);
      if (n === 0) throw new InternalError(`${p} shrank while it was copied into the image`);
      writeAllSync(out, buf.subarray(0, n), block * BLOCK_SIZE + done);
      done += n;
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** Sets bits [from, to) of a bitmap (bit i is bit i%8 of byte i/8, as ext4's). */
function setBits(map: Buffer, from: number, to: number): void {
  let i = from;
  for (; i < to && i & 7; i++) map[i >> 3]! |= 1 << (i & 7);
  const whole = (to - i) >> 3;
  map.fill(0xff, i >> 3, (i >> 3) + whole);
  for (i += whole * 8; i < to; i++) map[i >> 3]! |= 1 << (i & 7);
}

function roundUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

function randomUuid(): Buffer {
  const b = randomBytes(16);
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  return b;
}
