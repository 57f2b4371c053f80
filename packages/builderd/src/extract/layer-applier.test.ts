import fs from "node:fs";
import path from "node:path";
import zlib from "node:zlib";
import { tempDir } from "@kiln/kit/testing";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { growingFile } from "../cache/layer-cache.js";
import { layerTar } from "../testing/oci-layout.js";
import { createLayerApplier } from "./layer-applier.js";

/** A file written in steps by the test, read as the layer cache's growing temp file is. */
function growing(file: string, size: number) {
  const { file: g, advance } = growingFile(file, size);
  return { g, advance };
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
    // Written in pieces, each announced after it is on disk, with pauses between.
    for (let at = 0; at < blob.length; ) {
      const n = Math.min(100_000, blob.length - at);
      fs.appendFileSync(file, blob.subarray(at, at + n));
      at += n;
      advance(at);
      await new Promise((r) => setTimeout(r, 2));
    }
    const result = await applying;
    g.close();
    expect(result.entries).toBe(3);
    expect(fs.readFileSync(path.join(dir, "rootfs/app/big")).equals(content)).toBe(true);
    expect(fs.readFileSync(path.join(dir, "rootfs/app/small"), "utf8")).toBe("hi\n");
    expect(fs.statSync(path.join(dir, "rootfs/app/small")).mode & 0o777).toBe(0o600);
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
