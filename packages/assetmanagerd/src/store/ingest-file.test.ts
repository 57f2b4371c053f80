import { createHash, randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, describe, expect, it } from "vitest";
import { createStagingPool, openIngestFile, STAGE_BYTES } from "./ingest-file.js";

const sha = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

/** `bytes` in chunks of varying sizes (a client's chunks rarely line up with anything). */
function* chunked(bytes: Buffer, sizes: number[]): Generator<Buffer> {
  let i = 0;
  for (let off = 0; off < bytes.length; i++) {
    const n = Math.min(sizes[i % sizes.length]!, bytes.length - off);
    yield bytes.subarray(off, off + n);
    off += n;
  }
}

describe.each([
  { mode: "direct I/O", direct: true },
  { mode: "page cache", direct: false },
])("ingest file ($mode)", ({ direct }) => {
  let dir: ReturnType<typeof tempDir>;
  afterEach(() => dir?.remove());

  it.each([
    ["empty", 0],
    ["smaller than a block", 100],
    ["not a multiple of a block, over two stages", 2 * STAGE_BYTES + 12_345],
    ["exactly two stages", 2 * STAGE_BYTES],
  ])("writes content %s byte for byte, at its exact length", async (_name, size) => {
    dir = tempDir("kiln-ingest-");
    const file = path.join(dir.path, "ingest");
    const bytes = randomBytes(size);
    const f = await openIngestFile(file, { pool: createStagingPool(), direct });
    // The test machines' filesystems do direct I/O; the flag says which path was taken.
    expect(f.direct).toBe(direct);
    for (const chunk of chunked(bytes, [65_536, 1, 300_000, STAGE_BYTES + 7])) await f.write(chunk);
    await f.finish();
    await f.close();
    const written = fs.readFileSync(file);
    expect(written.length).toBe(size);
    expect(sha(written)).toBe(sha(bytes));
    expect(fs.statSync(file).mode & 0o777).toBe(0o600);
  });
});

describe("ingest file", () => {
  let dir: ReturnType<typeof tempDir>;
  afterEach(() => dir?.remove());

  it("truncates a stale file of the same name and reuses its staging buffers", async () => {
    dir = tempDir("kiln-ingest-");
    const file = path.join(dir.path, "ingest");
    fs.writeFileSync(file, Buffer.alloc(3 * STAGE_BYTES, 1));
    const pool = createStagingPool();
    const taken: Uint8Array[] = [];
    const spy = {
      take: () => {
        const b = pool.take();
        if (b) taken.push(b);
        return b;
      },
      give: (b: Uint8Array) => pool.give(b),
    };
    const f = await openIngestFile(file, { pool: spy, direct: true });
    await f.write(Buffer.from("new content"));
    await f.finish();
    await f.close();
    await f.close(); // idempotent
    expect(fs.readFileSync(file, "utf8")).toBe("new content");
    // Handed back: the next ingest gets the same buffers.
    expect(taken).toHaveLength(2);
    const again = [pool.take(), pool.take()];
    expect(again.every((b) => taken.includes(b!))).toBe(true);
    expect(again[0]).not.toBe(again[1]);
  });

  it("hands its staging buffers back when the file cannot be created", async () => {
    dir = tempDir("kiln-ingest-");
    const given: Uint8Array[] = [];
    const pool = createStagingPool();
    const spy = { take: () => pool.take(), give: (b: Uint8Array) => given.push(b) };
    const missing = path.join(dir.path, "no-such-dir", "ingest");
    await expect(openIngestFile(missing, { pool: spy, direct: true })).rejects.toMatchObject({
      code: "ENOENT",
    });
    expect(given).toHaveLength(2);
  });

  it("writes through the page cache when no aligned buffer can be had", async () => {
    dir = tempDir("kiln-ingest-");
    const file = path.join(dir.path, "ingest");
    const f = await openIngestFile(file, { pool: { take: () => undefined, give: () => {} }, direct: true });
    expect(f.direct).toBe(false);
    const bytes = randomBytes(STAGE_BYTES + 5);
    await f.write(bytes);
    await f.finish();
    await f.close();
    expect(sha(fs.readFileSync(file))).toBe(sha(bytes));
  });

  it("reports a failed write at the next call or at finish", async () => {
    // Every write to /dev/full fails with ENOSPC.
    const f = await openIngestFile("/dev/full", { pool: createStagingPool(), direct: false });
    await f.write(Buffer.alloc(STAGE_BYTES, 1)); // fills a stage: its write starts
    const failed = async () => {
      await f.write(Buffer.alloc(STAGE_BYTES, 2));
      await f.finish();
    };
    await expect(failed()).rejects.toMatchObject({ code: "ENOSPC" });
    await f.close();
  });
});
