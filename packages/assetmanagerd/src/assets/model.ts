/** The registry's domain types: what an asset, a lease and a query are, free of protobuf. */

export const ASSET_TYPES = ["ROOTFS", "KERNEL", "INITRD", "DISK_IMAGE"] as const;
export type AssetType = (typeof ASSET_TYPES)[number];

export const ASSET_STATUSES = ["UPLOADING", "AVAILABLE", "DELETING", "ERROR"] as const;
export type AssetStatus = (typeof ASSET_STATUSES)[number];

export type Labels = Record<string, string>;

/** The image's runtime config, kept as kiln.common.v1.ImageConfig proto JSON (opaque here). */
export type ImageConfigJson = { [key: string]: unknown };

export interface Asset {
  id: string;
  tenantId: string;
  name: string;
  type: AssetType;
  status: AssetStatus;
  backend: "local" | "s3";
  /** Blob location ("" while uploading). */
  location: string;
  sizeBytes: number;
  /** "sha256:…" ("" while uploading). */
  checksum: string;
  labels: Labels;
  createdBy: string;
  createdAt: Date;
  lastAccessedAt: Date;
  /** Active (unexpired) leases. */
  referenceCount: number;
  buildId: string;
  sourceImage: string;
  imageConfig: ImageConfigJson | undefined;
}

export interface Lease {
  leaseId: string;
  assetId: string;
  holder: string;
  acquiredAt: Date;
  expiresAt: Date | undefined;
}

/** What a new asset is, before its bytes arrive. */
export interface AssetSpec {
  name: string;
  type: AssetType;
  labels?: Labels;
  buildId?: string;
  sourceImage?: string;
  /** Suggested id; taken → already_exists. */
  id?: string;
  imageConfig?: ImageConfigJson;
  createdBy: string;
}

export interface AssetQuery {
  type?: AssetType;
  /** Default AVAILABLE. */
  status?: AssetStatus;
  labels?: Labels;
  pageSize?: number;
  pageToken?: string;
}

export interface AssetPage {
  assets: Asset[];
  nextPageToken: string;
  totalCount: number;
}
