import fs from "node:fs";
import path from "node:path";
import { tempDir } from "@kiln/kit/testing";
import { describe, expect, it } from "vitest";
import { blobStoreSuite, sha256 } from "./blob-store.suite.js";
import { createLocalBlobStore } from "./local.js";

for (const [name, directIo] of [
  ["local", true],
  ["local, through the page cache", false],
] as const) {
  blobStoreSuite(name, async () => {
    const dir = tempDir("kiln-blobs-");
    const root = path.join(dir.path, "assets");
    const ingestDir = path.join(root, "ingest");
    const store = createLocalBlobStore({ root, directIo });
    return {
      store,
      reopen: async () => createLocalBlobStore({ root, directIo }),
      async plantLeftover(ref, bytes) {
        fs.mkdirSync(ingestDir, { recursive: true });
        fs.writeFileSync(path.join(ingestDir, ref), bytes);
      },
      async leftovers() {
        return fs.existsSync(ingestDir) ? fs.readdirSync(ingestDir) : [];
      },
      async teardown() {
        await store.close();
        dir.remove();
      },
    };
  });
}

describe("local blob store layout", () => {
  it("keeps committed blobs read-only at sha256/ab/<hex>", async () => {
    const dir = tempDir("kiln-blobs-");
    try {
      const store = createLocalBlobStore({ root: dir.path });
      const w = await store.ingest("r");
      await w.write(Buffer.from("kernel bytes"));
      const { digest } = await w.commit();
      const hex = digest.slice("sha256:".length);
      const file = path.join(dir.path, "sha256", hex.slice(0, 2), hex);
      expect(store.localPath(digest)).toBe(file);
      expect(store.location(digest)).toBe(file);
      expect(fs.readFileSync(file, "utf8")).toBe("kernel bytes");
      expect(fs.statSync(file).mode & 0o777).toBe(0o444);
      expect(digest).toBe(sha256(Buffer.from("kernel bytes")));
      // Nothing left in the ingest directory.
      expect(fs.readdirSync(path.join(dir.path, "ingest"))).toEqual([]);
    } finally {
      dir.remove();
    }
  });
});

describe("local blob store: adopting a file by hard link", () => {
  const setup = () => {
    const dir = tempDir("kiln-adopt-");
    const store = createLocalBlobStore({ root: path.join(dir.path, "assets") });
    const source = path.join(dir.path, "rootfs.ext4");
    fs.writeFileSync(source, Buffer.alloc(3 * 1024 * 1024, 7));
    return { dir, store, source };
  };
  const hashInto = async (w: { write(c: Uint8Array): Promise<void> }, file: string) => {
    for await (const chunk of fs.createReadStream(file)) await w.write(chunk as Buffer);
  };

  it("publishes the file itself as the blob, without a copy", async () => {
    const { dir, store, source } = setup();
    try {
      const w = await store.adopt!("asset-a", source);
      expect(w).toBeDefined();
      await hashInto(w!, source);
      const digest = sha256(fs.readFileSync(source));
      const r = await w!.commit({ digest, size: 3 * 1024 * 1024 });
      expect(r).toEqual({ digest, size: 3 * 1024 * 1024, created: true });
      const blob = store.localPath(digest)!;
      expect(fs.statSync(blob).ino).toBe(fs.statSync(source).ino);
      expect(fs.statSync(blob).mode & 0o777).toBe(0o444);
      expect(fs.readdirSync(path.join(dir.path, "assets", "ingest"))).toEqual([]);
    } finally {
      dir.remove();
    }
  });

  it("keeps nothing and leaves the source alone on a digest mismatch", async () => {
    const { dir, store, source } = setup();
    try {
      const w = await store.adopt!("asset-b", source);
      await hashInto(w!, source);
      await expect(w!.commit({ digest: `sha256:${"0".repeat(64)}` })).rejects.toThrow(/checksum mismatch/);
      expect([...(await collect(store.list()))]).toEqual([]);
      expect(fs.statSync(source).nlink).toBe(1);
      expect(fs.statSync(source).mode & 0o777).not.toBe(0o444);
    } finally {
      dir.remove();
    }
  });
});

async function collect<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
}
