import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { backgroundFlusher } from "./fs.js";
import { tempDir } from "./testing/index.js";

/** A file handle whose flushes end when the test says so. */
function fakeHandle() {
  const pending: Array<() => void> = [];
  const h = {
    flushes: 0,
    closed: false,
    pending,
    datasync: () => {
      h.flushes++;
      return new Promise<void>((resolve) => pending.push(resolve));
    },
    close: async () => {
      h.closed = true;
    },
    /** Ends the oldest flush under way and lets the flusher react. */
    async finishOne() {
      pending.shift()?.();
      await new Promise((r) => setTimeout(r, 0));
    },
  };
  return h;
}

describe("backgroundFlusher", () => {
  it("runs one flush at a time, and one more for every kick while it ran", async () => {
    const h = fakeHandle();
    const f = backgroundFlusher("image", async () => h);
    f.kick();
    await new Promise((r) => setTimeout(r, 0));
    expect(h.flushes).toBe(1);
    f.kick();
    f.kick();
    f.kick();
    expect(h.flushes).toBe(1);
    await h.finishOne();
    // The three kicks during the first flush asked for one more, not three.
    expect(h.flushes).toBe(2);
    await h.finishOne();
    expect(h.flushes).toBe(2);
    expect(h.pending).toHaveLength(0);
  });

  it("close waits for the flush under way, queues none after it, and closes the file", async () => {
    const h = fakeHandle();
    const f = backgroundFlusher("image", async () => h);
    f.kick();
    await new Promise((r) => setTimeout(r, 0));
    f.kick();
    let closed = false;
    const closing = f.close().then(() => {
      closed = true;
    });
    await new Promise((r) => setTimeout(r, 0));
    expect(closed).toBe(false);
    await h.finishOne();
    await closing;
    expect(h.flushes).toBe(1);
    expect(h.closed).toBe(true);
    f.kick();
    expect(h.flushes).toBe(1);
  });

  it("flushes a real file, and shrugs at one that cannot be opened (the final fsync reports it)", async () => {
    const dir = tempDir("kiln-flusher-");
    try {
      const file = path.join(dir.path, "image");
      fs.writeFileSync(file, Buffer.alloc(1 << 20, 1));
      const f = backgroundFlusher(file);
      f.kick();
      await f.close();
      const missing = backgroundFlusher(path.join(dir.path, "missing"));
      missing.kick();
      await expect(missing.close()).resolves.toBeUndefined();
    } finally {
      dir.remove();
    }
  });
});
