import { once } from "node:events";
import { PassThrough, Readable } from "node:stream";
import { buffer } from "node:stream/consumers";
import zlib from "node:zlib";
import { describe, expect, it } from "vitest";
import { decompressLayer } from "./decompress.js";
import { InvalidLayerError, UnsupportedLayerError } from "./errors.js";

const data = Buffer.from("tar bytes ".repeat(10_000));

describe("decompressLayer", () => {
  it("gunzips gzip layers", async () => {
    const out = await buffer(decompressLayer(Readable.from([zlib.gzipSync(data)]), "gzip"));
    expect(out.equals(data)).toBe(true);
  });

  it("inflates megabytes ahead of a slow consumer, but not without bound", async () => {
    const big = Buffer.alloc(64 << 20, "kiln ");
    const out = decompressLayer(Readable.from([zlib.gzipSync(big)]), "gzip");
    // Nobody reads: decompression fills the read-ahead, then waits.
    await expect.poll(() => out.readableLength, { timeout: 5_000 }).toBeGreaterThanOrEqual(4 << 20);
    await new Promise((r) => setTimeout(r, 50));
    expect(out.readableLength).toBeLessThanOrEqual(8 << 20);
    expect((await buffer(out)).equals(big)).toBe(true);
  });

  it("passes uncompressed layers through", async () => {
    const out = await buffer(decompressLayer(Readable.from([data]), "none"));
    expect(out.equals(data)).toBe(true);
  });

  it("refuses zstd with an error naming the media type, and releases the source", () => {
    const src = new PassThrough();
    expect(() => decompressLayer(src, "zstd")).toThrow(UnsupportedLayerError);
    expect(() => decompressLayer(new PassThrough(), "zstd")).toThrow(
      /application\/vnd\.oci\.image\.layer\.v1\.tar\+zstd.*no zstd decoder/,
    );
    expect(src.destroyed).toBe(true);
  });

  it("reports corrupt gzip data as an invalid layer", async () => {
    const err = await buffer(
      decompressLayer(Readable.from([Buffer.from("definitely not gzip")]), "gzip"),
    ).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(InvalidLayerError);
    expect((err as Error).message).toMatch(/not valid gzip data.*corrupt/);
  });

  it("surfaces errors of the source unchanged", async () => {
    const src = new PassThrough();
    const out = decompressLayer(src, "gzip");
    const failed = once(out, "error").catch((e: unknown) => e);
    src.destroy(new Error("disk read failed"));
    const [err] = (await failed) as [Error];
    expect(err.message).toBe("disk read failed");
  });

  it("destroys the source when the consumer gives up", async () => {
    const src = new PassThrough();
    src.on("error", () => {}); // the pipeline destroys it with "premature close"
    const closed = new Promise((resolve) => src.on("close", resolve));
    const out = decompressLayer(src, "gzip");
    out.on("error", () => {});
    out.destroy();
    await closed;
    expect(src.destroyed).toBe(true);
  });
});
