import type { Logger } from "@kiln/kit";
import { digestOf, verifyBytes } from "./digest.js";
import { UnsupportedImageError } from "./errors.js";
import {
  type Descriptor,
  formatPlatform,
  type Platform,
  parseImageConfig,
  parseManifest,
  selectPlatform,
  toLayerInfo,
} from "./manifest.js";
import type { ImageRef, ResolvedImage } from "./source.js";

/** Manifests above this are refused (distribution's own limit is 4 MiB). */
export const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;
/** Image configs above this are refused (they are JSON; real ones are kilobytes). */
export const MAX_CONFIG_BYTES = 16 * 1024 * 1024;

export interface FetchedDocument {
  body: Buffer;
  contentType?: string;
}

/**
 * How a transport reads documents; the resolver does the verifying. `fetchBlob` returns raw
 * bytes of a manifest or config named by a descriptor (at most `maxBytes`).
 */
export interface DocumentReader {
  fetchBlob(desc: Descriptor, kind: "manifest" | "config", signal?: AbortSignal): Promise<FetchedDocument>;
}

export interface ResolveInput {
  ref: ImageRef;
  /** How the image is named in messages. */
  name: string;
  /** The document the reference points at (a manifest or an index). */
  top: FetchedDocument & {
    /** The digest it must have (pulled by digest, or named by a descriptor). */
    expectedDigest?: string;
    expectedSize?: number;
    /** A digest the server claimed (Docker-Content-Digest) when pulled by tag. */
    claimedDigest?: string;
  };
  reader: DocumentReader;
  platform: Platform;
  log: Logger;
  signal?: AbortSignal;
}

/** Manifest (via the index when there is one) → config → layers, each verified on the way. */
export async function resolveImage(input: ResolveInput): Promise<ResolvedImage> {
  const { top, name, reader, platform, signal } = input;
  const topDigest = digestOf(top.body);
  if (top.expectedDigest !== undefined)
    verifyBytes("manifest", top.body, top.expectedDigest, top.expectedSize);
  else if (top.claimedDigest?.startsWith("sha256:") && top.claimedDigest !== topDigest) {
    verifyBytes("manifest (Docker-Content-Digest)", top.body, top.claimedDigest);
  }
  let parsed = parseManifest(top.body, top.contentType, `manifest ${topDigest} of ${name}`);
  let manifestDigest = topDigest;
  let indexDigest: string | undefined;
  let selected: Platform | undefined;
  if (parsed.kind === "index") {
    const entry = selectPlatform(parsed.manifests, platform, name);
    indexDigest = topDigest;
    selected = entry.platform;
    const doc = await reader.fetchBlob(entry, "manifest", signal);
    verifyBytes("manifest", doc.body, entry.digest, entry.size);
    manifestDigest = entry.digest;
    parsed = parseManifest(
      doc.body,
      doc.contentType ?? entry.mediaType,
      `manifest ${entry.digest} of ${name}`,
    );
    if (parsed.kind === "index") {
      throw new UnsupportedImageError(
        `index ${indexDigest} of ${name} points at another index (${entry.digest}) for ${formatPlatform(platform)}; nested indexes are not supported`,
      );
    }
  }
  const configDoc = await reader.fetchBlob(parsed.config, "config", signal);
  verifyBytes("config", configDoc.body, parsed.config.digest, parsed.config.size);
  const config = parseImageConfig(configDoc.body, `config ${parsed.config.digest} of ${name}`);
  if (
    config.os !== undefined &&
    config.architecture !== undefined &&
    (config.os !== platform.os || config.architecture !== platform.architecture)
  ) {
    throw new UnsupportedImageError(
      `image ${name} is for ${config.os}/${config.architecture}, but builderd builds ${formatPlatform(platform)}; use a ${formatPlatform(platform)} image or a multi-platform one`,
    );
  }
  const layers = parsed.layers.map((l, i) => toLayerInfo(l, `layer ${i + 1} of ${name}`));
  const diffIds = config.rootfs?.diff_ids.length;
  if (diffIds !== undefined && diffIds !== layers.length) {
    input.log.warn(
      { image: name, layers: layers.length, diff_ids: diffIds },
      "image config lists a different number of layers than its manifest",
    );
  }
  const variant = selected?.variant;
  return {
    ref: input.ref,
    manifestDigest,
    ...(indexDigest !== undefined ? { indexDigest } : {}),
    platform: formatPlatform({
      os: config.os ?? selected?.os ?? platform.os,
      architecture: config.architecture ?? selected?.architecture ?? platform.architecture,
      ...(variant !== undefined ? { variant } : {}),
    }),
    config,
    configDigest: parsed.config.digest,
    layers,
  };
}
