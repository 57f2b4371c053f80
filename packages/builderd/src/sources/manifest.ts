import { digestHex } from "./digest.js";
import { MalformedImageError, PlatformNotFoundError, UnsupportedImageError } from "./errors.js";
import type { LayerInfo, OciImageConfig } from "./source.js";

/**
 * Manifests, indexes and configs in both the OCI image spec's and Docker's v2 media types:
 * parsing, validation, platform selection and layer classification. Everything here works on
 * bytes already verified against their digest.
 */
export const MEDIA_TYPES = {
  ociManifest: "application/vnd.oci.image.manifest.v1+json",
  ociIndex: "application/vnd.oci.image.index.v1+json",
  ociConfig: "application/vnd.oci.image.config.v1+json",
  dockerManifest: "application/vnd.docker.distribution.manifest.v2+json",
  dockerList: "application/vnd.docker.distribution.manifest.list.v2+json",
  dockerConfig: "application/vnd.docker.container.image.v1+json",
  dockerSchema1: "application/vnd.docker.distribution.manifest.v1+json",
  dockerSchema1Signed: "application/vnd.docker.distribution.manifest.v1+prettyjws",
} as const;

/** What a registry is asked for (Accept), preferred first. */
export const MANIFEST_ACCEPT = [
  MEDIA_TYPES.ociIndex,
  MEDIA_TYPES.ociManifest,
  MEDIA_TYPES.dockerList,
  MEDIA_TYPES.dockerManifest,
];

const INDEX_TYPES = new Set<string>([MEDIA_TYPES.ociIndex, MEDIA_TYPES.dockerList]);
const MANIFEST_TYPES = new Set<string>([MEDIA_TYPES.ociManifest, MEDIA_TYPES.dockerManifest]);
const CONFIG_TYPES = new Set<string>([MEDIA_TYPES.ociConfig, MEDIA_TYPES.dockerConfig]);

const LAYER_TYPES: Record<string, LayerInfo["compression"]> = {
  "application/vnd.oci.image.layer.v1.tar": "none",
  "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
  "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
  "application/vnd.docker.image.rootfs.diff.tar": "none",
  "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
  "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
};
const FOREIGN_LAYER =
  /^application\/vnd\.(docker\.image\.rootfs\.foreign\.diff|oci\.image\.layer\.nondistributable\.v1)\./;

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  platform?: { os: string; architecture: string; variant?: string };
  annotations?: Record<string, string>;
}

export type ParsedManifest =
  | { kind: "index"; mediaType: string; manifests: Descriptor[] }
  | { kind: "manifest"; mediaType: string; config: Descriptor; layers: Descriptor[] };

export interface Platform {
  os: string;
  architecture: string;
  variant?: string;
}

export const DEFAULT_PLATFORM: Platform = { os: "linux", architecture: "amd64" };

export function formatPlatform(p: Platform): string {
  return `${p.os}/${p.architecture}${p.variant ? `/${p.variant}` : ""}`;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function parseJson(body: Buffer, where: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(body.toString("utf8"));
  } catch (err) {
    throw new MalformedImageError(`${where} is not valid JSON`, { cause: err });
  }
  if (!isObject(value)) throw new MalformedImageError(`${where} is not a JSON object`);
  return value;
}

function parseDescriptor(v: unknown, where: string): Descriptor {
  if (!isObject(v)) throw new MalformedImageError(`${where} is not a descriptor object`);
  const { mediaType, digest, size, platform, annotations } = v;
  if (typeof mediaType !== "string" || mediaType === "")
    throw new MalformedImageError(`${where} has no mediaType`);
  if (typeof digest !== "string") throw new MalformedImageError(`${where} has no digest`);
  digestHex(digest, where);
  if (typeof size !== "number" || !Number.isSafeInteger(size) || size < 0) {
    throw new MalformedImageError(`${where} has no valid size`);
  }
  const d: Descriptor = { mediaType, digest, size };
  if (isObject(platform) && typeof platform.os === "string" && typeof platform.architecture === "string") {
    d.platform = { os: platform.os, architecture: platform.architecture };
    if (typeof platform.variant === "string" && platform.variant !== "")
      d.platform.variant = platform.variant;
  }
  if (isObject(annotations)) {
    d.annotations = Object.fromEntries(
      Object.entries(annotations).filter((e): e is [string, string] => typeof e[1] === "string"),
    );
  }
  return d;
}

/**
 * Parses a manifest or index. The media type comes from the document itself when it says, else
 * from the response's Content-Type, else from its shape. Schema 1 is refused.
 */
export function parseManifest(body: Buffer, contentType: string | undefined, where: string): ParsedManifest {
  const doc = parseJson(body, where);
  const declared = typeof doc.mediaType === "string" ? doc.mediaType : undefined;
  const header = contentType?.split(";")[0]?.trim().toLowerCase();
  let mediaType = declared ?? (header && header !== "application/json" ? header : undefined);
  if (
    doc.schemaVersion === 1 ||
    mediaType === MEDIA_TYPES.dockerSchema1 ||
    mediaType === MEDIA_TYPES.dockerSchema1Signed
  ) {
    throw new UnsupportedImageError(
      `${where} is a Docker schema 1 manifest, which builderd does not support (it is deprecated and unverifiable); push the image again with a current docker, skopeo or buildah to convert it to schema 2 or OCI`,
    );
  }
  if (doc.schemaVersion !== 2)
    throw new MalformedImageError(`${where} has schemaVersion ${String(doc.schemaVersion)}, expected 2`);
  if (mediaType === undefined) {
    mediaType = Array.isArray(doc.manifests) ? MEDIA_TYPES.ociIndex : MEDIA_TYPES.ociManifest;
  }
  if (INDEX_TYPES.has(mediaType)) {
    if (!Array.isArray(doc.manifests))
      throw new MalformedImageError(`${where} is an index without a manifests list`);
    return {
      kind: "index",
      mediaType,
      manifests: doc.manifests.map((m, i) => parseDescriptor(m, `${where} manifests[${i}]`)),
    };
  }
  if (MANIFEST_TYPES.has(mediaType)) {
    if (!Array.isArray(doc.layers)) throw new MalformedImageError(`${where} has no layers list`);
    const config = parseDescriptor(doc.config, `${where} config`);
    if (!CONFIG_TYPES.has(config.mediaType)) {
      throw new UnsupportedImageError(
        `${where} is not a container image: its config has media type ${config.mediaType} (an OCI artifact such as a Helm chart or signature?)`,
      );
    }
    return {
      kind: "manifest",
      mediaType,
      config,
      layers: doc.layers.map((l, i) => parseDescriptor(l, `${where} layers[${i}]`)),
    };
  }
  throw new UnsupportedImageError(
    `${where} has media type ${mediaType}, which is not an image manifest or index`,
  );
}

/** A manifest's layer as builderd uses it; refuses foreign and unknown layer types. */
export function toLayerInfo(layer: Descriptor, where: string): LayerInfo {
  if (FOREIGN_LAYER.test(layer.mediaType)) {
    throw new UnsupportedImageError(
      `${where} (${layer.digest}) is a non-distributable (foreign) layer of type ${layer.mediaType}; such layers (e.g. Windows base layers) are not in the registry and are not supported`,
    );
  }
  const compression = LAYER_TYPES[layer.mediaType];
  if (compression === undefined) {
    throw new UnsupportedImageError(
      `${where} (${layer.digest}) has media type ${layer.mediaType}, which is not a tar layer (expected an OCI or Docker layer: tar, tar+gzip or tar+zstd)`,
    );
  }
  return { digest: layer.digest, mediaType: layer.mediaType, size: layer.size, compression };
}

/** The index entry for `wanted`; an exact variant match first, then one without a variant. */
export function selectPlatform(manifests: Descriptor[], wanted: Platform, image: string): Descriptor {
  const images = manifests.filter((m) => MANIFEST_TYPES.has(m.mediaType) && m.platform);
  const same = images.filter(
    (m) => m.platform?.os === wanted.os && m.platform.architecture === wanted.architecture,
  );
  const pick =
    (wanted.variant ? same.find((m) => m.platform?.variant === wanted.variant) : undefined) ??
    same.find((m) => m.platform?.variant === undefined) ??
    (wanted.variant ? undefined : same[0]);
  if (pick) return pick;
  const available = [
    ...new Set(
      images
        .map((m) => m.platform as Platform)
        // Attestation manifests (buildkit) carry unknown/unknown; they are not images.
        .filter((p) => !(p.os === "unknown" && p.architecture === "unknown"))
        .map(formatPlatform),
    ),
  ];
  throw new PlatformNotFoundError(image, formatPlatform(wanted), available);
}

const STRINGS = (v: unknown): v is string[] => Array.isArray(v) && v.every((s) => typeof s === "string");

/** The image config, keeping only the fields builderd uses, each type-checked. */
export function parseImageConfig(body: Buffer, where: string): OciImageConfig {
  const doc = parseJson(body, where);
  const out: OciImageConfig = {};
  if (typeof doc.architecture === "string") out.architecture = doc.architecture;
  if (typeof doc.os === "string") out.os = doc.os;
  if (isObject(doc.config)) {
    const c = doc.config;
    const config: NonNullable<OciImageConfig["config"]> = {};
    if (STRINGS(c.Entrypoint)) config.Entrypoint = c.Entrypoint;
    if (STRINGS(c.Cmd)) config.Cmd = c.Cmd;
    if (STRINGS(c.Env)) config.Env = c.Env;
    if (typeof c.WorkingDir === "string") config.WorkingDir = c.WorkingDir;
    if (typeof c.User === "string") config.User = c.User;
    if (isObject(c.ExposedPorts)) config.ExposedPorts = c.ExposedPorts;
    if (isObject(c.Labels)) {
      config.Labels = Object.fromEntries(
        Object.entries(c.Labels).filter((e): e is [string, string] => typeof e[1] === "string"),
      );
    }
    out.config = config;
  }
  if (isObject(doc.rootfs) && typeof doc.rootfs.type === "string" && STRINGS(doc.rootfs.diff_ids)) {
    out.rootfs = { type: doc.rootfs.type, diff_ids: doc.rootfs.diff_ids };
  }
  return out;
}
