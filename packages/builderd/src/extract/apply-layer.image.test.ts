/**
 * applyLayer with imageData: content goes to the image's data area and the rootfs keeps
 * placeholders, while the tree (names, modes, owners, times, hard links, whiteouts) is exactly the
 * one applyLayer makes without it.
 */
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { Readable } from "node:stream";
import { InvalidArgumentError } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { BLOCK_SIZE, blocksFor, DATA_START_BLOCK, newNonce } from "../rootfs/ext4/data-area.js";
import { type EntrySpec, layerTar } from "../testing/oci-layout.js";
import { type ApplyLayerOptions, type ApplyLayerResult, applyLayer } from "./apply-layer.js";
import { LayerTooLargeError } from "./errors.js";
import { conformanceImages } from "./fixtures/conformance-images.js";
import { createImage, metadataIntact, placedFiles, resolvedSnapshot } from "./fixtures/image-data.js";
import { layerStream } from "./fixtures/layer-streams.js";
import { snapshotTree } from "./fixtures/tree-snapshot.js";

let tmp: { path: string; remove(): void };
let plain: string;
let placed: string;
let image: string;
let fd: number;
const nonce = newNonce();
/** Not the data area's first block, so that starting anywhere but at nextBlock shows. */
const START = DATA_START_BLOCK + 7;

beforeEach(() => {
  tmp = tempDir("kiln-apply-image-");
  plain = path.join(tmp.path, "plain");
  placed = path.join(tmp.path, "placed");
  fs.mkdirSync(plain);
  fs.mkdirSync(placed);
  image = path.join(tmp.path, "image.ext4");
  createImage(image, START);
  fd = fs.openSync(image, fs.constants.O_WRONLY);
});
afterEach(() => {
  fs.closeSync(fd);
  tmp.remove();
});

const T = new Date("2023-05-06T07:08:09Z");
const MiB = 1024 * 1024;
// Random content: an extent off by a block, or two files swapped, cannot match by chance.
const file = (p: string, size: number, more: Partial<EntrySpec> = {}): EntrySpec =>
  ({ type: "file", path: p, content: randomBytes(size), ...more }) as EntrySpec;

const lower: EntrySpec[] = [
  { type: "dir", path: "etc", mode: 0o750, uid: 3, gid: 4, mtime: T },
  file("etc/empty", 0, { mode: 0o600, uid: 5, gid: 6, mtime: T }),
  file("etc/one", 1, { mode: 0o4755, uid: 7, gid: 8, mtime: T }),
  file("block", BLOCK_SIZE),
  file("block-and-one", BLOCK_SIZE + 1, { mode: 0o2711 }),
  file("usr/big", MiB + 3),
  { type: "hardlink", path: "usr/big-link", target: "usr/big" },
  file("replaced", 5000),
  file("gone/f", 10),
];
const lowerBlocks = 1 + 1 + 2 + 257 + 2 + 1;
const upper: EntrySpec[] = [
  file("replaced", 3, { mode: 0o640, mtime: T }),
  { type: "file", path: ".wh.gone" },
  { type: "hardlink", path: "etc/one-link", target: "etc/one" },
  file("late", 2 * BLOCK_SIZE),
];
const upperBlocks = 1 + 2;

/** A layer's tar in odd-sized chunks, so that a file's content arrives in many pieces at many offsets. */
async function chunkedLayer(entries: EntrySpec[] | Buffer): Promise<Readable> {
  const tarBytes = Buffer.isBuffer(entries) ? entries : await layerTar(entries);
  const chunks: Buffer[] = [];
  for (let at = 0; at < tarBytes.length; at += 1000) chunks.push(tarBytes.subarray(at, at + 1000));
  return Readable.from(chunks);
}

/** Applies the layers to `plain` as before, and to `placed` with imageData, each layer continuing the last. */
async function applyBoth(layers: Array<EntrySpec[] | Buffer>, opts: Partial<ApplyLayerOptions> = {}) {
  const plainResults: ApplyLayerResult[] = [];
  const placedResults: ApplyLayerResult[] = [];
  let nextBlock = START;
  for (const layer of layers) {
    plainResults.push(await applyLayer(plain, await layerStream(layer), { maxBytes: 0, ...opts }));
    const r = await applyLayer(placed, await chunkedLayer(layer), {
      maxBytes: 0,
      ...opts,
      imageData: { fd, nonce, nextBlock },
    });
    placedResults.push(r);
    nextBlock = r.nextBlock!;
  }
  return { plainResults, placedResults };
}

describe("applyLayer with imageData", () => {
  it("puts each non-empty file's content in the image, block-aligned from nextBlock on, and a placeholder in its place", async () => {
    await applyBoth([lower]);
    const files = placedFiles(placed, nonce);
    expect(files.map((f) => [f.path, f.size])).toEqual([
      ["block", 64],
      ["block-and-one", 64],
      ["etc/empty", 0],
      ["etc/one", 64],
      ["gone/f", 64],
      ["replaced", 64],
      ["usr/big", 64],
      ["usr/big-link", 64],
    ]);
    for (const f of files)
      expect({ path: f.path, length: f.extent?.length }).toEqual({
        path: f.path,
        length: f.size === 0 ? undefined : fs.statSync(path.join(plain, f.path)).size,
      });
    // The content itself: resolved through the placeholders, the tree is the one written without them.
    expect(resolvedSnapshot(placed, image, nonce)).toEqual(snapshotTree(plain));
    // One extent per inode (hard links share one), back to back, each from a block of its own.
    const extents = [...new Map(files.filter((f) => f.extent).map((f) => [f.ino, f.extent!])).values()];
    let expected = START;
    for (const e of [...extents].sort((a, b) => a.block - b.block)) {
      expect(e.block).toBe(expected);
      expected += blocksFor(e.length);
    }
    expect(extents).toHaveLength(6);
    expect(expected).toBe(START + lowerBlocks);
    expect(metadataIntact(image, START)).toBe(true);
  });

  it("leaves the tree as it is without imageData: modes, owners, mtimes, hard links, overwrites, whiteouts", async () => {
    const { plainResults, placedResults } = await applyBoth([lower, upper]);
    const withoutContent = (root: string) => {
      const snap = snapshotTree(root);
      for (const n of Object.values(snap.nodes)) delete n.sha256;
      return snap;
    };
    expect(withoutContent(placed)).toEqual(withoutContent(plain));
    expect(resolvedSnapshot(placed, image, nonce)).toEqual(snapshotTree(plain));
    const ino = (rel: string) => fs.statSync(path.join(placed, rel)).ino;
    expect(ino("usr/big-link")).toBe(ino("usr/big"));
    expect(ino("etc/one-link")).toBe(ino("etc/one"));
    expect(fs.existsSync(path.join(placed, "gone"))).toBe(false);
    expect(placedResults.map(({ nextBlock: _, ...r }) => r)).toEqual(plainResults);
  });

  it("returns the block after the layer's content, where the next layer continues", async () => {
    const { placedResults } = await applyBoth([lower, upper]);
    expect(placedResults.map((r) => r.nextBlock)).toEqual([
      START + lowerBlocks,
      START + lowerBlocks + upperBlocks,
    ]);
    const byPath = new Map(placedFiles(placed, nonce).map((f) => [f.path, f.extent]));
    // The upper layer's files follow the lower layer's content, in entry order.
    expect(byPath.get("replaced")).toEqual({ block: START + lowerBlocks, length: 3 });
    expect(byPath.get("late")).toEqual({ block: START + lowerBlocks + 1, length: 2 * BLOCK_SIZE });
  });

  it("keeps empty files empty, with no blocks, and returns nextBlock unchanged for a layer without content", async () => {
    const { placedResults } = await applyBoth([
      [file("empty", 0, { mode: 0o751, uid: 9, mtime: T }), { type: "dir", path: "d" }],
    ]);
    expect(placedResults[0]!.nextBlock).toBe(START);
    expect(fs.statSync(path.join(placed, "empty")).size).toBe(0);
    expect(snapshotTree(placed)).toEqual(snapshotTree(plain));
    expect(fs.statSync(image).size).toBe(START * BLOCK_SIZE);
  });

  it("gives the conformance images the same tree as without imageData", async () => {
    for (const [name, spec] of Object.entries(conformanceImages)) {
      for (const dir of [plain, placed]) fs.rmSync(dir, { recursive: true, force: true });
      fs.mkdirSync(plain);
      fs.mkdirSync(placed);
      await applyBoth(spec.layers);
      expect({ name, tree: resolvedSnapshot(placed, image, nonce) }).toEqual({
        name,
        tree: snapshotTree(plain),
      });
    }
  });

  it("counts content bytes, not blocks, against maxBytes, and still refuses a layer over it", async () => {
    // Ten 1-byte files take ten blocks but only ten bytes of budget.
    const tiny = Array.from({ length: 10 }, (_, i) => file(`t${i}`, 1));
    const { placedResults } = await applyBoth([tiny], { maxBytes: 10 });
    expect(placedResults[0]).toMatchObject({ bytesWritten: 10, nextBlock: START + 10 });

    const many = Array.from({ length: 50 }, (_, i) => file(`f${String(i).padStart(2, "0")}`, 100 * 1024));
    const err = await applyLayer(placed, await layerStream(many), {
      maxBytes: MiB,
      imageData: { fd, nonce, nextBlock: START + 10 },
    }).catch((e) => e);
    expect(err).toBeInstanceOf(LayerTooLargeError);
    expect(err.message).toContain('"f10"');
    // f10 was refused from its declared size, before any of it reached the image.
    expect(fs.statSync(image).size).toBe((START + 10 + 10 * blocksFor(100 * 1024)) * BLOCK_SIZE);
  });

  it("carries extended attributes in placeholders: on files, empty files and hard links, and says what it drops", async () => {
    const raw = (name: string, header: Record<string, unknown>, content = Buffer.alloc(0)): EntrySpec => ({
      type: "raw",
      header: { name, mode: 0o755, size: content.length, ...header },
      content,
    });
    const { placedResults } = await applyBoth([
      [
        raw(
          "tool",
          { type: "file", pax: { "SCHILY.xattr.security.capability": "cap", "SCHILY.xattr.user.é": "ü" } },
          Buffer.from("bin"),
        ),
        raw("empty", {
          type: "file",
          pax: { "LIBARCHIVE.xattr.user.%C3%A9": Buffer.from([0xff, 0x80]).toString("base64") },
        }),
        raw("tool-link", { type: "link", linkname: "tool", pax: { "SCHILY.xattr.user.more": "m" } }),
        raw("dir", { type: "directory", pax: { "SCHILY.xattr.user.d": "d" } }),
        raw("acl", { type: "file", pax: { "SCHILY.xattr.system.posix_acl_access": "x" } }, Buffer.from("a")),
      ],
    ]);
    const byPath = new Map(placedFiles(placed, nonce).map((f) => [f.path, f]));
    const attrs = (p: string) =>
      Object.fromEntries((byPath.get(p)?.xattrs ?? []).map((a) => [a.name, a.value.toString("hex")]));
    const hex = (s: string) => Buffer.from(s).toString("hex");
    // The link's attribute lands on the inode both names share, beside the file's own.
    expect(attrs("tool")).toEqual({
      "security.capability": hex("cap"),
      "user.é": hex("ü"),
      "user.more": hex("m"),
    });
    expect(attrs("tool-link")).toEqual(attrs("tool"));
    expect(byPath.get("tool")!.extent).toMatchObject({ length: 3 });
    expect(attrs("empty")).toEqual({ "user.é": "ff80" });
    expect(byPath.get("empty")!.extent).toMatchObject({ length: 0 });
    expect(attrs("acl")).toEqual({});
    expect(placedResults[0]!.skipped).toEqual([
      {
        path: "dir",
        reason: "2 extended attributes not kept in this layer; the first, user.d: not kept on a directory",
      },
    ]);
    // The tree is the same as without imageData, but for the placeholders.
    expect(resolvedSnapshot(placed, image, nonce)).toEqual(snapshotTree(plain));
  });

  it("counts kept extended attributes against maxBytes: a layer of empty files with big ones is refused", async () => {
    const big = Buffer.alloc(3000, 0x61).toString();
    const files: EntrySpec[] = Array.from({ length: 20 }, (_, i) => ({
      type: "raw",
      header: {
        name: `e${String(i).padStart(2, "0")}`,
        type: "file",
        size: 0,
        pax: { "SCHILY.xattr.user.big": big },
      },
    }));
    const err = await applyLayer(placed, await layerStream(files), {
      maxBytes: 10 * 3000,
      imageData: { fd, nonce, nextBlock: START },
    }).catch((e) => e);
    expect(err).toBeInstanceOf(LayerTooLargeError);
    expect(err.message).toContain('"e09"');
    const { placedResults } = await applyBoth([files.slice(0, 2)]);
    expect(placedResults[0]!.bytesWritten).toBe(2 * (3000 + "user.big".length));
  });

  it("refuses a nextBlock inside the image's metadata blocks", async () => {
    const err = await applyLayer(placed, await layerStream([file("f", 1)]), {
      maxBytes: 0,
      imageData: { fd, nonce, nextBlock: DATA_START_BLOCK - 1 },
    }).catch((e) => e);
    expect(err).toBeInstanceOf(InvalidArgumentError);
    expect(err.message).toMatch(/nextBlock 64 is not in the image's data area/);
    expect(fs.readdirSync(placed)).toEqual([]);
  });

  it("says where it was writing when a filesystem is full (write errors name no file)", async () => {
    // /dev/full answers every write with ENOSPC, as a full filesystem would.
    const full = fs.openSync("/dev/full", fs.constants.O_WRONLY);
    try {
      const err = await applyLayer(placed, await layerStream([file("f", 10)]), {
        maxBytes: 0,
        imageData: { fd: full, nonce, nextBlock: START },
      }).catch((e) => e);
      expect(err.message).toBe(
        `extracting layer entry "f" failed: ENOSPC: no space left on device, write (no space: the tree is written in ${placed}, file content into the build's image file)`,
      );
    } finally {
      fs.closeSync(full);
    }
  });
});
