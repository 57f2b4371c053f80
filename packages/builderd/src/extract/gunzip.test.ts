import { randomBytes } from "node:crypto";
import { PassThrough, Readable } from "node:stream";
import { buffer } from "node:stream/consumers";
import zlib from "node:zlib";
import { describe, expect, it } from "vitest";
import { gunzipLayer } from "./gunzip.js";

const opts = { chunkSize: 64 * 1024, readableHighWaterMark: 1 << 20 };

/** gunzipLayer's answer for `input` cut into `chunk`-byte pieces: the bytes, or the error. */
async function ours(
  input: Buffer,
  chunk = input.length || 1,
): Promise<Buffer | { code: string; message: string }> {
  const pieces: Buffer[] = [];
  for (let i = 0; i < input.length; i += chunk) pieces.push(input.subarray(i, i + chunk));
  try {
    return await buffer(gunzipLayer(Readable.from(pieces), opts));
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    return { code: String(e.code), message: e.message };
  }
}

/** zlib's own gunzip of `input`, in the same shape. */
function theirs(input: Buffer): Buffer | { code: string; message: string } {
  try {
    return zlib.gunzipSync(input);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    return { code: String(e.code), message: e.message };
  }
}

/** A gzip member with the given header flags and fields, written by hand. */
function member(
  data: Buffer,
  fields: { name?: string; extra?: Buffer; comment?: string; hcrc?: boolean } = {},
) {
  let flags = 0;
  const parts: Buffer[] = [];
  if (fields.extra) {
    flags |= 0x04;
    const len = Buffer.alloc(2);
    len.writeUInt16LE(fields.extra.length);
    parts.push(len, fields.extra);
  }
  if (fields.name !== undefined) {
    flags |= 0x08;
    parts.push(Buffer.from(`${fields.name}\0`, "latin1"));
  }
  if (fields.comment !== undefined) {
    flags |= 0x10;
    parts.push(Buffer.from(`${fields.comment}\0`, "latin1"));
  }
  const head = Buffer.concat([Buffer.from([0x1f, 0x8b, 8, flags, 0, 0, 0, 0, 0, 3]), ...parts]);
  const hcrc = Buffer.alloc(fields.hcrc ? 2 : 0);
  if (fields.hcrc) {
    head[3] = flags | 0x02;
    hcrc.writeUInt16LE(zlib.crc32(head) & 0xffff);
  }
  const trailer = Buffer.alloc(8);
  trailer.writeUInt32LE(zlib.crc32(data), 0);
  trailer.writeUInt32LE(data.length % 2 ** 32, 4);
  return Buffer.concat([head, hcrc, zlib.deflateRawSync(data), trailer]);
}

const text = Buffer.from("kiln layer bytes\n".repeat(2_000));
const noise = randomBytes(30_000);
const data = Buffer.concat([text, noise, text]);

describe("gunzipLayer", () => {
  it("gives zlib's output for a plain member and a named one, however the input is cut", async () => {
    for (const input of [zlib.gzipSync(data), member(data, { name: "layer.tar" })]) {
      for (const chunk of [3, 7, 10, 11, 4096, input.length]) {
        const got = await ours(input, chunk);
        expect(Buffer.isBuffer(got) && got.equals(data), `chunks of ${chunk}`).toBe(true);
      }
    }
  });

  it("gives zlib's answer for every other shape of input", async () => {
    const a = zlib.gzipSync(text);
    const b = zlib.gzipSync(noise);
    const cases: Record<string, Buffer> = {
      "two members": Buffer.concat([a, b]),
      "three members, small chunks": Buffer.concat([a, b, a]),
      "trailing zeros": Buffer.concat([a, Buffer.alloc(1024)]),
      "trailing garbage": Buffer.concat([a, Buffer.from("garbage")]),
      "extra field, comment and header crc": member(data, {
        extra: Buffer.from("xx"),
        comment: "hi",
        hcrc: true,
        name: "n",
      }),
      "truncated body": a.subarray(0, a.length - 100),
      "truncated trailer": a.subarray(0, a.length - 3),
      "no trailer": a.subarray(0, a.length - 8),
      "not gzip": Buffer.from("definitely not gzip, but long enough"),
      "too short for a header": Buffer.from([0x1f, 0x8b, 8]),
      empty: Buffer.alloc(0),
      "corrupt deflate data": Buffer.concat([a.subarray(0, 10), Buffer.alloc(64, 0xff), a.subarray(74)]),
    };
    for (const [name, input] of Object.entries(cases)) {
      for (const chunk of [5, 4096, input.length || 1]) {
        const got = await ours(input, chunk);
        const want = theirs(input);
        expect({ name, chunk, got: Buffer.isBuffer(got) ? got.toString("hex") : got }).toEqual({
          name,
          chunk,
          got: Buffer.isBuffer(want) ? want.toString("hex") : want,
        });
      }
    }
  });

  it("checks the trailer's length, not its CRC (the layer's sha256 covers the bytes)", async () => {
    const good = zlib.gzipSync(text);
    const badCrc = Buffer.from(good);
    badCrc.writeUInt32LE((badCrc.readUInt32LE(badCrc.length - 8) ^ 1) >>> 0, badCrc.length - 8);
    const got = await ours(badCrc);
    expect(Buffer.isBuffer(got) && got.equals(text)).toBe(true);
    const badLength = Buffer.from(good);
    badLength.writeUInt32LE(text.length + 1, badLength.length - 4);
    expect(await ours(badLength)).toEqual({ code: "Z_DATA_ERROR", message: "incorrect length check" });
  });

  it("waits for a slow consumer, and destroys the source when the consumer gives up", async () => {
    const big = Buffer.alloc(32 << 20, "kiln ");
    const src = new PassThrough();
    src.end(zlib.gzipSync(big));
    const out = gunzipLayer(src, opts);
    // Nobody reads: what is inflated stops at the read-ahead.
    await expect.poll(() => out.readableLength, { timeout: 5_000 }).toBeGreaterThanOrEqual(1 << 20);
    await new Promise((r) => setTimeout(r, 50));
    expect(out.readableLength).toBeLessThanOrEqual(3 << 20);
    out.destroy();
    await new Promise((r) => setTimeout(r, 10));
    expect(src.destroyed).toBe(true);
  });
});
