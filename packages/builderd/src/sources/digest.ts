import { createHash } from "node:crypto";
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
