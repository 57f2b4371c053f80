import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, describe, expect, it } from "vitest";
import { readFileChunks } from "./file-chunks.js";

describe("readFileChunks", () => {
  const dirs: Array<{ path: string; remove(): void }> = [];
  const fileOf = (bytes: Buffer) => {
    const d = tempDir("kiln-file-chunks-");
    dirs.push(d);
    const file = path.join(d.path, "f");
    fs.writeFileSync(file, bytes);
    return file;
  };
  afterEach(() => {
    for (const d of dirs.splice(0)) d.remove();
  });
  const openFds = () => fs.readdirSync("/proc/self/fd").length;

  it("yields the file's bytes in order, each chunk at most the chunk size", async () => {
    const bytes = randomBytes(5 * 1000 + 123);
    const seen: Buffer[] = [];
    for await (const chunk of readFileChunks(fileOf(bytes), 1000)) {
      expect(chunk.length).toBeLessThanOrEqual(1000);
      seen.push(Buffer.from(chunk)); // a copy: the buffer is reused
    }
    expect(seen).toHaveLength(6);
    expect(Buffer.concat(seen).equals(bytes)).toBe(true);
  });

  it("keeps a chunk intact until the next one is requested", async () => {
    const bytes = randomBytes(64 * 1024);
    const file = fileOf(bytes);
    let offset = 0;
    for await (const chunk of readFileChunks(file, 4096)) {
      // The read of the next chunk is under way; this one must not change meanwhile.
      await new Promise((r) => setTimeout(r, 1));
      expect(chunk.equals(bytes.subarray(offset, offset + chunk.length))).toBe(true);
      offset += chunk.length;
    }
    expect(offset).toBe(bytes.length);
  });

  it("yields nothing for an empty file", async () => {
    const chunks: Buffer[] = [];
    for await (const c of readFileChunks(fileOf(Buffer.alloc(0)), 1024)) chunks.push(c);
    expect(chunks).toEqual([]);
  });

  it("closes the file when the caller stops early", async () => {
    const file = fileOf(randomBytes(100_000));
    const before = openFds();
    for await (const _ of readFileChunks(file, 1000)) break;
    expect(openFds()).toBe(before);
  });
});
