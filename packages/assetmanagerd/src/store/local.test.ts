import fs from "node:fs";
import path from "node:path";
import { tempDir } from "@kiln/kit/testing";
import { describe, expect, it } from "vitest";
import { blobStoreSuite, sha256 } from "./blob-store.suite.js";
import { createLocalBlobStore } from "./local.js";

blobStoreSuite("local", async () => {
  const dir = tempDir("kiln-blobs-");
  const root = path.join(dir.path, "assets");
  const ingestDir = path.join(root, "ingest");
  const store = createLocalBlobStore({ root });
  return {
    store,
    reopen: async () => createLocalBlobStore({ root }),
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
