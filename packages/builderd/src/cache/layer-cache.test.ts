import fs from "node:fs";
import path from "node:path";
import { Readable } from "node:stream";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, describe, expect, it } from "vitest";
import { DigestMismatchError } from "../sources/errors.js";
import type { LayerInfo } from "../sources/source.js";
import { sha256 } from "../testing/oci-layout.js";
import { createLayerCache, type GrowingFile } from "./layer-cache.js";

const blob = Buffer.alloc(300_000, 3);
const layer: LayerInfo = {
  digest: sha256(blob),
  size: blob.length,
  mediaType: "application/vnd.oci.image.layer.v1.tar",
  compression: "none",
};

/** A stream of `data` in chunks, ending after a tick per chunk (so downloads overlap). */
function slowStream(data: Buffer, chunk = 64 * 1024): Readable {
  let offset = 0;
  return new Readable({
    read() {
      setTimeout(() => {
        if (offset >= data.length) this.push(null);
        else {
          this.push(data.subarray(offset, offset + chunk));
          offset += chunk;
        }
      }, 2);
    },
  });
}

describe("layer cache", () => {
  const dirs: Array<{ remove(): void }> = [];
  const fresh = () => {
    const d = tempDir("kiln-cache-");
    dirs.push(d);
    return { dir: d.path, cache: createLayerCache(d.path) };
  };
  afterEach(() => {
    for (const d of dirs.splice(0)) d.remove();
  });

  it("stores a blob under sha256/<hex>, read-only, and reports progress", async () => {
    const { dir, cache } = fresh();
    let bytes = 0;
    const file = await cache.ingest(
      layer,
      async () => slowStream(blob),
      (n) => {
        bytes += n;
      },
    );
    expect(file).toBe(path.join(dir, "sha256", layer.digest.slice(7)));
    expect(cache.path(layer.digest)).toBe(file);
    expect(fs.readFileSync(file).equals(blob)).toBe(true);
    expect(fs.statSync(file).mode & 0o222).toBe(0);
    expect(bytes).toBe(blob.length);
    expect(await cache.has(layer.digest)).toBe(true);
    // Already there: no download at all.
    let opened = 0;
    await cache.ingest(layer, async () => {
      opened++;
      return slowStream(blob);
    });
    expect(opened).toBe(0);
  });

  it("downloads once for concurrent ingests of one digest, and every caller sees progress", async () => {
    const { cache } = fresh();
    let opened = 0;
    const progress = [0, 0, 0];
    const open = async () => {
      opened++;
      return slowStream(blob);
    };
    const files = await Promise.all(
      progress.map((_, i) =>
        cache.ingest(layer, open, (n) => {
          progress[i] = (progress[i] ?? 0) + n;
        }),
      ),
    );
    expect(opened).toBe(1);
    expect(new Set(files).size).toBe(1);
    expect(progress[0]).toBe(blob.length);
    expect(progress[2]).toBeGreaterThan(0);
  });

  it("hands the temp file to a reader as it is written, readable through the rename", async () => {
    const { cache } = fresh();
    const big = Buffer.alloc(3 << 20, 5);
    const bigLayer = { ...layer, digest: sha256(big), size: big.length };
    const seen: number[] = [];
    let grow: GrowingFile | undefined;
    const file = await cache.ingest(
      bigLayer,
      async () => slowStream(big, 256 * 1024),
      undefined,
      (g) => {
        grow = g;
        g.watch((w) => seen.push(w));
      },
    );
    expect(grow).toBeDefined();
    const g = grow!;
    expect(g.size).toBe(big.length);
    expect(g.written).toBe(big.length);
    // Writes were reported as they happened, growing, ending at the full size.
    expect(seen.length).toBeGreaterThan(1);
    expect([...seen].sort((a, b) => a - b)).toEqual(seen);
    expect(seen.at(-1)).toBe(big.length);
    // The descriptor still reads the (now committed) blob.
    const back = Buffer.alloc(big.length);
    expect(fs.readSync(g.fd, back, 0, back.length, 0)).toBe(big.length);
    expect(back.equals(big)).toBe(true);
    expect(fs.readFileSync(file).equals(big)).toBe(true);
    g.close();
    g.close(); // idempotent
    // A blob already cached is not downloaded: nothing to follow.
    let again = false;
    await cache.ingest(
      bigLayer,
      async () => slowStream(big),
      undefined,
      () => {
        again = true;
      },
    );
    expect(again).toBe(false);
  });

  it("says a growing file is verified before its blob is committed, and rejects a wrong one", async () => {
    const { cache } = fresh();
    const follow = (l: LayerInfo, data: Buffer) => {
      let grown!: (g: GrowingFile) => void;
      const growing = new Promise<GrowingFile>((r) => {
        grown = r;
      });
      return { growing, committed: cache.ingest(l, async () => slowStream(data), undefined, grown) };
    };
    const good = follow(layer, blob);
    const g = await good.growing;
    await g.verified;
    // Verified first: the fsync and the rename into the cache come after.
    expect(fs.existsSync(cache.path(layer.digest))).toBe(false);
    expect(await good.committed).toBe(cache.path(layer.digest));
    expect(fs.existsSync(cache.path(layer.digest))).toBe(true);
    g.close();

    const wrong = Buffer.from(blob);
    wrong[7] = 1;
    const bad = follow({ ...layer, digest: sha256(Buffer.alloc(blob.length, 4)) }, wrong);
    await expect(bad.committed).rejects.toBeInstanceOf(DigestMismatchError);
    const b = await bad.growing;
    await expect(b.verified).rejects.toBeInstanceOf(DigestMismatchError);
    b.close();
  });

  it("leaves nothing in the cache when the bytes do not match the digest", async () => {
    const { dir, cache } = fresh();
    const wrong = Buffer.from(blob);
    wrong[1000] = 9;
    const err = await cache.ingest(layer, async () => Readable.from([wrong])).catch((e) => e);
    expect(err).toBeInstanceOf(DigestMismatchError);
    expect(err.message).toContain(`expected ${layer.digest}, got ${sha256(wrong)}`);
    expect(await cache.has(layer.digest)).toBe(false);
    expect(fs.readdirSync(path.join(dir, "sha256"))).toEqual([]);
    const short = await cache
      .ingest(layer, async () => Readable.from([blob.subarray(0, 10)]))
      .catch((e) => e);
    expect(short).toBeInstanceOf(DigestMismatchError);
    expect(short.message).toContain(`expected ${blob.length} bytes, got 10`);
    const long = await cache
      .ingest(layer, async () => Readable.from([blob, Buffer.from("x")]))
      .catch((e) => e);
    expect(long).toBeInstanceOf(DigestMismatchError);
    expect(fs.readdirSync(path.join(dir, "sha256"))).toEqual([]);
  });

  it("lets a waiting ingest download itself when the shared download was cancelled", async () => {
    const { cache } = fresh();
    const aborted = cache.ingest(layer, async () => {
      const s = slowStream(blob);
      setTimeout(() => s.destroy(Object.assign(new Error("cancelled"), { name: "AbortError" })), 5);
      return s;
    });
    const waiting = cache.ingest(layer, async () => slowStream(blob));
    await expect(aborted).rejects.toThrow("cancelled");
    expect(fs.readFileSync(await waiting).equals(blob)).toBe(true);
  });

  it("cleanup() removes leftovers of interrupted ingests and keeps committed blobs", async () => {
    const { dir, cache } = fresh();
    await cache.cleanup(); // nothing there yet: no error
    const file = await cache.ingest(layer, async () => Readable.from([blob]));
    const leftover = path.join(dir, "sha256", `.ingest-${"b".repeat(64)}-1234abcd`);
    fs.writeFileSync(leftover, "partial");
    await cache.cleanup();
    expect(fs.existsSync(leftover)).toBe(false);
    expect(fs.existsSync(file)).toBe(true);
  });

  it("refuses malformed digests", () => {
    const { cache } = fresh();
    expect(() => cache.path("sha256:../../etc/passwd")).toThrow(/sha256 digests only/);
    expect(() => cache.path(`sha512:${"a".repeat(128)}`)).toThrow(/sha256 digests only/);
  });
});
