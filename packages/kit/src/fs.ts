import { writeSync } from "node:fs";
import fs from "node:fs/promises";

/** Whether something exists at `p` (following symlinks); false for any error reaching it. */
export function pathExists(p: string): Promise<boolean> {
  return fs.access(p).then(
    () => true,
    () => false,
  );
}

/** fsyncs the file or directory at `p` (a directory: so the names in it are durable). */
export async function fsyncPath(p: string): Promise<void> {
  const handle = await fs.open(p, "r");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** Writes all of `buf` to `fd` at `position` (one write(2) may write less than asked). */
export function writeAllSync(fd: number, buf: Uint8Array, position: number): void {
  let off = 0;
  while (off < buf.byteLength) off += writeSync(fd, buf, off, buf.byteLength - off, position + off);
}
