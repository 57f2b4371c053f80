import { create, fromJson, type JsonValue, toJson } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  Code,
  ConnectError,
  type HandlerContext,
  type ServiceImpl,
  type Transport,
} from "@connectrpc/connect";
import { type AssetManagerService, assetmanagerd, builderd, common, createBuilderClient } from "@kiln/api";
import {
  forTenant,
  InvalidArgumentError,
  requestContext,
  requireTenant,
  type TenantContext,
  UnavailableError,
} from "@kiln/kit";
import type { Asset, AssetQuery, AssetStatus, AssetType, ImageConfigJson, Lease } from "./assets/model.js";
import type { AssetRegistry, AutoBuild } from "./assets/registry.js";

export interface AssetServiceDeps {
  registry: AssetRegistry;
  /** builderd, for QueryAssets' auto-builds; undefined = auto-build answers unavailable. */
  builderd?: Transport;
}

/** Connect ↔ domain: validates the tenant, translates messages, calls the registry. */
export function createAssetService(deps: AssetServiceDeps): ServiceImpl<typeof AssetManagerService> {
  const { registry } = deps;
  const builder = deps.builderd ? createBuilderClient(deps.builderd) : undefined;

  return {
    async uploadAsset(requests, ctx) {
      const tenant = requireTenant(ctx);
      const it = requests[Symbol.asyncIterator]();
      const first = await it.next();
      if (first.done || first.value.data.case !== "metadata") {
        throw new InvalidArgumentError(
          "the first UploadAssetRequest must carry metadata (name, type, …); chunks follow it",
          { field: "data.metadata" },
        );
      }
      const meta = first.value.data.value;
      const chunks = async function* (): AsyncGenerator<Uint8Array> {
        for (;;) {
          const next = await it.next();
          if (next.done) return;
          const data = next.value.data;
          if (data.case === "chunk") yield data.value;
          else {
            throw new InvalidArgumentError(
              "metadata may be sent once, as the first message; then only chunks",
              {
                field: "data.metadata",
              },
            );
          }
        }
      };
      const res = await registry.upload(
        tenant,
        {
          name: meta.name,
          type: assetType(meta.type),
          labels: meta.labels,
          buildId: meta.buildId || undefined,
          sourceImage: meta.sourceImage || undefined,
          id: meta.id || undefined,
          imageConfig: imageConfigIn(meta.imageConfig),
          createdBy: createdBy(ctx),
          sizeBytes: meta.sizeBytes > 0n ? Number(meta.sizeBytes) : undefined,
          checksum: meta.checksum || undefined,
        },
        chunks(),
      );
      return { asset: assetOut(res.asset), deduplicated: res.deduplicated };
    },

    async registerAsset(req, ctx) {
      const tenant = requireTenant(ctx);
      const asset = await registry.register(
        tenant,
        {
          name: req.name,
          type: assetType(req.type),
          backend: req.backend === assetmanagerd.StorageBackend.S3 ? "s3" : "local",
          location: req.location,
          labels: req.labels,
          buildId: req.buildId || undefined,
          sourceImage: req.sourceImage || undefined,
          id: req.id || undefined,
          imageConfig: imageConfigIn(req.imageConfig),
          createdBy: createdBy(ctx),
          sizeBytes: req.sizeBytes > 0n ? Number(req.sizeBytes) : undefined,
          checksum: req.checksum || undefined,
        },
        requestContext(ctx).caller,
      );
      return { asset: assetOut(asset) };
    },

    async getAsset(req, ctx) {
      return { asset: assetOut(await registry.get(requireTenant(ctx), req.id)) };
    },

    async listAssets(req, ctx) {
      const page = await registry.list(requireTenant(ctx), queryIn(req));
      return {
        assets: page.assets.map(assetOut),
        nextPageToken: page.nextPageToken,
        totalCount: page.totalCount,
      };
    },

    async queryAssets(req, ctx) {
      const tenant = requireTenant(ctx);
      const opts = req.buildOptions;
      const build: AutoBuild | undefined = opts?.enableAutoBuild
        ? {
            dockerImage: opts.dockerImage,
            timeoutSeconds: opts.buildTimeoutSeconds,
            suggestedAssetId: opts.suggestedAssetId || undefined,
            start: (b) => startBuild(tenant, ctx, b),
          }
        : undefined;
      const res = await registry.query(tenant, queryIn(req), build);
      return {
        assets: res.assets.map(assetOut),
        nextPageToken: res.nextPageToken,
        totalCount: res.totalCount,
        triggeredBuilds: res.triggeredBuilds,
      };
    },

    async acquireAsset(req, ctx) {
      const lease = await registry.acquire(
        requireTenant(ctx),
        req.assetId,
        req.holder,
        Number(req.ttlSeconds),
        req.leaseId || undefined,
      );
      return { leaseId: lease.leaseId, lease: leaseOut(lease) };
    },

    async releaseAsset(req, ctx) {
      return { success: await registry.release(requireTenant(ctx), req.leaseId) };
    },

    async deleteAsset(req, ctx) {
      return { success: await registry.delete(requireTenant(ctx), req.id, req.force) };
    },

    async garbageCollect(req, ctx) {
      const res = await registry.garbageCollect(requireTenant(ctx), {
        dryRun: req.dryRun,
        deleteUnreferenced: req.deleteUnreferenced,
        maxAgeMs: Number(req.maxAgeSeconds) * 1000,
      });
      return {
        deletedAssets: res.deleted.map(assetOut),
        bytesFreed: BigInt(res.bytesFreed),
        leasesExpired: res.leasesExpired,
      };
    },

    async prepareAssets(req, ctx) {
      const paths = await registry.prepare(requireTenant(ctx), req.assetIds, req.targetPath, req.preparedFor);
      return { assetPaths: paths };
    },
  };

  /** Starts a build in builderd for the calling tenant; does not wait for it. */
  async function startBuild(
    tenant: TenantContext,
    ctx: HandlerContext,
    b: Parameters<AutoBuild["start"]>[0],
  ): Promise<{ buildId: string; status: string }> {
    if (!builder)
      throw new UnavailableError("auto-build needs builderd, which this assetmanagerd is not wired to");
    try {
      const res = await builder.createBuild(
        {
          config: {
            source: { sourceType: { case: "dockerImage", value: { imageUri: b.dockerImage } } },
            labels: b.labels,
            timeoutSeconds: b.timeoutSeconds,
            suggestedAssetId: b.suggestedAssetId ?? "",
          },
          idempotencyKey: b.idempotencyKey,
        },
        { ...forTenant(tenant, requestContext(ctx)), timeoutMs: 30_000, signal: ctx.signal },
      );
      return {
        buildId: res.buildId,
        status: `BUILD_STATE_${builderd.BuildState[res.state] ?? "UNSPECIFIED"}`,
      };
    } catch (err) {
      const e = ConnectError.from(err);
      throw new ConnectError(
        `builderd could not start a build of ${b.dockerImage}: ${e.rawMessage}`,
        e.code === Code.Unknown ? Code.Unavailable : e.code,
        undefined,
        undefined,
        err,
      );
    }
  }
}

function createdBy(ctx: HandlerContext): string {
  return requestContext(ctx).caller;
}

function assetType(t: assetmanagerd.AssetType): AssetType {
  const name = assetmanagerd.AssetType[t];
  if (t === assetmanagerd.AssetType.UNSPECIFIED || name === undefined) {
    throw new InvalidArgumentError("type: choose ROOTFS, KERNEL, INITRD or DISK_IMAGE", { field: "type" });
  }
  return name as AssetType;
}

function queryIn(req: {
  type: assetmanagerd.AssetType;
  status: assetmanagerd.AssetStatus;
  labelSelector: { [key: string]: string };
  pageSize: number;
  pageToken: string;
}): AssetQuery {
  return {
    type: req.type === assetmanagerd.AssetType.UNSPECIFIED ? undefined : assetType(req.type),
    status:
      req.status === assetmanagerd.AssetStatus.UNSPECIFIED
        ? undefined
        : (assetmanagerd.AssetStatus[req.status] as AssetStatus),
    labels: req.labelSelector,
    pageSize: req.pageSize,
    pageToken: req.pageToken || undefined,
  };
}

function imageConfigIn(cfg: common.ImageConfig | undefined): ImageConfigJson | undefined {
  if (!cfg) return undefined;
  return toJson(common.ImageConfigSchema, cfg) as ImageConfigJson;
}

export function assetOut(a: Asset): assetmanagerd.Asset {
  return create(assetmanagerd.AssetSchema, {
    id: a.id,
    tenantId: a.tenantId,
    name: a.name,
    type: assetmanagerd.AssetType[a.type],
    status: assetmanagerd.AssetStatus[a.status],
    backend: a.backend === "s3" ? assetmanagerd.StorageBackend.S3 : assetmanagerd.StorageBackend.LOCAL,
    location: a.location,
    sizeBytes: BigInt(a.sizeBytes),
    checksum: a.checksum,
    labels: a.labels,
    createdBy: a.createdBy,
    createdAt: timestampFromDate(a.createdAt),
    lastAccessedAt: timestampFromDate(a.lastAccessedAt),
    referenceCount: a.referenceCount,
    buildId: a.buildId,
    sourceImage: a.sourceImage,
    imageConfig: a.imageConfig
      ? fromJson(common.ImageConfigSchema, a.imageConfig as JsonValue, { ignoreUnknownFields: true })
      : undefined,
  });
}

function leaseOut(l: Lease): assetmanagerd.Lease {
  return create(assetmanagerd.LeaseSchema, {
    leaseId: l.leaseId,
    assetId: l.assetId,
    holder: l.holder,
    acquiredAt: timestampFromDate(l.acquiredAt),
    expiresAt: l.expiresAt ? timestampFromDate(l.expiresAt) : undefined,
  });
}
