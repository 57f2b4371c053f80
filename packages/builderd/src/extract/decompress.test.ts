import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { PassThrough, Readable } from "node:stream";
import { buffer } from "node:stream/consumers";
import zlib from "node:zlib";
import { describe, expect, it } from "vitest";
import { compress as zstd } from "zstd-napi";
import { decompressLayer } from "./decompress.js";
import { InvalidLayerError } from "./errors.js";
import { ZSTD_WINDOW_LOG_MAX } from "./zstd.js";

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

  it("decompresses zstd layers: one frame, several, and skippable frames between them", async () => {
    const frame = zstd(data);
    expect((await buffer(decompressLayer(Readable.from([frame]), "zstd"))).equals(data)).toBe(true);
    const skippable = Buffer.alloc(8 + 16);
    skippable.writeUInt32LE(0x184d2a50, 0); // zstd:chunked keeps its table of contents in one
    skippable.writeUInt32LE(16, 4);
    const several = Buffer.concat([frame, skippable, zstd(data)]);
    // Cut into odd pieces, an empty one last, as a file read or the network might.
    const pieces = [several.subarray(0, 3), several.subarray(3, 50), several.subarray(50), Buffer.alloc(0)];
    const out = await buffer(decompressLayer(Readable.from(pieces), "zstd"));
    expect(out.equals(Buffer.concat([data, data]))).toBe(true);
  });

  it("refuses a zstd frame that asks for a window over the limit, before allocating it", async () => {
    // A hand-made frame: no content size, window 2^31 (2 GiB), then one raw 5-byte last block.
    const frame = Buffer.from([
      0x28,
      0xb5,
      0x2f,
      0xfd,
      0x00,
      (31 - 10) << 3,
      0x29,
      0x00,
      0x00,
      ...Buffer.from("hello"),
    ]);
    const err = await buffer(decompressLayer(Readable.from([frame]), "zstd")).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(InvalidLayerError);
    expect((err as Error).message).toMatch(
      new RegExp(`window is larger than the ${2 ** (ZSTD_WINDOW_LOG_MAX - 20)} MiB`),
    );
    // The same frame with a window Kiln allows decodes.
    const small = Buffer.from(frame);
    small[5] = (20 - 10) << 3;
    expect((await buffer(decompressLayer(Readable.from([small]), "zstd"))).toString()).toBe("hello");
  });

  it.each([
    ["garbage", Buffer.from("definitely not zstd data")],
    ["a truncated frame", zstd(Buffer.from(randomBytes(300_000).toString("hex"))).subarray(0, 100_000)],
    ["nothing at all", Buffer.alloc(0)],
  ])("reports %s as an invalid zstd layer", async (_name, bytes) => {
    const err = await buffer(decompressLayer(Readable.from([bytes]), "zstd")).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(InvalidLayerError);
    expect((err as Error).message).toMatch(/not valid zstd data.*corrupt/);
  });

  it("reports corrupt gzip data as an invalid layer", async () => {
    const err = await buffer(
      decompressLayer(Readable.from([Buffer.from("definitely not gzip")]), "gzip"),
    ).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(InvalidLayerError);
    expect((err as Error).message).toMatch(/not valid gzip data.*corrupt/);
  });

  it.each(["gzip", "zstd"] as const)("surfaces errors of the source unchanged (%s)", async (compression) => {
    const src = new PassThrough();
    const out = decompressLayer(src, compression);
    const failed = once(out, "error").catch((e: unknown) => e);
    src.destroy(new Error("disk read failed"));
    const [err] = (await failed) as [Error];
    expect(err).not.toBeInstanceOf(InvalidLayerError);
    expect(err.message).toBe("disk read failed");
  });

  it.each(["gzip", "zstd"] as const)(
    "destroys the source when the consumer gives up (%s)",
    async (compression) => {
      const src = new PassThrough();
      src.on("error", () => {}); // the pipeline destroys it with "premature close"
      const closed = new Promise((resolve) => src.on("close", resolve));
      const out = decompressLayer(src, compression);
      out.on("error", () => {});
      out.destroy();
      await closed;
      expect(src.destroyed).toBe(true);
    },
  );
});
