import { Code, ConnectError, type Transport } from "@connectrpc/connect";
import { assetmanagerd, createAssetManagerClient } from "@kiln/api";
import { FailedPreconditionError, forTenant, type TenantContext } from "@kiln/kit";

/** The image config stored with a rootfs asset (what container backends run). */
export interface AssetImageConfig {
  entrypoint: string[];
  command: string[];
  env: Record<string, string>;
  workingDir: string;
  user: string;
  exposedPorts: string[];
}

/** What metald needs from assetmanagerd. */
export interface VmAssets {
  /** Takes the lease `leaseId` (chosen by the caller, recorded first; acquiring again is a no-op). */
  acquire(tenant: TenantContext, assetId: string, holder: string, leaseId: string): Promise<void>;
  release(tenant: TenantContext, leaseId: string): Promise<void>;
  /** Places assets under `<vm root>/<target>/`; returns asset id → path. */
  prepare(
    tenant: TenantContext,
    assetIds: string[],
    target: string,
    holder: string,
  ): Promise<Record<string, string>>;
  imageConfig(tenant: TenantContext, assetId: string): Promise<AssetImageConfig | undefined>;
}

export function createVmAssets(transport: Transport): VmAssets {
  const client = createAssetManagerClient(transport);
  return {
    async acquire(tenant, assetId, holder, leaseId) {
      await client.acquireAsset({ assetId, holder, leaseId }, forTenant(tenant));
    },
    async release(tenant, leaseId) {
      try {
        await client.releaseAsset({ leaseId }, forTenant(tenant));
      } catch (err) {
        // Already released or expired (and collected): nothing left to do.
        if (!(err instanceof ConnectError && err.code === Code.NotFound)) throw err;
      }
    },
    async prepare(tenant, assetIds, target, holder) {
      const res = await client.prepareAssets(
        { assetIds, targetPath: target, preparedFor: holder },
        forTenant(tenant),
      );
      return res.assetPaths;
    },
    async imageConfig(tenant, assetId) {
      const { asset } = await client.getAsset({ id: assetId }, forTenant(tenant));
      if (asset?.type !== assetmanagerd.AssetType.ROOTFS) {
        throw new FailedPreconditionError(`asset ${assetId} is not a ROOTFS asset`);
      }
      const c = asset.imageConfig;
      return c
        ? {
            entrypoint: c.entrypoint,
            command: c.command,
            env: { ...c.env },
            workingDir: c.workingDir,
            user: c.user,
            exposedPorts: c.exposedPorts,
          }
        : undefined;
    },
  };
}
