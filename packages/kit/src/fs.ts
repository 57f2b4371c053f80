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

/**
 * Flushes a file that is being written to disk in the background, one fdatasync at a time: call
 * `kick` after a batch of writes and a flush starts (or one more is queued behind the one under
 * way), so the file's final fsync has little left to write. A failed flush is ignored: the final
 * fsync meets the same error and reports it.
 */
export function backgroundFlusher(
  file: string,
  open: (file: string) => Promise<Pick<fs.FileHandle, "datasync" | "close">> = (f) => fs.open(f, "r"),
): { kick(): void; close(): Promise<void> } {
  const handle = open(file).catch(() => undefined);
  let running: Promise<void> | undefined;
  let again = false;
  let closed = false;
  const flush = async (): Promise<void> => {
    do {
      again = false;
      await (await handle)?.datasync().catch(() => {});
    } while (again && !closed);
    running = undefined;
  };
  return {
    kick() {
      if (closed) return;
      if (running) again = true;
      else running = flush();
    },
    async close() {
      closed = true;
      await running;
      await (await handle)?.close().catch(() => {});
    },
  };
}
