import { create, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import { assetmanagerd as api } from "@kiln/api";

/**
 * UploadAsset request messages as Connect envelopes, written by hand for the chunks.
 *
 * The generic path (`toBinary`, then the envelope) allocates and copies every chunk twice and
 * leaves both copies to the garbage collector: for a 1 GiB upload that was most of the client's
 * CPU. A chunk message is simple enough to frame in place instead — the envelope's flags and
 * length, the `chunk` field's tag and the chunk's length as a varint, right in front of the bytes —
 * so a file can be read straight into the buffer that goes to the socket (upload-file.ts).
 *
 *   envelope:  flags (1 byte, 0) | message length (uint32, big-endian)
 *   message:   tag of `chunk` (field 2, wire type 2) | chunk length (varint) | chunk bytes
 *
 * The result is byte for byte what `toBinary` + the Connect envelope produce
 * (upload-encoding.test.ts checks it against the generated code).
 */

const LENGTH_DELIMITED = 2;
const chunkField = api.UploadAssetRequestSchema.field.chunk;
if (chunkField.fieldKind !== "scalar" || chunkField.number >= 16)
  throw new Error("UploadAssetRequest.chunk must be a bytes field numbered below 16 (a one-byte tag)");
/** `chunk`'s tag: one byte, as its field number is below 16. */
const CHUNK_TAG = (chunkField.number << 3) | LENGTH_DELIMITED;
const ENVELOPE_HEADER = 5;
/** The most header bytes a chunk can need: envelope, tag, and a 32-bit varint (5 bytes). */
export const MAX_CHUNK_HEADER = ENVELOPE_HEADER + 1 + 5;
/** The largest chunk UploadAsset accepts (`chunk`'s max_len in the proto). */
export const MAX_CHUNK_BYTES = 4 * 1024 * 1024;

function varintLength(n: number): number {
  let len = 1;
  while (n > 0x7f) {
    n >>>= 7;
    len++;
  }
  return len;
}

/** How many bytes precede a chunk of `length` bytes in its frame. */
export function chunkHeaderLength(length: number): number {
  return ENVELOPE_HEADER + 1 + varintLength(length);
}

/**
 * Writes the frame header of a chunk of `length` bytes at `offset` in `target`; the chunk's
 * bytes belong right after it. Returns the header's length.
 */
export function writeChunkHeader(target: Uint8Array, offset: number, length: number): number {
  if (!Number.isInteger(length) || length < 0 || length > MAX_CHUNK_BYTES)
    throw new RangeError(`chunk length ${length} is outside 0…${MAX_CHUNK_BYTES}`);
  const header = chunkHeaderLength(length);
  const messageLength = header - ENVELOPE_HEADER + length;
  target[offset] = 0;
  new DataView(target.buffer, target.byteOffset, target.byteLength).setUint32(offset + 1, messageLength);
  target[offset + ENVELOPE_HEADER] = CHUNK_TAG;
  let o = offset + ENVELOPE_HEADER + 1;
  let n = length;
  while (n > 0x7f) {
    target[o++] = (n & 0x7f) | 0x80;
    n >>>= 7;
  }
  target[o] = n;
  return header;
}

/** A whole chunk message in its envelope (one copy; for callers that hold loose chunks). */
export function encodeChunk(chunk: Uint8Array): Uint8Array {
  const header = chunkHeaderLength(chunk.byteLength);
  const out = new Uint8Array(header + chunk.byteLength);
  writeChunkHeader(out, 0, chunk.byteLength);
  out.set(chunk, header);
  return out;
}

/** Any UploadAsset request (the metadata) through the generated encoder, in its envelope. */
export function encodeRequest(init: MessageInitShape<typeof api.UploadAssetRequestSchema>): Uint8Array {
  const message = toBinary(api.UploadAssetRequestSchema, create(api.UploadAssetRequestSchema, init));
  const out = new Uint8Array(ENVELOPE_HEADER + message.byteLength);
  new DataView(out.buffer).setUint32(1, message.byteLength);
  out.set(message, ENVELOPE_HEADER);
  return out;
}
