import { randomBytes } from "node:crypto";

const ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"; // Crockford base32, lower case
const TAIL_LENGTH = 16;

/** `n` random characters of the id alphabet (5 random bits each). */
export function randomIdChars(n: number): string {
  const bytes = randomBytes(n);
  let out = "";
  for (let i = 0; i < n; i++) out += ALPHABET[bytes[i]! % 32];
  return out;
}

/**
 * A new resource id: `<prefix>_<26 chars>`, time-sortable (48-bit ms timestamp, then 80 random
 * bits, like a ULID) and matching kiln.validate.v1's FORMAT_ID. `tail` fixes the end of the
 * random part (at most 16 characters of the id alphabet, e.g. from randomIdChars): metald names
 * kernel objects made ahead of time after the id their VM will get.
 */
export function newId(prefix: string, tail = ""): string {
  if (tail.length > TAIL_LENGTH || [...tail].some((c) => !ALPHABET.includes(c))) {
    throw new Error(
      `id tail ${JSON.stringify(tail)} must be at most ${TAIL_LENGTH} characters of ${ALPHABET}`,
    );
  }
  let time = Date.now();
  let head = "";
  for (let i = 0; i < 10; i++) {
    head = ALPHABET[time % 32] + head;
    time = Math.floor(time / 32);
  }
  return `${prefix}_${head}${randomIdChars(TAIL_LENGTH - tail.length)}${tail}`;
}
