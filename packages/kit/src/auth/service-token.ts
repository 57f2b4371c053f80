import { randomBytes, timingSafeEqual } from "node:crypto";
import fs from "node:fs";
import path from "node:path";

/**
 * The shared secret internal callers present. Configured explicitly, or kept in
 * `<data dir>/service-token` (created 0600 on first use) so services and the CLI on one machine
 * agree without setup.
 */
export function resolveServiceToken(configured: string, dataDir: string): string {
  if (configured !== "") return configured;
  const file = path.join(dataDir, "service-token");
  try {
    const existing = fs.readFileSync(file, "utf8").trim();
    if (existing.length >= 32) return existing;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
  }
  fs.mkdirSync(dataDir, { recursive: true });
  const token = randomBytes(32).toString("base64url");
  // `wx` fails if another process created it first; then use theirs.
  try {
    fs.writeFileSync(file, `${token}\n`, { mode: 0o600, flag: "wx" });
    return token;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
    return fs.readFileSync(file, "utf8").trim();
  }
}

export function tokensEqual(a: string, b: string): boolean {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}
