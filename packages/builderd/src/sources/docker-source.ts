import type { Readable } from "node:stream";
import { createRegistryClient } from "../registry/client.js";
import { DEFAULT_PLATFORM, MANIFEST_ACCEPT } from "./manifest.js";
import { checkRegistryAllowed } from "./policy.js";
import { formatImageRef } from "./reference.js";
import { MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, resolveImage } from "./resolve.js";
import type { ImageRef, ImageSource, LayerInfo, SourceOptions } from "./source.js";

/** `docker://` images, pulled from a registry through the OCI distribution API. */
export function createDockerSource(ref: ImageRef, opts: SourceOptions): ImageSource {
  const registry = ref.registry;
  const repository = ref.repository;
  if (!registry || !repository)
    throw new TypeError("a docker:// reference needs a registry and a repository");
  checkRegistryAllowed(registry, opts.allowedRegistries, opts.insecureRegistries);
  const client = createRegistryClient({
    registry,
    insecureRegistries: opts.insecureRegistries,
    ...(opts.auth ? { credentials: opts.auth } : {}),
    log: opts.log,
    ...(opts.http?.timeoutMs !== undefined ? { timeoutMs: opts.http.timeoutMs } : {}),
    ...(opts.http?.retry ? { retry: opts.http.retry } : {}),
  });
  const name = formatImageRef(ref);

  return {
    registryLabel: registry,
    async resolve(signal) {
      const reference = ref.digest ?? ref.tag ?? "latest";
      const top = await client.getManifest(
        repository,
        reference,
        MANIFEST_ACCEPT,
        MAX_MANIFEST_BYTES,
        signal,
      );
      return resolveImage({
        ref,
        name,
        top: {
          body: top.body,
          ...(top.contentType ? { contentType: top.contentType } : {}),
          ...(ref.digest ? { expectedDigest: ref.digest } : {}),
          ...(top.digest ? { claimedDigest: top.digest } : {}),
        },
        reader: {
          async fetchBlob(desc, kind, s) {
            if (kind === "manifest") {
              const m = await client.getManifest(
                repository,
                desc.digest,
                MANIFEST_ACCEPT,
                MAX_MANIFEST_BYTES,
                s,
              );
              return { body: m.body, ...(m.contentType ? { contentType: m.contentType } : {}) };
            }
            return { body: await client.readBlob(repository, desc.digest, MAX_CONFIG_BYTES, s) };
          },
        },
        platform: opts.platform ?? DEFAULT_PLATFORM,
        log: opts.log,
        ...(signal ? { signal } : {}),
      });
    },
    openBlob(layer: LayerInfo, signal?: AbortSignal): Promise<Readable> {
      return client.openBlob(repository, layer.digest, signal);
    },
  };
}
