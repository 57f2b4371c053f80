import { Code, ConnectError, type Transport } from "@connectrpc/connect";
import { assetmanagerd, createAssetManagerClient } from "@kiln/api";
import { forTenant, type TenantContext } from "@kiln/kit";
import { ExponentialBackoff, handleWhen, retry } from "cockatiel";
import type { ImageMetadata } from "./pipeline.js";

/** Where finished rootfs images go: assetmanagerd's asset registry. */
export interface RootfsAssets {
  /** Registers the ext4 image at `file` (assetmanagerd takes the file by hard link and hashes it). */
  register(
    tenant: TenantContext,
    r: { buildId: string; file: string; checksum?: string; image: ImageMetadata },
  ): Promise<{ assetId: string; location: string; checksum: string }>;
  /** A registered rootfs, or undefined when it no longer exists. */
  find(tenant: TenantContext, assetId: string): Promise<{ location: string; checksum: string } | undefined>;
}

const transient = handleWhen(
  (err) =>
    err instanceof ConnectError && [Code.Unavailable, Code.DeadlineExceeded, Code.Aborted].includes(err.code),
);

export function createRootfsAssets(transport: Transport): RootfsAssets {
  const client = createAssetManagerClient(transport);
  // assetmanagerd restarting must not fail a build that took minutes.
  const policy = retry(transient, {
    maxAttempts: 4,
    backoff: new ExponentialBackoff({ initialDelay: 250, maxDelay: 4_000 }),
  });
  return {
    async register(tenant, r) {
      const res = await policy.execute(() =>
        client.registerAsset(
          {
            name: `rootfs-${r.buildId}.ext4`,
            type: assetmanagerd.AssetType.ROOTFS,
            backend: assetmanagerd.StorageBackend.LOCAL,
            location: r.file,
            checksum: r.checksum ?? "",
            buildId: r.buildId,
            sourceImage: r.image.originalImage.slice(0, 1024),
            labels: {
              build_id: r.buildId,
              docker_image: r.image.originalImage.slice(0, 256),
              image_digest: r.image.imageDigest,
            },
            imageConfig: {
              entrypoint: r.image.runtime.entrypoint,
              command: r.image.runtime.cmd,
              workingDir: r.image.runtime.workingDir,
              env: r.image.runtime.env,
              exposedPorts: r.image.runtime.exposedPorts,
              user: r.image.runtime.user,
              labels: r.image.runtime.labels,
            },
          },
          forTenant(tenant),
        ),
      );
      const asset = res.asset!;
      return { assetId: asset.id, location: asset.location, checksum: asset.checksum };
    },

    async find(tenant, assetId) {
      try {
        const { asset } = await client.getAsset({ id: assetId }, forTenant(tenant));
        if (!asset || asset.status !== assetmanagerd.AssetStatus.AVAILABLE) return undefined;
        return { location: asset.location, checksum: asset.checksum };
      } catch (err) {
        if (err instanceof ConnectError && err.code === Code.NotFound) return undefined;
        throw err;
      }
    },
  };
}
