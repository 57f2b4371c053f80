import fs from "node:fs/promises";

/**
 * A VM's console (serial console for VM backends, stdout/stderr for containers) is a file the
 * backend appends to. metald keeps it bounded and streams it to `kiln vms logs`.
 */

/** Keeps the newest `keepBytes` when the file grew past `maxBytes` (starting at a line boundary). */
export async function trimConsoleLog(
  file: string,
  maxBytes: number,
  keepBytes = Math.floor(maxBytes / 2),
): Promise<boolean> {
  let handle: fs.FileHandle | undefined;
  try {
    handle = await fs.open(file, "r+");
    const { size } = await handle.stat();
    if (size <= maxBytes) return false;
    const buf = Buffer.alloc(keepBytes);
    const { bytesRead } = await handle.read(buf, 0, keepBytes, size - keepBytes);
    const nl = buf.subarray(0, bytesRead).indexOf(10);
    const tail = buf.subarray(nl >= 0 ? nl + 1 : 0, bytesRead);
    // The backend appends with O_APPEND, so its next write lands after the new end.
    await handle.truncate(0);
    await handle.write(
      Buffer.concat([Buffer.from(`[kiln: console trimmed to the newest ${tail.length} bytes]\n`), tail]),
      0,
      undefined,
      0,
    );
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return false;
    throw err;
  } finally {
    await handle?.close();
  }
}

/**
 * The last `tailLines` lines (0 = all), then with `follow` new lines as they are written, until
 * `stillRunning()` says the VM stopped or `signal` aborts.
 */
export async function* readConsole(
  file: string,
  opts: {
    tailLines: number;
    follow: boolean;
    signal?: AbortSignal;
    stillRunning: () => Promise<boolean>;
    pollMs?: number;
  },
): AsyncGenerator<string> {
  let offset = 0;
  let partial = "";
  const readFrom = async (): Promise<string[]> => {
    let handle: fs.FileHandle;
    try {
      handle = await fs.open(file, "r");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
      throw err;
    }
    try {
      const { size } = await handle.stat();
      if (size < offset) offset = 0; // trimmed: start over from the kept tail
      if (size === offset) return [];
      const buf = Buffer.alloc(size - offset);
      const { bytesRead } = await handle.read(buf, 0, buf.length, offset);
      offset += bytesRead;
      const text = partial + buf.subarray(0, bytesRead).toString("utf8");
      const lines = text.split("\n");
      partial = lines.pop() ?? "";
      return lines.map((l) => l.replace(/\r$/, ""));
    } finally {
      await handle.close();
    }
  };
  const first = await readFrom();
  yield* opts.tailLines > 0 ? first.slice(-opts.tailLines) : first;
  if (!opts.follow) {
    if (partial) yield partial;
    return;
  }
  const pollMs = opts.pollMs ?? 250;
  while (!opts.signal?.aborted) {
    await new Promise<void>((resolve) => {
      const t = setTimeout(resolve, pollMs);
      opts.signal?.addEventListener(
        "abort",
        () => {
          clearTimeout(t);
          resolve();
        },
        { once: true },
      );
    });
    yield* await readFrom();
    if (!(await opts.stillRunning())) {
      yield* await readFrom();
      if (partial) yield partial;
      return;
    }
  }
}
