import fsp from "node:fs/promises";
import path from "node:path";
import { extractArchive } from "./archive.js";
import { ImageNotFoundError, MalformedImageError } from "./errors.js";
import { blobName, createArchiveStore, createDirStore, type LayoutStore } from "./layout-store.js";
import { DEFAULT_PLATFORM, type Descriptor, parseManifest } from "./manifest.js";
import { resolveLocalPath } from "./policy.js";
import { formatImageRef } from "./reference.js";
import { MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, resolveImage } from "./resolve.js";
import type { ImageRef, ImageSource, ResolvedImage, SourceOptions } from "./source.js";

/**
 * `oci:DIR[:TAG]` (an OCI image layout directory) and `oci-archive:FILE[:TAG]` (a tar of one).
 * The tag is the `org.opencontainers.image.ref.name` annotation in index.json; without a tag the
 * layout must hold exactly one image. An archive is unpacked into the build's scratch space, but
 * only `oci-layout`, `index.json` and `blobs/sha256/<64 hex>` are taken from it.
 */
const REF_NAME = "org.opencontainers.image.ref.name";
const ARCHIVE_MEMBER = /^(oci-layout|index\.json|blobs\/sha256\/[a-f0-9]{64})$/;

export function createOciLayoutSource(ref: ImageRef, opts: SourceOptions): ImageSource {
  return layoutSource(ref, opts, async () => {
    const root = await resolveLocalPath(requirePath(ref), opts.localImageDirs);
    const st = await fsp.stat(root);
    if (!st.isDirectory()) {
      throw new MalformedImageError(
        `${ref.path} is not a directory; oci: needs an OCI image layout directory (use oci-archive: for a tar)`,
      );
    }
    return createDirStore(root, formatImageRef(ref));
  });
}

export function createOciArchiveSource(ref: ImageRef, opts: SourceOptions): ImageSource {
  return layoutSource(ref, opts, async (signal) => {
    const file = await resolveLocalPath(requirePath(ref), opts.localImageDirs);
    const st = await fsp.stat(file);
    if (!st.isFile())
      throw new MalformedImageError(
        `${ref.path} is not a file; oci-archive: needs a tar of an OCI image layout`,
      );
    const dest = await fsp.mkdtemp(path.join(opts.tempDir, "oci-archive-"));
    const archive = await extractArchive(file, dest, (name) => ARCHIVE_MEMBER.test(name), signal);
    return createArchiveStore(archive, formatImageRef(ref));
  });
}

function requirePath(ref: ImageRef): string {
  if (!ref.path) throw new TypeError(`a ${ref.transport}: reference needs a path`);
  return ref.path;
}

function layoutSource(
  ref: ImageRef,
  opts: SourceOptions,
  openStore: (signal?: AbortSignal) => Promise<LayoutStore>,
): ImageSource {
  const name = formatImageRef(ref);
  let store: Promise<LayoutStore> | undefined;
  const getStore = (signal?: AbortSignal) => {
    store ??= openStore(signal);
    return store;
  };
  return {
    registryLabel: "local",
    async resolve(signal): Promise<ResolvedImage> {
      const s = await getStore(signal);
      if (!(await s.exists("oci-layout"))) {
        throw new MalformedImageError(`${name} is not an OCI image layout: it has no oci-layout file`);
      }
      const layout = JSON.parse((await s.read("oci-layout", 64 * 1024)).toString("utf8")) as {
        imageLayoutVersion?: unknown;
      };
      if (typeof layout.imageLayoutVersion !== "string") {
        throw new MalformedImageError(`${name}: oci-layout has no imageLayoutVersion`);
      }
      const index = parseManifest(
        await s.read("index.json", MAX_MANIFEST_BYTES),
        undefined,
        `${name} index.json`,
      );
      if (index.kind !== "index") throw new MalformedImageError(`${name}: index.json is not an image index`);
      const desc = pickTagged(index.manifests, ref.tag, name);
      const top = await s.read(blobName(desc.digest), MAX_MANIFEST_BYTES);
      return resolveImage({
        ref,
        name,
        top: { body: top, contentType: desc.mediaType, expectedDigest: desc.digest, expectedSize: desc.size },
        reader: {
          async fetchBlob(d: Descriptor, kind) {
            const body = await s.read(
              blobName(d.digest),
              kind === "manifest" ? MAX_MANIFEST_BYTES : MAX_CONFIG_BYTES,
            );
            return { body, contentType: d.mediaType };
          },
        },
        platform: opts.platform ?? DEFAULT_PLATFORM,
        log: opts.log,
        ...(signal ? { signal } : {}),
      });
    },
    async openBlob(layer, signal) {
      const s = await getStore(signal);
      return s.open(blobName(layer.digest));
    },
  };
}

function pickTagged(manifests: Descriptor[], tag: string | undefined, name: string): Descriptor {
  const tags = manifests.map((m) => m.annotations?.[REF_NAME]).filter((t): t is string => t !== undefined);
  if (tag !== undefined) {
    const found = manifests.find((m) => m.annotations?.[REF_NAME] === tag);
    if (!found) {
      throw new ImageNotFoundError(
        name,
        `no image tagged "${tag}" in index.json (tags: ${tags.join(", ") || "none"})`,
      );
    }
    return found;
  }
  if (manifests.length === 1 && manifests[0]) return manifests[0];
  if (manifests.length === 0) throw new ImageNotFoundError(name, "index.json lists no images");
  throw new ImageNotFoundError(
    name,
    `index.json lists ${manifests.length} images; name one as ${name}:TAG (tags: ${tags.join(", ") || "none"})`,
  );
}
