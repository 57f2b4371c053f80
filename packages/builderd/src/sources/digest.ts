import { createHash } from "node:crypto";
import { Transform, type TransformCallback } from "node:stream";
import { DigestMismatchError, UnsupportedImageError } from "./errors.js";

/**
 * Content digests: every manifest, config and layer is named by the sha256 of its bytes, and
 * nothing is used before those bytes are checked against the name.
 */
const SHA256 = /^sha256:([a-f0-9]{64})$/;

export function isSha256Digest(digest: unknown): digest is string {
  return typeof digest === "string" && SHA256.test(digest);
}

/** The hex part of a sha256 digest; refuses anything else (other algorithms, malformed names). */
export function digestHex(digest: string, what = "blob"): string {
  const m = SHA256.exec(digest);
  if (!m?.[1]) {
    throw new UnsupportedImageError(
      `${what} digest ${JSON.stringify(digest)} is not supported: builderd accepts sha256 digests only`,
    );
  }
  return m[1];
}

export function digestOf(data: Buffer | string): string {
  return `sha256:${createHash("sha256").update(data).digest("hex")}`;
}

/** Throws DigestMismatchError unless `data` has this digest (and size, when given). */
export function verifyBytes(what: string, data: Buffer, expected: string, size?: number): void {
  digestHex(expected, what);
  const actual = digestOf(data);
  if (actual !== expected) throw new DigestMismatchError(what, expected, actual);
  if (size !== undefined && data.length !== size) {
    throw new DigestMismatchError(what, expected, actual, `expected ${size} bytes, got ${data.length}`);
  }
}

/**
 * A pass-through stream that hashes and counts what flows through it and errors with
 * DigestMismatchError — instead of ending — when the bytes do not match. Bytes past the expected
 * size fail at once, so an endless body cannot run on.
 */
export function createVerifier(what: string, expected: string, size: number): Transform {
  digestHex(expected, what);
  const hash = createHash("sha256");
  let seen = 0;
  return new Transform({
    transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback) {
      seen += chunk.length;
      if (seen > size) {
        cb(new DigestMismatchError(what, expected, "(unknown)", `more than the expected ${size} bytes`));
        return;
      }
      hash.update(chunk);
      cb(null, chunk);
    },
    flush(cb: TransformCallback) {
      const actual = `sha256:${hash.digest("hex")}`;
      if (seen !== size) {
        cb(new DigestMismatchError(what, expected, actual, `expected ${size} bytes, got ${seen}`));
      } else if (actual !== expected) {
        cb(new DigestMismatchError(what, expected, actual));
      } else {
        cb();
      }
    },
  });
}
