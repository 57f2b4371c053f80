import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { readXattrs, snapshotTree } from "../../extract/fixtures/tree-snapshot.js";
import {
  BLOCK_SIZE,
  blocksFor,
  DATA_START_BLOCK,
  encodePlaceholder,
  newNonce,
  PLACEHOLDER_BYTES,
} from "./data-area.js";
import { fsckImage, snapshotImage, withMountedImage } from "./testing/image-tree.js";
import { writeExt4Image } from "./writer.js";

let tmp: { path: string; remove(): void };
let root: string;
let image: string;
beforeEach(() => {
  tmp = tempDir("kiln-ext4-writer-");
  root = path.join(tmp.path, "root");
  image = path.join(tmp.path, "rootfs.ext4");
  fs.mkdirSync(root, { mode: 0o755 });
  fs.chmodSync(root, 0o755);
});
afterEach(() => tmp.remove());

async function expectCleanImageOf(tree: string) {
  const fsck = await fsckImage(image);
  expect(fsck.clean, fsck.output).toBe(true);
  const ours = await snapshotImage(image);
  const theirs = snapshotTree(tree);
  expect(Object.keys(ours.nodes)).toEqual(Object.keys(theirs.nodes));
  expect(ours.nodes).toEqual(theirs.nodes);
  expect(ours.hardlinkGroups).toEqual(theirs.hardlinkGroups);
}

/** Superblock fields, as dumpe2fs prints them. */
function superblock(): Record<string, string> {
  const out = execFileSync("dumpe2fs", ["-h", image], {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "ignore"],
  });
  return Object.fromEntries(
    out
      .split("\n")
      .filter((l) => l.includes(":"))
      .map((l) => [l.slice(0, l.indexOf(":")).trim(), l.slice(l.indexOf(":") + 1).trim()]),
  );
}

describe("writeExt4Image", () => {
  it("copies a tree it finds no placeholders in: every type, mode, owner, time and hard link", async () => {
    const p = (rel: string) => path.join(root, rel);
    fs.mkdirSync(p("usr/bin"), { recursive: true });
    fs.mkdirSync(p("tmp"), { mode: 0o1777 });
    fs.chmodSync(p("tmp"), 0o1777);
    fs.writeFileSync(p("empty"), "");
    fs.writeFileSync(p("one"), "x");
    fs.writeFileSync(p("block"), Buffer.alloc(BLOCK_SIZE, 1));
    fs.writeFileSync(p("block-and-one"), Buffer.alloc(BLOCK_SIZE + 1, 2));
    fs.writeFileSync(p("usr/bin/tool"), Buffer.alloc(3 * 1024 * 1024 + 7, 3));
    fs.chownSync(p("usr/bin/tool"), 70000, 65534);
    fs.chmodSync(p("usr/bin/tool"), 0o4755);
    fs.linkSync(p("usr/bin/tool"), p("tool-link"));
    fs.symlinkSync("usr/bin/tool", p("fast"));
    fs.symlinkSync(`/${"long/".repeat(20)}target`, p("slow"));
    fs.writeFileSync(p("name with spaces ü"), "unicode");
    execFileSync("mkfifo", [p("fifo")]);
    fs.utimesSync(p("one"), new Date("1969-07-20T20:17:40.5Z"), new Date("1969-07-20T20:17:40.123Z"));
    fs.utimesSync(p("block"), 1_700_000_000.987654, 1_700_000_000.123456);
    writeExt4Image({ rootfs: root, image, nonce: newNonce(), nextBlock: DATA_START_BLOCK });
    await expectCleanImageOf(root);
  });

  it("maps placeholders to the content already in the image, and copies other 64-byte files", async () => {
    const nonce = newNonce();
    const content = Buffer.from("content the extractor put into the image\n".repeat(500));
    fs.writeFileSync(image, "");
    const fd = fs.openSync(image, "r+");
    fs.writeSync(fd, content, 0, content.length, DATA_START_BLOCK * BLOCK_SIZE);
    fs.closeSync(fd);
    fs.writeFileSync(
      path.join(root, "placed"),
      encodePlaceholder(nonce, { block: DATA_START_BLOCK, length: content.length }),
    );
    fs.linkSync(path.join(root, "placed"), path.join(root, "placed-link"));
    // Same size and magic, another build's nonce: content, not a placeholder.
    const foreign = encodePlaceholder(newNonce(), { block: DATA_START_BLOCK, length: 5 });
    fs.writeFileSync(path.join(root, "foreign"), foreign);
    // Whole seconds: the expected tree below is made with cpSync, whose times are not exact to the ns.
    for (const name of ["placed", "foreign"])
      fs.utimesSync(path.join(root, name), 1_600_000_000, 1_600_000_000);
    const written = writeExt4Image({
      rootfs: root,
      image,
      nonce,
      nextBlock: DATA_START_BLOCK + blocksFor(content.length),
    });
    expect(written.contentBytes).toBe(content.length + PLACEHOLDER_BYTES);

    // What the image holds is the tree with each placeholder's content in its place.
    for (const name of ["placed", "foreign"])
      fs.utimesSync(path.join(root, name), 1_600_000_000, 1_600_000_000);
    const expected = path.join(tmp.path, "expected");
    fs.cpSync(root, expected, { recursive: true, preserveTimestamps: true });
    fs.rmSync(path.join(expected, "placed-link"));
    fs.writeFileSync(path.join(expected, "placed"), content);
    fs.linkSync(path.join(expected, "placed"), path.join(expected, "placed-link"));
    const placed = fs.statSync(path.join(root, "placed"));
    fs.utimesSync(path.join(expected, "placed"), placed.atime, placed.mtime);
    await expectCleanImageOf(expected);
  });

  it("refuses a placeholder that points outside the content the extractor wrote", () => {
    const nonce = newNonce();
    fs.writeFileSync(
      path.join(root, "bad"),
      encodePlaceholder(nonce, { block: DATA_START_BLOCK, length: 3 * BLOCK_SIZE }),
    );
    expect(() => writeExt4Image({ rootfs: root, image, nonce, nextBlock: DATA_START_BLOCK + 2 })).toThrow(
      /points outside the image's content/,
    );
  });

  it("gives a tree of many small files the groups its inodes need", async () => {
    // Over 32768 inodes (one group's most) in a few MiB of content. On tmpfs: creating 30,000
    // files on this disk would take seconds.
    const shm = fs.mkdtempSync(
      path.join(fs.existsSync("/dev/shm") ? "/dev/shm" : tmp.path, "kiln-ext4-many-"),
    );
    try {
      const tree = path.join(shm, "root");
      fs.mkdirSync(tree, { mode: 0o755 });
      for (let d = 0; d < 30; d++) {
        fs.mkdirSync(path.join(tree, `d${d}`));
        for (let i = 0; i < 1000; i++) fs.writeFileSync(path.join(tree, `d${d}`, `f${i}`), "");
      }
      writeExt4Image({ rootfs: tree, image, nonce: newNonce(), nextBlock: DATA_START_BLOCK });
      const fsck = await fsckImage(image);
      expect(fsck.clean, fsck.output).toBe(true);
      const sb = superblock();
      expect(Number(sb["Inode count"])).toBeGreaterThanOrEqual(Math.ceil(30_031 * 1.2) + 4096);
      const groups = Math.ceil(Number(sb["Block count"]) / Number(sb["Blocks per group"]));
      expect(groups * Number(sb["Inodes per group"])).toBe(Number(sb["Inode count"]));
      expect(groups).toBeGreaterThan(1);
    } finally {
      fs.rmSync(shm, { recursive: true, force: true });
    }
  });

  it("spreads a large directory over several blocks, and sizes the image with headroom and spare inodes", async () => {
    const dir = path.join(root, "many");
    fs.mkdirSync(dir);
    for (let i = 0; i < 3000; i++) fs.writeFileSync(path.join(dir, `entry-with-a-longer-name-${i}`), `${i}`);
    const written = writeExt4Image({ rootfs: root, image, nonce: newNonce(), nextBlock: DATA_START_BLOCK });
    await expectCleanImageOf(root);
    const sb = superblock();
    const freeBytes = Number(sb["Free blocks"]) * BLOCK_SIZE;
    expect(freeBytes).toBeGreaterThanOrEqual(32 * 1024 * 1024);
    expect(Number(sb["Inode count"])).toBeGreaterThanOrEqual(Math.ceil(3003 * 1.2) + 4096);
    expect(Number(sb["Block count"]) * BLOCK_SIZE).toBe(written.sizeBytes);
    expect(fs.statSync(image).size).toBe(written.sizeBytes);
    expect(sb["Filesystem features"]).toMatch(/has_journal/);
    expect(sb["Filesystem volume name"]).toBe("rootfs");
  });

  it.skipIf(process.getuid?.() !== 0)(
    "stores placeholders' extended attributes in the inode, or in a block when they do not fit, as the kernel reads them",
    async () => {
      const nonce = newNonce();
      const content = Buffer.from("#!/bin/sh\necho hi\n");
      fs.writeFileSync(image, "");
      const fd = fs.openSync(image, "r+");
      fs.writeSync(fd, content, 0, content.length, DATA_START_BLOCK * BLOCK_SIZE);
      fs.closeSync(fd);
      // cap_net_bind_service and cap_setuid, effective: a byte (0x80) no UTF-8 string holds.
      const capability = Buffer.from("0100000280040000000000000000000000000000", "hex");
      const small = [
        { name: "security.capability", value: capability },
        { name: "user.empty", value: Buffer.alloc(0) },
      ];
      const big = [
        { name: "user.big", value: Buffer.alloc(1500, 0xab) },
        { name: "trusted.t", value: Buffer.from("x") },
        { name: "user.a", value: Buffer.from([0, 1, 2]) },
      ];
      const put = (name: string, extent: { block: number; length: number }, xattrs = small) =>
        fs.writeFileSync(path.join(root, name), encodePlaceholder(nonce, extent, xattrs), { mode: 0o755 });
      put("tool", { block: DATA_START_BLOCK, length: content.length });
      put("empty-with-attrs", { block: DATA_START_BLOCK + 1, length: 0 }, big);
      fs.linkSync(path.join(root, "empty-with-attrs"), path.join(root, "link"));
      fs.writeFileSync(path.join(root, "plain"), "no attributes");
      writeExt4Image({ rootfs: root, image, nonce, nextBlock: DATA_START_BLOCK + 1 });

      const fsck = await fsckImage(image);
      expect(fsck.clean, fsck.output).toBe(true);
      const hex = (attrs: typeof small) =>
        Object.fromEntries(attrs.map((a) => [a.name, a.value.toString("hex")]));
      await withMountedImage(image, (dir) => {
        const attrs = readXattrs(dir);
        expect(attrs.get("tool")).toEqual(hex(small));
        expect(attrs.get("empty-with-attrs")).toEqual(hex(big));
        expect(attrs.get("link")).toEqual(hex(big));
        expect(attrs.has("plain")).toBe(false);
        expect(fs.readFileSync(path.join(dir, "tool"))).toEqual(content);
        expect(fs.statSync(path.join(dir, "empty-with-attrs")).size).toBe(0);
        // getcap (libcap) decodes the capability as the kernel will apply it on exec.
        expect(execFileSync("getcap", [path.join(dir, "tool")], { encoding: "utf8" })).toMatch(
          /cap_setuid,cap_net_bind_service=ep/,
        );
      });
      // The small set is in the inode; the big one in a block, the empty file's only one (8 sectors).
      const stat = (p: string) =>
        execFileSync("debugfs", ["-R", `stat ${p}`, image], {
          encoding: "utf8",
          stdio: ["ignore", "pipe", "ignore"],
        });
      expect(stat("/tool")).toMatch(/File ACL: 0\b/);
      expect(stat("/empty-with-attrs")).toMatch(/File ACL: [1-9]\d*/);
      expect(stat("/empty-with-attrs")).toMatch(/Blockcount: 8\b/);
    },
  );
});
