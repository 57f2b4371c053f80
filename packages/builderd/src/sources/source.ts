import type { Readable } from "node:stream";
import type { Logger } from "@kiln/kit";
import type { RetrySettings } from "../registry/client.js";
import { createDockerArchiveSource } from "./docker-archive-source.js";
import { createDockerSource } from "./docker-source.js";
import { createOciArchiveSource, createOciLayoutSource } from "./oci-layout-source.js";
import type { ImageRef } from "./reference.js";

/**
 * An image source turns an image reference into a verified manifest, config and layer blobs.
 * `resolve` reads and verifies the documents (choosing the platform from an index);
 * `openBlob` streams one layer as stored; the layer cache verifies it as it is ingested (one
 * sha256 per byte, in one place: containerd's ingest-verify-commit). One source serves one
 * build: it caches registry tokens and keeps connections for that build only.
 */

export type { ImageRef, Transport } from "./reference.js";

export interface LayerInfo {
  digest: string;
  mediaType: string;
  size: number;
  compression: "gzip" | "zstd" | "none";
}

export interface OciImageConfig {
  architecture?: string;
  os?: string;
  config?: {
    Entrypoint?: string[];
    Cmd?: string[];
    Env?: string[];
    WorkingDir?: string;
    User?: string;
    ExposedPorts?: Record<string, unknown>;
    Labels?: Record<string, string>;
  };
  rootfs?: { type: string; diff_ids: string[] };
}

export interface ResolvedImage {
  ref: ImageRef;
  /** Digest of the platform manifest actually used. */
  manifestDigest: string;
  /** When the ref pointed at an index / manifest list. */
  indexDigest?: string;
  /** e.g. "linux/amd64". */
  platform: string;
  config: OciImageConfig;
  configDigest: string;
  layers: LayerInfo[];
}

export interface ImageSource {
  resolve(signal?: AbortSignal): Promise<ResolvedImage>;
  /**
   * The layer blob as stored (compressed). Not verified here: read it only through the layer
   * cache's `ingest`, which checks layer.size and layer.digest as the bytes stream and keeps
   * nothing (and lets no layer count as applied) when they are wrong.
   */
  openBlob(layer: LayerInfo, signal?: AbortSignal): Promise<Readable>;
  /** Registry host for metrics labels ("local" for local transports). */
  readonly registryLabel: string;
}

export interface SourceOptions {
  /** From the request's DockerAuth. */
  auth?: { username?: string; password?: string; token?: string };
  /** The operator's UNKEY_BUILDERD_INSECURE_REGISTRIES: host:port that may use plain http AND may resolve to loopback/private addresses. */
  insecureRegistries: string[];
  /** The tenant tier's allow-list (["*"] = any). Registries in insecureRegistries count as allowed. */
  allowedRegistries: string[];
  /** The operator's UNKEY_BUILDERD_LOCAL_IMAGE_DIRS: where oci:, oci-archive: and docker-archive: may read. */
  localImageDirs: string[];
  /** Default linux/amd64. */
  platform?: { os: string; architecture: string; variant?: string };
  log: Logger;
  /** Scratch space for archive transports (inside the build dir). */
  tempDir: string;
  /** Registry request tuning (tests shorten these). */
  http?: { timeoutMs?: number; retry?: RetrySettings };
}

/** Throws (RegistryNotAllowedError) at once when the tier does not allow the registry. */
export function openImageSource(ref: ImageRef, opts: SourceOptions): ImageSource {
  switch (ref.transport) {
    case "docker":
      return createDockerSource(ref, opts);
    case "oci":
      return createOciLayoutSource(ref, opts);
    case "oci-archive":
      return createOciArchiveSource(ref, opts);
    case "docker-archive":
      return createDockerArchiveSource(ref, opts);
  }
}
