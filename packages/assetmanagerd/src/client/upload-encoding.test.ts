import { randomBytes } from "node:crypto";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { encodeEnvelope, pipe, transformSplitEnvelope } from "@connectrpc/connect/protocol";
import { assetmanagerd as api } from "@kiln/api";
import { describe, expect, it } from "vitest";
import {
  chunkHeaderLength,
  encodeChunk,
  encodeRequest,
  MAX_CHUNK_BYTES,
  MAX_CHUNK_HEADER,
  writeChunkHeader,
} from "./upload-encoding.js";

/** What the generated encoder and Connect's envelope make of a request. */
function generated(init: Parameters<typeof create<typeof api.UploadAssetRequestSchema>>[1]): Uint8Array {
  return encodeEnvelope(
    0,
    toBinary(api.UploadAssetRequestSchema, create(api.UploadAssetRequestSchema, init)),
  );
}

/** The messages a Connect server reads from a request body. */
async function decodeBody(body: Uint8Array[]): Promise<api.UploadAssetRequest[]> {
  const out: api.UploadAssetRequest[] = [];
  async function* source() {
    yield* body;
  }
  for await (const env of pipe(source(), transformSplitEnvelope(0xffffffff))) {
    expect(env.flags).toBe(0);
    out.push(fromBinary(api.UploadAssetRequestSchema, env.data));
  }
  return out;
}

// Varint length boundaries (1/2/3/4 bytes), the bench's and the proto's chunk sizes.
const LENGTHS = [0, 1, 127, 128, 300, 16_383, 16_384, 262_144, 2_097_151, 2_097_152, MAX_CHUNK_BYTES];

describe("UploadAsset chunk encoding", () => {
  it.each(LENGTHS)("frames a %i-byte chunk exactly as the generated encoder does", (len) => {
    const chunk = randomBytes(len);
    const mine = encodeChunk(chunk);
    expect(Buffer.from(mine).equals(Buffer.from(generated({ data: { case: "chunk", value: chunk } })))).toBe(
      true,
    );
    expect(mine.length).toBe(chunkHeaderLength(len) + len);
    expect(chunkHeaderLength(len)).toBeLessThanOrEqual(MAX_CHUNK_HEADER);
    const decoded = fromBinary(api.UploadAssetRequestSchema, mine.subarray(5));
    expect(decoded.data.case).toBe("chunk");
    expect(Buffer.from(decoded.data.value as Uint8Array).equals(chunk)).toBe(true);
  });

  it("writes a header in place, in front of the bytes, at any offset of a larger buffer", async () => {
    const chunks = [randomBytes(1000), randomBytes(128), randomBytes(0), randomBytes(70_000)];
    const buf = new Uint8Array(3 + chunks.reduce((n, c) => n + MAX_CHUNK_HEADER + c.length, 0) + 11).fill(
      0xee,
    );
    let o = 3;
    for (const c of chunks) {
      o += writeChunkHeader(buf.subarray(0), o, c.length);
      buf.set(c, o);
      o += c.length;
    }
    const body = [
      encodeRequest({ data: { case: "metadata", value: { name: "a.img" } } }),
      buf.subarray(3, o),
    ];
    const messages = await decodeBody(body);
    expect(messages.map((m) => m.data.case)).toEqual(["metadata", "chunk", "chunk", "chunk", "chunk"]);
    expect(messages.slice(1).map((m) => Buffer.from(m.data.value as Uint8Array))).toEqual(chunks);
    // Nothing written past the last chunk.
    expect(buf.subarray(o).every((b) => b === 0xee)).toBe(true);
  });

  it("refuses lengths the proto does not allow", () => {
    const buf = new Uint8Array(MAX_CHUNK_HEADER);
    expect(() => writeChunkHeader(buf, 0, MAX_CHUNK_BYTES + 1)).toThrow(RangeError);
    expect(() => writeChunkHeader(buf, 0, -1)).toThrow(RangeError);
    expect(() => writeChunkHeader(buf, 0, 1.5)).toThrow(RangeError);
  });

  it("encodes the metadata message through the generated code, every field intact", async () => {
    const value = {
      name: "vmlinux-6.1",
      type: api.AssetType.KERNEL,
      sizeBytes: 2n ** 40n + 3n,
      checksum: `sha256:${"ab".repeat(32)}`,
      labels: { kernel_version: "6.1.0", ünïcode: "✓" },
    };
    const mine = encodeRequest({ data: { case: "metadata", value } });
    expect(Buffer.from(mine).equals(Buffer.from(generated({ data: { case: "metadata", value } })))).toBe(
      true,
    );
    const [decoded] = await decodeBody([mine]);
    expect(decoded?.data.case).toBe("metadata");
    expect(decoded?.data.value).toMatchObject(value);
  });
});
