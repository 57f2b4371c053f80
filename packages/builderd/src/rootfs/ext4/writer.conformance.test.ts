/**
 * Conformance of Kiln's ext4 writer: each benign fixture image is built as the build pipeline
 * builds it (layers extracted with `imageData` into one image file, content carried from layer to
 * layer, then writeExt4Image around it), and the image must pass `e2fsck -fn` and hold exactly the
 * tree `umoci raw unpack` makes of the same OCI layout — types, modes, owners, symlink targets,
 * content, hardlink groups and non-directory mtimes (the writer keeps nanoseconds, so these match
 * exactly, unlike `mkfs.ext4 -d`'s whole seconds). As in extract/conformance.test.ts, device nodes
 * and fifos are the one documented difference: Kiln's extractor skips and reports them.
 *
 * Two more cases: content a later layer replaced or deleted stays in the data area as free
 * blocks, and a file of more than four extents (over 512 MiB) gets a depth-1 extent tree.
 */
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { tempDir } from "@kiln/kit/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { applyImage, umociUnpack } from "../../extract/fixtures/apply-image.js";
import { busyboxImage, conformanceImages, devicesImage } from "../../extract/fixtures/conformance-images.js";
import { placedFiles } from "../../extract/fixtures/image-data.js";
import { expectSameTree, snapshotTree, withoutPaths } from "../../extract/fixtures/tree-snapshot.js";
import { type ImageSpec, writeOciLayout } from "../../testing/oci-layout.js";
import { BLOCK_SIZE, blocksFor, DATA_START_BLOCK, encodePlaceholder, newNonce } from "./data-area.js";
import { fsckImage, snapshotImage, withMountedImage } from "./testing/image-tree.js";
import { writeExt4Image } from "./writer.js";

let tmp: { path: string; remove(): void };
beforeAll(() => {
  tmp = tempDir("kiln-ext4-writer-conformance-");
});
afterAll(() => tmp.remove());

const SPECIAL_TYPES = new Set(["char-device", "block-device", "fifo", "socket"]);

/** The OCI image unpacked by umoci, and made into an ext4 image as the pipeline makes it. */
async function build(name: string, spec: ImageSpec) {
  const dir = path.join(tmp.path, name);
  const layout = path.join(dir, "layout");
  await writeOciLayout(layout, [{ tag: "t", image: spec }]);
  const umociDir = path.join(dir, "umoci");
  await umociUnpack(layout, "t", umociDir);

  const rootfs = path.join(dir, "rootfs");
  const image = path.join(dir, "rootfs.ext4");
  fs.writeFileSync(image, "", { mode: 0o644 });
  const nonce = newNonce();
  const fd = fs.openSync(image, fs.constants.O_RDWR);
  let results: Awaited<ReturnType<typeof applyImage>>;
  try {
    results = await applyImage(layout, "t", rootfs, {
      imageData: { fd, nonce, nextBlock: DATA_START_BLOCK },
    });
  } finally {
    fs.closeSync(fd);
  }
  const nextBlock = results.at(-1)?.nextBlock ?? DATA_START_BLOCK;
  const written = writeExt4Image({ rootfs, image, nonce, nextBlock });
  return { image, rootfs, nonce, nextBlock, results, written, umociDir, theirs: snapshotTree(umociDir) };
}

/** Builds the image and checks it against umoci's tree, leaving out what the extractor skips. */
async function expectConforms(name: string, spec: ImageSpec) {
  const built = await build(name, spec);
  const fsck = await fsckImage(built.image);
  expect(fsck.clean, fsck.output).toBe(true);

  const special = Object.entries(built.theirs.nodes)
    .filter(([, n]) => SPECIAL_TYPES.has(n.type))
    .map(([p]) => p);
  expect(
    built.results
      .flatMap((r) => r.skipped)
      .map((s) => s.path)
      .sort(),
  ).toEqual(special);
  expectSameTree(await snapshotImage(built.image), withoutPaths(built.theirs, special));
  return { ...built, special };
}

describe("writeExt4Image makes, of extracted layers, the tree umoci raw unpack makes", () => {
  for (const [name, spec] of Object.entries(conformanceImages)) {
    it(name, async () => {
      await expectConforms(name, spec);
    });
  }

  it("devices: the image leaves out the device nodes and fifos the extractor skips (documented difference)", async () => {
    const { special } = await expectConforms("devices", devicesImage);
    expect(special).toEqual(["dev/initctl", "dev/loop9", "dev/null", "newdir/tty"]);
  });

  it.skipIf(!fs.existsSync("/bin/busybox"))("a realistic busybox-static image", async () => {
    const { theirs } = await expectConforms("busybox", busyboxImage());
    expect(Object.keys(theirs.nodes).length).toBeGreaterThan(200);
  });

  // GNU tar writes the layer from a tree with attributes set on it; umoci applies them (as root),
  // and the image, mounted, must show the kernel the same ones.
  it.skipIf(process.getuid?.() !== 0)(
    "extended attributes, file capabilities included, as umoci applies them and the kernel reads them",
    async () => {
      const src = path.join(tmp.path, "xattrs-src");
      const p = (rel: string) => path.join(src, rel);
      fs.mkdirSync(p("bin"), { recursive: true });
      fs.writeFileSync(p("bin/tool"), "#!/bin/sh\necho tool\n");
      fs.chmodSync(p("bin/tool"), 0o755);
      execFileSync("setcap", ["cap_setuid,cap_net_bind_service=ep", p("bin/tool")]); // a 0x80 byte
      fs.linkSync(p("bin/tool"), p("bin/tool-link"));
      fs.writeFileSync(p("ping"), "ping");
      execFileSync("setcap", ["cap_net_raw=ep", p("ping")]);
      fs.writeFileSync(p("empty"), "");
      execFileSync("setfattr", ["-n", "user.note", "-v", "0x00ff", p("empty")]);
      fs.writeFileSync(p("big"), "x");
      execFileSync("setfattr", ["-n", "user.blob", "-v", `0x${"ab".repeat(1500)}`, p("big")]);
      const layer = execFileSync("tar", [
        "--format=pax",
        "--xattrs",
        "--xattrs-include=*",
        "--numeric-owner",
        "--sort=name",
        "-C",
        src,
        "-cf",
        "-",
        ".",
      ]);
      const { image, umociDir, results } = await expectConforms("xattrs", { layers: [layer] });
      expect(results.flatMap((r) => r.skipped)).toEqual([]);
      const theirs = snapshotTree(umociDir, { xattrs: true });
      expect(theirs.nodes["bin/tool"]!.xattrs!["security.capability"]).toMatch(/80/);
      expect(theirs.nodes["big"]!.xattrs!["user.blob"]).toHaveLength(3000);
      await withMountedImage(image, (dir) => {
        expectSameTree(withoutPaths(snapshotTree(dir, { xattrs: true }), ["lost+found"]), theirs);
        expect(execFileSync("getcap", [path.join(dir, "bin/tool")], { encoding: "utf8" })).toMatch(
          /cap_setuid,cap_net_bind_service=ep/,
        );
      });
    },
  );
});

describe("writeExt4Image's blocks", () => {
  it("leaves the content of replaced and whited-out files free, and counts only what the tree holds as used", async () => {
    const { image, rootfs, nonce, nextBlock } = await expectConforms(
      "whiteouts-blocks",
      conformanceImages["whiteouts"]!,
    );
    const header = dumpe2fs(image, ["-h"]);
    const blockCount = headerField(header, "Block count");
    const freeBlocks = headerField(header, "Free blocks");

    // Free blocks as the block bitmaps have them ("  Free blocks: 96-1023, 2000" per group).
    const free: Array<[number, number]> = [];
    for (const m of dumpe2fs(image, []).matchAll(/^ {2}Free blocks: ?(.*)$/gm)) {
      for (const range of m[1]!.split(", ").filter((r) => r !== "")) {
        const [a, b = a] = range.split("-").map(Number);
        free.push([a!, b!]);
      }
    }
    const freeInBitmaps = free.reduce((n, [a, b]) => n + b - a + 1, 0);
    const usedBlocks = blockCount - freeInBitmaps;
    expect(freeBlocks + usedBlocks).toBe(blockCount);

    // The data area the extractor wrote, [DATA_START_BLOCK, nextBlock): used only where the tree
    // still names content (hard links share theirs), free everywhere else.
    const dataArea = nextBlock - DATA_START_BLOCK;
    const freeInDataArea = free.reduce(
      (n, [a, b]) => n + Math.max(0, Math.min(b, nextBlock - 1) - Math.max(a, DATA_START_BLOCK) + 1),
      0,
    );
    const live = new Map<number, number>();
    for (const f of placedFiles(rootfs, nonce)) if (f.extent) live.set(f.ino, blocksFor(f.extent.length));
    const liveBlocks = [...live.values()].reduce((a, b) => a + b, 0);
    expect(dataArea - freeInDataArea).toBe(liveBlocks);
    expect(liveBlocks).toBeLessThan(dataArea);
    // etc/a, etc/sub/x, etc/sub/deeper/y, opt/keep-lower, opt/old/f, var/lib/one, var/lib/two, the
    // lower data/d1, home/u/lower, home/u/upper and srv/plain: one block each.
    expect(dataArea - liveBlocks).toBe(11);
  });

  it("gives a file of more than four extents (600 MiB) a depth-1 extent tree", async () => {
    const dir = path.join(tmp.path, "big");
    const rootfs = path.join(dir, "rootfs");
    fs.mkdirSync(rootfs, { recursive: true, mode: 0o755 });
    const image = path.join(dir, "rootfs.ext4");
    const nonce = newNonce();
    const length = 600 * 2 ** 20 + 5;
    const blocks = blocksFor(length);
    const nextBlock = DATA_START_BLOCK + blocks;
    fs.writeFileSync(path.join(rootfs, "big"), encodePlaceholder(nonce, { block: DATA_START_BLOCK, length }));
    // Sparse: a few real bytes at the start of the content, and nothing else.
    const fd = fs.openSync(image, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o644);
    try {
      fs.writeSync(fd, Buffer.from("kiln big file"), 0, 13, DATA_START_BLOCK * BLOCK_SIZE);
      fs.ftruncateSync(fd, nextBlock * BLOCK_SIZE);
    } finally {
      fs.closeSync(fd);
    }

    const written = writeExt4Image({ rootfs, image, nonce, nextBlock });
    expect(written.contentBytes).toBe(length);
    const fsck = await fsckImage(image);
    expect(fsck.clean, fsck.output).toBe(true);

    const stat = debugfs(image, "stat /big");
    expect(stat).toMatch(new RegExp(`Size: ${length}\\n`));
    // The placeholder's mtime to the nanosecond (seconds, then nanoseconds << 2 | epoch bits).
    const mtime = /^ ?mtime: 0x([0-9a-f]+):([0-9a-f]+) /m.exec(stat)!;
    const ns =
      BigInt(Number.parseInt(mtime[1]!, 16)) * 1_000_000_000n + BigInt(Number.parseInt(mtime[2]!, 16) >>> 2);
    expect(ns).toBe(fs.lstatSync(path.join(rootfs, "big"), { bigint: true }).mtimeNs);
    // An index block (ETB0) holding the extents, then five of at most 32768 blocks each.
    expect(stat).toMatch(/\(ETB0\):\d+/);
    const ex = debugfs(image, "ex /big");
    const leaves = ex.split("\n").filter((l) => /^\s*1\/\s*1\s/.test(l));
    expect(leaves, ex).toHaveLength(5);
    expect(ex).toMatch(/^\s*0\/\s*1\s+1\/\s*1\s/m); // the root: one index entry, depth 1
    const last = leaves.at(-1)!;
    expect(last, ex).toMatch(new RegExp(`\\s${nextBlock - 1}\\s`));

    const head = execFileSync(
      "sh",
      ["-c", 'LC_ALL=C /usr/sbin/debugfs -R "cat /big" "$1" 2>/dev/null | head -c 13', "sh", image],
      { encoding: "latin1" },
    );
    expect(head).toBe("kiln big file");
  });
});

function debugfs(image: string, request: string): string {
  return execFileSync("/usr/sbin/debugfs", ["-R", request, image], {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "ignore"],
  });
}

function dumpe2fs(image: string, args: string[]): string {
  return execFileSync("/usr/sbin/dumpe2fs", [...args, image], {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "ignore"],
    maxBuffer: 64 << 20,
  });
}

function headerField(header: string, name: string): number {
  const m = new RegExp(`^${name}:\\s+(\\d+)$`, "m").exec(header);
  if (!m) throw new Error(`no ${name} in dumpe2fs -h: ${header}`);
  return Number(m[1]);
}
