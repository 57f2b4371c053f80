import fs from "node:fs";
import path from "node:path";
import type { Readable } from "node:stream";
import zlib from "node:zlib";
import { createLogger } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import tar from "tar-stream";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createLayerCache } from "../cache/layer-cache.js";
import { type Descriptor, layerTar, MEDIA, sha256, writeOciLayout } from "../testing/oci-layout.js";
import {
  DigestMismatchError,
  ImageNotFoundError,
  LocalPathNotAllowedError,
  MalformedImageError,
  PlatformNotFoundError,
} from "./errors.js";
import { parseImageRef } from "./reference.js";
import { openImageSource, type SourceOptions } from "./source.js";

const log = createLogger({ service: "test", level: "silent" });

async function readAll(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of stream) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

type TarEntry = {
  name: string;
  content?: Buffer;
  type?: "file" | "symlink" | "directory";
  linkname?: string;
};

async function writeTar(file: string, entries: TarEntry[], gzip = false): Promise<void> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  pack.on("data", (c: unknown) => chunks.push(c as Buffer));
  const done = new Promise<void>((resolve) => pack.on("end", resolve));
  for (const e of entries) {
    const type = e.type ?? "file";
    if (type === "file")
      pack.entry({ name: e.name, size: e.content?.length ?? 0 }, e.content ?? Buffer.alloc(0));
    else if (type === "symlink") pack.entry({ name: e.name, type, linkname: e.linkname ?? "" });
    else pack.entry({ name: e.name, type });
  }
  pack.finalize();
  await done;
  const data = Buffer.concat(chunks);
  fs.writeFileSync(file, gzip ? zlib.gzipSync(data) : data);
}

/** Every file of a directory as tar entries (names relative to it). */
function dirEntries(root: string, prefix = ""): TarEntry[] {
  const out: TarEntry[] = [];
  for (const name of fs.readdirSync(path.join(root, prefix))) {
    const rel = prefix ? `${prefix}/${name}` : name;
    const st = fs.statSync(path.join(root, rel));
    if (st.isDirectory()) out.push({ name: `${rel}/`, type: "directory" }, ...dirEntries(root, rel));
    else out.push({ name: rel, content: fs.readFileSync(path.join(root, rel)) });
  }
  return out;
}

describe("local image sources", () => {
  const dir = tempDir("kiln-local-src-");
  const allowed = path.join(dir.path, "images");
  const outside = path.join(dir.path, "elsewhere");
  const scratch = path.join(dir.path, "build", "temp");
  const layout = path.join(allowed, "layout");
  const single = path.join(allowed, "single");
  let tags: Record<string, Descriptor>;

  const opts = (extra?: Partial<SourceOptions>): SourceOptions => ({
    insecureRegistries: [],
    allowedRegistries: [],
    localImageDirs: [allowed],
    log,
    tempDir: scratch,
    ...extra,
  });
  const open = (uri: string, extra?: Partial<SourceOptions>) =>
    openImageSource(parseImageRef(uri), opts(extra));

  beforeAll(async () => {
    fs.mkdirSync(outside, { recursive: true });
    fs.mkdirSync(scratch, { recursive: true });
    const arch = (architecture: string) => ({
      layers: [[{ type: "file" as const, path: "arch", content: architecture }]],
      architecture,
    });
    tags = await writeOciLayout(layout, [
      {
        tag: "one",
        image: {
          layers: [
            [{ type: "file", path: "a", content: "a" }],
            [{ type: "file", path: "b", content: "b".repeat(5000) }],
          ],
          config: { Cmd: ["/a"] },
        },
      },
      {
        tag: "docker",
        image: { dockerMediaTypes: true, layers: [[{ type: "file", path: "d", content: "d" }]] },
      },
      { tag: "multi", platforms: [arch("arm64"), arch("amd64")] },
      { tag: "arm", platforms: [arch("arm64"), arch("s390x")] },
    ]);
    await writeOciLayout(single, [
      { tag: "only", image: { compression: "none", layers: [[{ type: "file", path: "s", content: "s" }]] } },
    ]);
  });

  afterAll(() => dir.remove());

  describe("oci:", () => {
    it("reads a tagged image from a layout, blobs verified", async () => {
      const source = open(`oci:${layout}:one`);
      expect(source.registryLabel).toBe("local");
      const image = await source.resolve();
      expect(image.manifestDigest).toBe(tags.one?.digest);
      expect(image.config.config?.Cmd).toEqual(["/a"]);
      expect(image.layers).toHaveLength(2);
      for (const layer of image.layers)
        expect(sha256(await readAll(await source.openBlob(layer)))).toBe(layer.digest);
    });

    it("reads Docker media types and indexes inside a layout", async () => {
      const docker = await open(`oci:${layout}:docker`).resolve();
      expect(docker.layers[0]?.mediaType).toBe(MEDIA.dockerLayerGzip);
      const multi = await open(`oci:${layout}:multi`).resolve();
      expect(multi.indexDigest).toBe(tags.multi?.digest);
      expect(multi.platform).toBe("linux/amd64");
      const err = await open(`oci:${layout}:arm`)
        .resolve()
        .catch((e) => e);
      expect(err).toBeInstanceOf(PlatformNotFoundError);
      expect(err.message).toContain("linux/arm64, linux/s390x");
    });

    it("takes the only image when no tag is given, and asks for one when there are several", async () => {
      const image = await open(`oci:${single}`).resolve();
      expect(image.layers[0]?.compression).toBe("none");
      const err = await open(`oci:${layout}`)
        .resolve()
        .catch((e) => e);
      expect(err).toBeInstanceOf(ImageNotFoundError);
      expect(err.message).toContain("lists 4 images");
      expect(err.message).toContain("one, docker, multi, arm");
      const missing = await open(`oci:${layout}:nope`)
        .resolve()
        .catch((e) => e);
      expect(missing).toBeInstanceOf(ImageNotFoundError);
      expect(missing.message).toContain('no image tagged "nope"');
    });

    it("refuses paths outside UNKEY_BUILDERD_LOCAL_IMAGE_DIRS, also through symlinks", async () => {
      await writeOciLayout(path.join(outside, "layout"), [{ tag: "x", image: { layers: [] } }]);
      const err = await open(`oci:${outside}/layout:x`)
        .resolve()
        .catch((e) => e);
      expect(err).toBeInstanceOf(LocalPathNotAllowedError);
      expect(err.message).toContain("UNKEY_BUILDERD_LOCAL_IMAGE_DIRS");
      fs.symlinkSync(path.join(outside, "layout"), path.join(allowed, "link-out"));
      const viaLink = await open(`oci:${allowed}/link-out:x`)
        .resolve()
        .catch((e) => e);
      expect(viaLink).toBeInstanceOf(LocalPathNotAllowedError);
      const dotdot = await open(`oci:${allowed}/../elsewhere/layout:x`)
        .resolve()
        .catch((e) => e);
      expect(dotdot).toBeInstanceOf(LocalPathNotAllowedError);
      const disabled = await open(`oci:${layout}:one`, { localImageDirs: [] })
        .resolve()
        .catch((e) => e);
      expect(disabled).toBeInstanceOf(LocalPathNotAllowedError);
      expect(disabled.message).toContain("UNKEY_BUILDERD_LOCAL_IMAGE_DIRS is empty");
    });

    it("refuses a blob that is a symlink leading out of the layout", async () => {
      const evil = path.join(allowed, "evil");
      fs.cpSync(single, evil, { recursive: true });
      const image = await open(`oci:${evil}`).resolve();
      const layer = image.layers[0];
      if (!layer) throw new Error("no layer");
      const blob = path.join(evil, "blobs/sha256", layer.digest.slice(7));
      fs.writeFileSync(path.join(outside, "secret"), fs.readFileSync(blob));
      fs.rmSync(blob);
      fs.symlinkSync(path.join(outside, "secret"), blob);
      const err = await open(`oci:${evil}`)
        .openBlob(layer)
        .catch((e) => e);
      expect(err).toBeInstanceOf(MalformedImageError);
      expect(err.message).toContain("leads outside the image layout");
    });

    it("streams a corrupted layer blob as stored; ingesting it fails with DigestMismatchError", async () => {
      const bad = path.join(allowed, "bad");
      fs.cpSync(single, bad, { recursive: true });
      const source = open(`oci:${bad}`);
      const image = await source.resolve();
      const layer = image.layers[0];
      if (!layer) throw new Error("no layer");
      const blob = path.join(bad, "blobs/sha256", layer.digest.slice(7));
      const bytes = fs.readFileSync(blob);
      bytes[0] = (bytes[0] ?? 0) ^ 1;
      fs.writeFileSync(blob, bytes);
      expect((await readAll(await source.openBlob(layer))).equals(bytes)).toBe(true);
      const cache = createLayerCache(path.join(bad, "cache"));
      const err = await cache.ingest(layer, () => source.openBlob(layer)).catch((e) => e);
      expect(err).toBeInstanceOf(DigestMismatchError);
      expect(err.message).toContain(layer.digest);
      expect(await cache.has(layer.digest)).toBe(false);
    });

    it("refuses a directory that is not an image layout", async () => {
      fs.mkdirSync(path.join(allowed, "empty"));
      const err = await open(`oci:${allowed}/empty`)
        .resolve()
        .catch((e) => e);
      expect(err).toBeInstanceOf(MalformedImageError);
      expect(err.message).toContain("no oci-layout file");
    });
  });

  describe("oci-archive:", () => {
    it("reads a tar (plain or gzip) of a layout, taking only layout members and writing only under tempDir", async () => {
      const hostile: TarEntry[] = [
        { name: "../escape.txt", content: Buffer.from("x") },
        { name: "/abs-escape.txt", content: Buffer.from("x") },
        { name: "blobs/sha256/../../../../escape2.txt", content: Buffer.from("x") },
        { name: "blobs/sha256/link", type: "symlink", linkname: "/etc/passwd" },
        { name: "extra/file", content: Buffer.from("ignored") },
      ];
      for (const gzip of [false, true]) {
        const file = path.join(allowed, `layout${gzip ? ".tgz" : ".tar"}`);
        await writeTar(file, [...hostile, ...dirEntries(layout)], gzip);
        const temp = path.join(scratch, gzip ? "gz" : "plain");
        fs.mkdirSync(temp);
        const source = open(`oci-archive:${file}:one`, { tempDir: temp });
        const image = await source.resolve();
        expect(image.manifestDigest).toBe(tags.one?.digest);
        for (const layer of image.layers)
          expect(sha256(await readAll(await source.openBlob(layer)))).toBe(layer.digest);
        // Everything extracted sits in one fresh directory under tempDir, under our own names.
        const [extracted, ...more] = fs.readdirSync(temp);
        expect(more).toEqual([]);
        for (const name of fs.readdirSync(path.join(temp, extracted as string)))
          expect(name).toMatch(/^entry-\d+$/);
      }
      for (const p of [
        path.join(scratch, "..", "escape.txt"),
        "/abs-escape.txt",
        path.join(dir.path, "escape2.txt"),
      ]) {
        expect(fs.existsSync(p)).toBe(false);
      }
    });

    it("refuses an archive outside the allowed directories", async () => {
      const file = path.join(outside, "x.tar");
      await writeTar(file, dirEntries(single));
      const err = await open(`oci-archive:${file}`)
        .resolve()
        .catch((e) => e);
      expect(err).toBeInstanceOf(LocalPathNotAllowedError);
    });

    it("reports a file that is not a tar", async () => {
      const file = path.join(allowed, "garbage.tar");
      fs.writeFileSync(file, Buffer.alloc(3000, 0x41));
      const err = await open(`oci-archive:${file}`)
        .resolve()
        .catch((e) => e);
      expect(err).toBeInstanceOf(MalformedImageError);
    });
  });

  describe("docker-archive:", () => {
    let file: string;
    let layers: Buffer[];

    beforeAll(async () => {
      const l1 = await layerTar([{ type: "file", path: "etc/one", content: "1" }]);
      const l2 = zlib.gzipSync(
        await layerTar([{ type: "file", path: "etc/two", content: "2".repeat(3000) }]),
      );
      layers = [l1, l2, l1];
      const config = Buffer.from(
        JSON.stringify({
          architecture: "amd64",
          os: "linux",
          config: { Entrypoint: ["/bin/sh"], Env: ["PATH=/bin"] },
          rootfs: { type: "layers", diff_ids: [sha256(l1), sha256(zlib.gunzipSync(l2)), sha256(l1)] },
        }),
      );
      const configName = `${sha256(config).slice(7)}.json`;
      const manifest = [
        {
          Config: configName,
          RepoTags: ["kiln/app:1", "registry.example.com/team/app:2"],
          Layers: ["l1/layer.tar", "l2/layer.tar", "l3/layer.tar"],
        },
        { Config: configName, RepoTags: ["other:latest"], Layers: ["l1/layer.tar"] },
      ];
      file = path.join(allowed, "saved.tar");
      await writeTar(file, [
        { name: "l1/", type: "directory" },
        { name: "l1/layer.tar", content: l1 },
        { name: "l2/layer.tar", content: l2 },
        // docker save links identical layers instead of storing them twice
        { name: "l3/layer.tar", type: "symlink", linkname: "../l1/layer.tar" },
        { name: configName, content: config },
        { name: "repositories", content: Buffer.from("{}") },
        { name: "manifest.json", content: Buffer.from(JSON.stringify(manifest)) },
      ]);
    });

    it("reads a docker save archive, computing digests (uncompressed and gzip layers, shared layers)", async () => {
      const source = open(`docker-archive:${file}:kiln/app:1`);
      const image = await source.resolve();
      expect(image.platform).toBe("linux/amd64");
      expect(image.config.config?.Entrypoint).toEqual(["/bin/sh"]);
      expect(image.layers.map((l) => [l.digest, l.size, l.compression])).toEqual(
        layers.map((b, i) => [sha256(b), b.length, i === 1 ? "gzip" : "none"]),
      );
      expect(image.layers[0]?.mediaType).toBe("application/vnd.docker.image.rootfs.diff.tar");
      expect(image.manifestDigest).toMatch(/^sha256:[a-f0-9]{64}$/);
      for (const layer of image.layers)
        expect(sha256(await readAll(await source.openBlob(layer)))).toBe(layer.digest);
      // The synthesized manifest is stable: the same archive has the same manifest digest.
      const again = await open(`docker-archive:${file}:docker.io/kiln/app:1`).resolve();
      expect(again.manifestDigest).toBe(image.manifestDigest);
      const byFullName = await open(`docker-archive:${file}:registry.example.com/team/app:2`).resolve();
      expect(byFullName.manifestDigest).toBe(image.manifestDigest);
    });

    it("asks which image when the archive holds several, and lists the tags when one is missing", async () => {
      const err = await open(`docker-archive:${file}`)
        .resolve()
        .catch((e) => e);
      expect(err).toBeInstanceOf(ImageNotFoundError);
      expect(err.message).toContain("holds 2 images");
      const missing = await open(`docker-archive:${file}:kiln/app:9`)
        .resolve()
        .catch((e) => e);
      expect(missing).toBeInstanceOf(ImageNotFoundError);
      expect(missing.message).toContain("kiln/app:1, registry.example.com/team/app:2, other:latest");
    });

    it("refuses an archive outside the allowed directories", async () => {
      const copy = path.join(outside, "saved.tar");
      fs.copyFileSync(file, copy);
      const err = await open(`docker-archive:${copy}`)
        .resolve()
        .catch((e) => e);
      expect(err).toBeInstanceOf(LocalPathNotAllowedError);
    });

    it("refuses a tar without manifest.json", async () => {
      const bare = path.join(allowed, "bare.tar");
      await writeTar(bare, [{ name: "x", content: Buffer.from("x") }]);
      const err = await open(`docker-archive:${bare}`)
        .resolve()
        .catch((e) => e);
      expect(err).toBeInstanceOf(MalformedImageError);
      expect(err.message).toContain("no manifest.json");
    });
  });
});
