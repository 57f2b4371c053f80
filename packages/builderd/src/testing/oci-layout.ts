/**
 * Writes OCI image layouts for tests and benchmarks: layers are built from entry lists with
 * tar-stream (so tests can express whiteouts, hardlinks across layers, setuid bits, long paths and
 * hostile entries exactly), compressed, hashed and laid out as the OCI image-layout spec says
 * (`oci-layout`, `index.json`, `blobs/sha256/…`). Push one to a registry with
 * `skopeo copy oci:DIR:TAG docker://HOST/REPO:TAG` (add `--all` for an index).
 */
import { createHash } from "node:crypto";
import fs from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import zlib from "node:zlib";
import tar from "tar-stream";
import { compress as zstdCompress } from "zstd-napi";

const gzip = promisify(zlib.gzip);

interface Common {
  path: string;
  mode?: number;
  uid?: number;
  gid?: number;
  mtime?: Date;
  uname?: string;
  gname?: string;
}

export type EntrySpec =
  | (Common & { type: "file"; content?: string | Buffer })
  | (Common & { type: "dir" })
  | (Common & { type: "symlink"; target: string })
  | (Common & { type: "hardlink"; target: string })
  | (Common & { type: "char-device" | "block-device"; major?: number; minor?: number })
  | (Common & { type: "fifo" })
  /** Anything tar-stream can express, for hostile layers (`..` names, absolute links…). */
  | { type: "raw"; header: Partial<tar.Header> & { name: string }; content?: Buffer };

export interface ImageConfigSpec {
  Entrypoint?: string[];
  Cmd?: string[];
  Env?: string[];
  WorkingDir?: string;
  User?: string;
  ExposedPorts?: Record<string, object>;
  Labels?: Record<string, string>;
}

export interface ImageSpec {
  /** Each layer's entries, or a ready tar (one GNU tar made, say). */
  layers: Array<EntrySpec[] | Buffer>;
  config?: ImageConfigSpec;
  architecture?: string;
  os?: string;
  variant?: string;
  /** Layer compression (default gzip). */
  compression?: "gzip" | "zstd" | "none";
  /** Docker v2 media types instead of OCI ones. */
  dockerMediaTypes?: boolean;
}

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  platform?: { architecture: string; os: string; variant?: string };
  annotations?: Record<string, string>;
}

const EPOCH = new Date("2024-01-01T00:00:00Z");

export const MEDIA = {
  ociManifest: "application/vnd.oci.image.manifest.v1+json",
  ociIndex: "application/vnd.oci.image.index.v1+json",
  ociConfig: "application/vnd.oci.image.config.v1+json",
  ociLayerGzip: "application/vnd.oci.image.layer.v1.tar+gzip",
  ociLayerZstd: "application/vnd.oci.image.layer.v1.tar+zstd",
  ociLayer: "application/vnd.oci.image.layer.v1.tar",
  dockerManifest: "application/vnd.docker.distribution.manifest.v2+json",
  dockerList: "application/vnd.docker.distribution.manifest.list.v2+json",
  dockerConfig: "application/vnd.docker.container.image.v1+json",
  dockerLayerGzip: "application/vnd.docker.image.rootfs.diff.tar.gzip",
} as const;

export function sha256(data: Buffer | string): string {
  return `sha256:${createHash("sha256").update(data).digest("hex")}`;
}

/** The uncompressed tar of one layer. */
export async function layerTar(entries: EntrySpec[]): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  pack.on("data", (c) => chunks.push(c as Buffer));
  const done = new Promise<void>((resolve, reject) => {
    pack.on("end", resolve);
    pack.on("error", reject);
  });
  for (const e of entries) {
    if (e.type === "raw") {
      await addEntry(pack, e.header, e.content);
      continue;
    }
    const base = {
      name: e.path,
      mode: e.mode ?? (e.type === "dir" ? 0o755 : e.type === "symlink" ? 0o777 : 0o644),
      uid: e.uid ?? 0,
      gid: e.gid ?? 0,
      uname: e.uname ?? "",
      gname: e.gname ?? "",
      mtime: e.mtime ?? EPOCH,
    };
    switch (e.type) {
      case "file": {
        const content =
          typeof e.content === "string" ? Buffer.from(e.content) : (e.content ?? Buffer.alloc(0));
        await addEntry(pack, { ...base, type: "file", size: content.length }, content);
        break;
      }
      case "dir":
        await addEntry(pack, { ...base, type: "directory" });
        break;
      case "symlink":
        await addEntry(pack, { ...base, type: "symlink", linkname: e.target });
        break;
      case "hardlink":
        await addEntry(pack, { ...base, type: "link", linkname: e.target });
        break;
      case "char-device":
      case "block-device":
        await addEntry(pack, {
          ...base,
          type: e.type === "char-device" ? "character-device" : "block-device",
          devmajor: e.major ?? 1,
          devminor: e.minor ?? 3,
        });
        break;
      case "fifo":
        await addEntry(pack, { ...base, type: "fifo" });
        break;
    }
  }
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}

function addEntry(
  pack: tar.Pack,
  header: Partial<tar.Header> & { name: string },
  content?: Buffer,
): Promise<void> {
  return new Promise((resolve, reject) => {
    const cb = (err?: Error | null) => (err ? reject(err) : resolve());
    // A file entry without content would wait for a body forever: give it an empty one.
    if (!content && (header.type ?? "file") === "file") content = Buffer.alloc(0);
    if (content) pack.entry(header as tar.Header, content, cb);
    else pack.entry(header as tar.Header, cb);
  });
}

async function writeBlob(dir: string, data: Buffer | string): Promise<{ digest: string; size: number }> {
  const digest = sha256(data);
  const file = path.join(dir, "blobs", "sha256", digest.slice("sha256:".length));
  await fs.mkdir(path.dirname(file), { recursive: true });
  await fs.writeFile(file, data);
  return { digest, size: Buffer.byteLength(data) };
}

/** Writes one image's blobs (layers, config, manifest) into `dir`; returns the manifest descriptor. */
export async function writeImage(dir: string, image: ImageSpec): Promise<Descriptor & { diffIds: string[] }> {
  const docker = image.dockerMediaTypes === true;
  const layers: Descriptor[] = [];
  const diffIds: string[] = [];
  for (const entries of image.layers) {
    const raw = Buffer.isBuffer(entries) ? entries : await layerTar(entries);
    diffIds.push(sha256(raw));
    const compression = image.compression ?? "gzip";
    if (docker && compression !== "gzip") throw new Error("Docker v2 media types here are gzip layers only");
    const compressed =
      compression === "none" ? raw : compression === "zstd" ? zstdCompress(raw) : await gzip(raw);
    const { digest, size } = await writeBlob(dir, compressed);
    const mediaType = docker
      ? MEDIA.dockerLayerGzip
      : { none: MEDIA.ociLayer, zstd: MEDIA.ociLayerZstd, gzip: MEDIA.ociLayerGzip }[compression];
    layers.push({ mediaType, digest, size });
  }
  const platform = { architecture: image.architecture ?? "amd64", os: image.os ?? "linux" };
  const config = {
    created: EPOCH.toISOString(),
    ...platform,
    ...(image.variant ? { variant: image.variant } : {}),
    config: image.config ?? {},
    rootfs: { type: "layers", diff_ids: diffIds },
    history: image.layers.map(() => ({ created: EPOCH.toISOString(), created_by: "kiln test fixture" })),
  };
  const configBlob = await writeBlob(dir, JSON.stringify(config));
  const manifest = {
    schemaVersion: 2,
    mediaType: docker ? MEDIA.dockerManifest : MEDIA.ociManifest,
    config: { mediaType: docker ? MEDIA.dockerConfig : MEDIA.ociConfig, ...configBlob },
    layers,
  };
  const m = await writeBlob(dir, JSON.stringify(manifest));
  return {
    mediaType: manifest.mediaType,
    ...m,
    platform: { ...platform, ...(image.variant ? { variant: image.variant } : {}) },
    diffIds,
  };
}

export type LayoutEntry =
  | { tag: string; image: ImageSpec }
  /** A multi-platform index (or Docker manifest list) referencing one image per platform. */
  | { tag: string; platforms: ImageSpec[]; dockerMediaTypes?: boolean };

/** Writes an OCI image layout with the given tagged images; returns each tag's top descriptor. */
export async function writeOciLayout(
  dir: string,
  entries: LayoutEntry[],
): Promise<Record<string, Descriptor>> {
  await fs.mkdir(path.join(dir, "blobs", "sha256"), { recursive: true });
  await fs.writeFile(path.join(dir, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  const manifests: Descriptor[] = [];
  const out: Record<string, Descriptor> = {};
  for (const entry of entries) {
    let top: Descriptor;
    if ("image" in entry) {
      const { diffIds: _d, platform: _p, ...desc } = await writeImage(dir, entry.image);
      top = desc;
    } else {
      const children: Descriptor[] = [];
      for (const p of entry.platforms) {
        const { diffIds: _d, ...desc } = await writeImage(dir, {
          ...p,
          dockerMediaTypes: entry.dockerMediaTypes,
        });
        children.push(desc);
      }
      const mediaType = entry.dockerMediaTypes ? MEDIA.dockerList : MEDIA.ociIndex;
      const index = { schemaVersion: 2, mediaType, manifests: children };
      top = { mediaType, ...(await writeBlob(dir, JSON.stringify(index))) };
    }
    const tagged = { ...top, annotations: { "org.opencontainers.image.ref.name": entry.tag } };
    manifests.push(tagged);
    out[entry.tag] = top;
  }
  await fs.writeFile(
    path.join(dir, "index.json"),
    JSON.stringify({ schemaVersion: 2, mediaType: MEDIA.ociIndex, manifests }),
  );
  return out;
}
