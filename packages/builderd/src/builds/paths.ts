import path from "node:path";

/** Where a tenant's builds and cache live: `<data>/tenants/<tenant>/{builds/<build>/…,cache/}`. */
export function tenantDir(dataDir: string, tenantId: string): string {
  return path.join(dataDir, "tenants", tenantId);
}

export function layerCacheDir(dataDir: string, tenantId: string): string {
  return path.join(tenantDir(dataDir, tenantId), "cache", "blobs");
}

/** Finished builds' trees wait here to be deleted in the background (builds/trash.ts). */
export function trashDir(dataDir: string): string {
  return path.join(dataDir, "tenants", ".trash");
}

export interface BuildPaths {
  root: string;
  /** The image's filesystem being assembled. Removed once the ext4 image exists. */
  rootfs: string;
  /** Scratch space (archive transports, partial files). */
  temp: string;
  /** Image config and build metadata as JSON. */
  metadata: string;
  /** The build's output: an ext4 image. */
  artifact: string;
}

export function buildPaths(dataDir: string, tenantId: string, buildId: string): BuildPaths {
  const root = path.join(tenantDir(dataDir, tenantId), "builds", buildId);
  return {
    root,
    rootfs: path.join(root, "rootfs"),
    temp: path.join(root, "temp"),
    metadata: path.join(root, "metadata"),
    artifact: path.join(root, "rootfs.ext4"),
  };
}
