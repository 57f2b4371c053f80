import fsp from "node:fs/promises";
import path from "node:path";
import { type ExtractedArchive, extractArchive } from "./archive.js";
import { digestOf } from "./digest.js";
import { ImageNotFoundError, MalformedImageError } from "./errors.js";
import { createArchiveStore } from "./layout-store.js";
import { DEFAULT_PLATFORM, MEDIA_TYPES } from "./manifest.js";
import { resolveLocalPath } from "./policy.js";
import { formatImageRef, parseDockerReference } from "./reference.js";
import { MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, resolveImage } from "./resolve.js";
import type { ImageRef, ImageSource, LayerInfo, ResolvedImage, SourceOptions } from "./source.js";

/**
 * `docker-archive:FILE[:REPO:TAG]`: the `docker save` format. manifest.json lists each image's
 * config file and layer tars (usually uncompressed); their digests are computed here, and a
 * Docker v2 manifest is synthesized from them so the image has a stable manifest digest and goes
 * through the same checks as a pulled one.
 */

interface SavedImage {
  Config?: unknown;
  RepoTags?: unknown;
  Layers?: unknown;
}

const LAYER_MEDIA = {
  none: "application/vnd.docker.image.rootfs.diff.tar",
  gzip: "application/vnd.docker.image.rootfs.diff.tar.gzip",
  zstd: "application/vnd.oci.image.layer.v1.tar+zstd",
} as const;

async function sniffCompression(file: string): Promise<LayerInfo["compression"]> {
  const fd = await fsp.open(file, "r");
  try {
    const b = Buffer.alloc(4);
    const { bytesRead } = await fd.read(b, 0, 4, 0);
    if (bytesRead >= 2 && b[0] === 0x1f && b[1] === 0x8b) return "gzip";
    if (bytesRead === 4 && b.readUInt32LE(0) === 0xfd2fb528) return "zstd";
    return "none";
  } finally {
    await fd.close();
  }
}

function strings(v: unknown): string[] | undefined {
  return Array.isArray(v) && v.every((s) => typeof s === "string") ? v : undefined;
}

function selectImage(images: SavedImage[], ref: ImageRef, name: string): SavedImage {
  const tagsOf = (img: SavedImage) => strings(img.RepoTags) ?? [];
  if (ref.repository !== undefined) {
    const found = images.find((img) =>
      tagsOf(img).some((t) => {
        try {
          const r = parseDockerReference(t, t);
          return r.registry === ref.registry && r.repository === ref.repository && r.tag === ref.tag;
        } catch {
          return false;
        }
      }),
    );
    if (!found) {
      throw new ImageNotFoundError(
        name,
        `no image tagged ${ref.registry}/${ref.repository}:${ref.tag} in manifest.json (tags: ${images.flatMap(tagsOf).join(", ") || "none"})`,
      );
    }
    return found;
  }
  if (images.length === 1 && images[0]) return images[0];
  throw new ImageNotFoundError(
    name,
    images.length === 0
      ? "manifest.json lists no images"
      : `the archive holds ${images.length} images; name one as ${name}:REPO:TAG (tags: ${images.flatMap(tagsOf).join(", ") || "none"})`,
  );
}

export function createDockerArchiveSource(ref: ImageRef, opts: SourceOptions): ImageSource {
  const name = formatImageRef(ref);
  let extracted: Promise<ExtractedArchive> | undefined;
  const byDigest = new Map<string, string>();

  const extract = (signal?: AbortSignal) => {
    extracted ??= (async () => {
      if (!ref.path) throw new TypeError("a docker-archive: reference needs a path");
      const file = await resolveLocalPath(ref.path, opts.localImageDirs);
      const st = await fsp.stat(file);
      if (!st.isFile())
        throw new MalformedImageError(
          `${ref.path} is not a file; docker-archive: needs a \`docker save\` tar`,
        );
      const dest = await fsp.mkdtemp(path.join(opts.tempDir, "docker-archive-"));
      return extractArchive(file, dest, () => true, signal);
    })();
    return extracted;
  };

  return {
    registryLabel: "local",
    async resolve(signal): Promise<ResolvedImage> {
      const archive = await extract(signal);
      const store = createArchiveStore(archive, name);
      let images: unknown;
      try {
        images = JSON.parse((await store.read("manifest.json", MAX_MANIFEST_BYTES)).toString("utf8"));
      } catch (err) {
        if (err instanceof ImageNotFoundError) {
          throw new MalformedImageError(`${name} is not a docker save archive: it has no manifest.json`, {
            cause: err,
          });
        }
        throw new MalformedImageError(`${name}: manifest.json is not valid JSON`, { cause: err });
      }
      if (!Array.isArray(images))
        throw new MalformedImageError(`${name}: manifest.json is not a list of images`);
      const image = selectImage(images as SavedImage[], ref, name);
      const configName = typeof image.Config === "string" ? image.Config : undefined;
      const layerNames = strings(image.Layers);
      if (!configName || !layerNames)
        throw new MalformedImageError(`${name}: manifest.json entry has no Config or Layers`);
      const member = (n: string, what: string) => {
        const f = archive.lookup(n);
        if (!f)
          throw new MalformedImageError(
            `${name}: ${what} ${n} named in manifest.json is missing from the archive`,
          );
        return f;
      };
      const config = member(configName, "config");
      if (config.size > MAX_CONFIG_BYTES)
        throw new MalformedImageError(`${name}: config ${configName} is too large`);
      byDigest.set(config.digest, config.file);
      const layers: Array<{ mediaType: string; digest: string; size: number }> = [];
      for (const n of layerNames) {
        const f = member(n, "layer");
        byDigest.set(f.digest, f.file);
        layers.push({
          mediaType: LAYER_MEDIA[await sniffCompression(f.file)],
          digest: f.digest,
          size: f.size,
        });
      }
      const manifest = Buffer.from(
        JSON.stringify({
          schemaVersion: 2,
          mediaType: MEDIA_TYPES.dockerManifest,
          config: { mediaType: MEDIA_TYPES.dockerConfig, digest: config.digest, size: config.size },
          layers,
        }),
      );
      return resolveImage({
        ref,
        name,
        top: { body: manifest, expectedDigest: digestOf(manifest) },
        reader: {
          async fetchBlob(desc) {
            const file = byDigest.get(desc.digest);
            if (!file) throw new MalformedImageError(`${name}: no archive member with digest ${desc.digest}`);
            return { body: await fsp.readFile(file) };
          },
        },
        platform: opts.platform ?? DEFAULT_PLATFORM,
        log: opts.log,
        ...(signal ? { signal } : {}),
      });
    },
    async openBlob(layer, signal) {
      await extract(signal);
      const file = byDigest.get(layer.digest);
      if (!file)
        throw new ImageNotFoundError(name, `no layer ${layer.digest} in the archive (call resolve first)`);
      return (await fsp.open(file)).createReadStream();
    },
  };
}
