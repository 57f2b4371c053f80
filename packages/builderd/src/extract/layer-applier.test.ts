import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import zlib from "node:zlib";
import { tempDir } from "@kiln/kit/testing";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { growingFile } from "../cache/layer-cache.js";
import { blocksFor, DATA_START_BLOCK, newNonce } from "../rootfs/ext4/data-area.js";
import { layerTar } from "../testing/oci-layout.js";
import { createImage, metadataIntact, placedContent, placedFiles } from "./fixtures/image-data.js";
import { createLayerApplier } from "./layer-applier.js";

/** A file written in steps by the test, read as the layer cache's growing temp file is. */
function growing(file: string, size: number) {
  const { file: g, advance } = growingFile(file, size);
  return { g, advance };
}

/** Appends `blob` to `file` in pieces, each announced after it is on disk, with pauses between. */
async function feed(file: string, blob: Buffer, advance: (written: number) => void): Promise<void> {
  for (let at = 0; at < blob.length; ) {
    const n = Math.min(100_000, blob.length - at);
    fs.appendFileSync(file, blob.subarray(at, at + n));
    at += n;
    advance(at);
    await new Promise((r) => setTimeout(r, 2));
  }
}

describe("layer applier", () => {
  const applier = createLayerApplier();
  const dirs: Array<{ path: string; remove(): void }> = [];
  const fresh = () => {
    const d = tempDir("kiln-applier-");
    dirs.push(d);
    fs.mkdirSync(path.join(d.path, "rootfs"));
    return d.path;
  };
  afterEach(() => {
    for (const d of dirs.splice(0)) d.remove();
  });
  afterAll(() => applier.close());

  it("applies a layer that is still being written, following it to its size", async () => {
    const dir = fresh();
    const content = Buffer.alloc(3 << 20, 7);
    const blob = zlib.gzipSync(
      await layerTar([
        { type: "dir", path: "app" },
        { type: "file", path: "app/big", content, mode: 0o644 },
        { type: "file", path: "app/small", content: "hi\n", mode: 0o600 },
      ]),
    );
    const file = path.join(dir, "blob");
    fs.writeFileSync(file, "");
    const { g, advance } = growing(file, blob.length);
    const applying = applier.apply(path.join(dir, "rootfs"), g, "gzip", { maxBytes: 0, usedBytes: 0 });
    await feed(file, blob, advance);
    const result = await applying;
    g.close();
    expect(result.entries).toBe(3);
    expect(fs.readFileSync(path.join(dir, "rootfs/app/big")).equals(content)).toBe(true);
    expect(fs.readFileSync(path.join(dir, "rootfs/app/small"), "utf8")).toBe("hi\n");
    expect(fs.statSync(path.join(dir, "rootfs/app/small")).mode & 0o777).toBe(0o600);
  });

  describe("with an image", () => {
    // Random, so that a chunk written at the wrong offset shows.
    const big = randomBytes(3 << 20);
    const small = Buffer.from("hi\n");
    const layer = () =>
      layerTar([
        { type: "file", path: "app/big", content: big, mode: 0o644 },
        { type: "file", path: "app/small", content: small, mode: 0o600 },
        { type: "file", path: "app/empty" },
      ]);
    /** An image the caller made (metadata blocks included), and what the worker must write into it. */
    const imageIn = (dir: string) => {
      const file = path.join(dir, "image.ext4");
      createImage(file, DATA_START_BLOCK);
      return { file, nonce: newNonce(), nextBlock: DATA_START_BLOCK };
    };
    const expectPlaced = (dir: string, image: ReturnType<typeof imageIn>, nextBlock: number | undefined) => {
      const rootfs = path.join(dir, "rootfs");
      const smallAt = DATA_START_BLOCK + blocksFor(big.length);
      expect(nextBlock).toBe(smallAt + 1);
      expect(placedFiles(rootfs, image.nonce).map((f) => [f.path, f.extent])).toEqual([
        ["app/big", { block: DATA_START_BLOCK, length: big.length }],
        ["app/empty", undefined],
        ["app/small", { block: smallAt, length: small.length }],
      ]);
      expect(placedContent(rootfs, "app/big", image.file, image.nonce).equals(big)).toBe(true);
      expect(placedContent(rootfs, "app/small", image.file, image.nonce)).toEqual(small);
      expect(fs.statSync(path.join(rootfs, "app/small")).mode & 0o777).toBe(0o600);
      expect(metadataIntact(image.file, DATA_START_BLOCK)).toBe(true); // opened without truncating
    };

    it("writes a complete layer file's content into the image and returns the next free block", async () => {
      const dir = fresh();
      const file = path.join(dir, "blob");
      fs.writeFileSync(file, zlib.gzipSync(await layer()));
      const image = imageIn(dir);
      const result = await applier.apply(path.join(dir, "rootfs"), file, "gzip", {
        maxBytes: 0,
        usedBytes: 0,
        image,
      });
      expect(result.bytesWritten).toBe(big.length + small.length);
      expectPlaced(dir, image, result.nextBlock);
    });

    it("writes a layer that is still being written into the image", async () => {
      const dir = fresh();
      const blob = zlib.gzipSync(await layer());
      const file = path.join(dir, "blob");
      fs.writeFileSync(file, "");
      const { g, advance } = growing(file, blob.length);
      const image = imageIn(dir);
      const applying = applier.apply(path.join(dir, "rootfs"), g, "gzip", {
        maxBytes: 0,
        usedBytes: 0,
        image,
      });
      await feed(file, blob, advance);
      const result = await applying;
      g.close();
      expectPlaced(dir, image, result.nextBlock);
    });

    it("fails the layer, not the thread, when the image file does not exist", async () => {
      const dir = fresh();
      const file = path.join(dir, "blob");
      fs.writeFileSync(file, zlib.gzipSync(await layer()));
      const image = { file: path.join(dir, "missing.ext4"), nonce: newNonce(), nextBlock: DATA_START_BLOCK };
      await expect(
        applier.apply(path.join(dir, "rootfs"), file, "gzip", { maxBytes: 0, usedBytes: 0, image }),
      ).rejects.toThrow(/ENOENT.*missing\.ext4/);
      expect(fs.existsSync(image.file)).toBe(false); // never created by the worker
      const r = await applier.apply(path.join(dir, "rootfs"), file, "gzip", { maxBytes: 0, usedBytes: 0 });
      expect(r.entries).toBe(3);
    });
  });

  describe("decompressing the next layer ahead", () => {
    const layerFile = async (dir: string, name: string, content: string) => {
      const file = path.join(dir, `${name}.tar.gz`);
      fs.writeFileSync(file, zlib.gzipSync(await layerTar([{ type: "file", path: name, content }])));
      return file;
    };
    const opts = { maxBytes: 0, usedBytes: 0 };

    it("applies the next layer from the stream started ahead (its file may be gone by then)", async () => {
      const dir = fresh();
      const rootfs = path.join(dir, "rootfs");
      const a = await layerFile(dir, "a", "first");
      const b = await layerFile(dir, "b", "second");
      await applier.apply(rootfs, a, "gzip", { ...opts, next: { file: b, compression: "gzip" } });
      // Without the read-ahead, the job for b would find no file.
      fs.rmSync(b);
      await applier.apply(rootfs, b, "gzip", opts);
      expect(fs.readFileSync(path.join(rootfs, "a"), "utf8")).toBe("first");
      expect(fs.readFileSync(path.join(rootfs, "b"), "utf8")).toBe("second");
    });

    it("drops a read-ahead another layer comes instead of, and one of a file that fails", async () => {
      const dir = fresh();
      const rootfs = path.join(dir, "rootfs");
      const a = await layerFile(dir, "a", "first");
      const b = await layerFile(dir, "b", "second");
      const c = await layerFile(dir, "c", "third");
      await applier.apply(rootfs, a, "gzip", { ...opts, next: { file: b, compression: "gzip" } });
      await applier.apply(rootfs, c, "gzip", opts);
      expect(fs.readdirSync(rootfs).sort()).toEqual(["a", "c"]);
      const missing = path.join(dir, "missing.tar.gz");
      await applier.apply(rootfs, b, "gzip", { ...opts, next: { file: missing, compression: "gzip" } });
      await expect(applier.apply(rootfs, missing, "gzip", opts)).rejects.toThrow(/ENOENT|no such file/);
      fs.rmSync(path.join(rootfs, "a"));
      await applier.apply(rootfs, a, "gzip", opts);
      expect(fs.readdirSync(rootfs).sort()).toEqual(["a", "b", "c"]);
    });
  });

  it("stops a layer waiting for bytes that never come when its signal aborts", async () => {
    const dir = fresh();
    const blob = zlib.gzipSync(await layerTar([{ type: "file", path: "f", content: Buffer.alloc(1 << 20) }]));
    const file = path.join(dir, "blob");
    fs.writeFileSync(file, blob.subarray(0, 1000));
    const { g, advance } = growing(file, blob.length);
    advance(1000);
    const stop = new AbortController();
    const applying = applier.apply(path.join(dir, "rootfs"), g, "gzip", {
      maxBytes: 0,
      usedBytes: 0,
      signal: stop.signal,
    });
    setTimeout(() => stop.abort(new Error("download failed: digest mismatch")), 50);
    await expect(applying).rejects.toThrow("download failed: digest mismatch");
    g.close();
    // The applier still works after its thread was stopped.
    const ok = zlib.gzipSync(await layerTar([{ type: "file", path: "g", content: "x" }]));
    fs.writeFileSync(path.join(dir, "ok"), ok);
    const r = await applier.apply(path.join(dir, "rootfs"), path.join(dir, "ok"), "gzip", {
      maxBytes: 0,
      usedBytes: 0,
    });
    expect(r.entries).toBe(1);
  });
});
