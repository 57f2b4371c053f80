import fsp from "node:fs/promises";

/**
 * A file's bytes in chunks read into two reused buffers: the next chunk is read while the caller
 * handles the current one, and nothing is allocated per chunk (a fresh multi-MiB buffer per
 * chunk is external memory that makes V8 collect garbage again and again). A chunk is valid only
 * until the next one is requested — for consumers done with a chunk when they ask for the next
 * (hashing), never for ones that keep it.
 */
export async function* readFileChunks(file: string, chunkBytes: number): AsyncGenerator<Buffer> {
  const handle = await fsp.open(file, "r");
  let pending: Promise<{ bytesRead: number }> | undefined;
  try {
    const buffers = [Buffer.allocUnsafe(chunkBytes), Buffer.allocUnsafe(chunkBytes)];
    let next = 0;
    let position = 0;
    pending = handle.read(buffers[0]!, 0, chunkBytes, position);
    for (;;) {
      const { bytesRead } = await pending;
      pending = undefined;
      if (bytesRead === 0) return;
      const current = buffers[next]!;
      position += bytesRead;
      next ^= 1;
      pending = handle.read(buffers[next]!, 0, chunkBytes, position);
      yield current.subarray(0, bytesRead);
    }
  } finally {
    // A caller that stops early must not close the file under a read still in flight.
    await pending?.catch(() => {});
    await handle.close();
  }
}
