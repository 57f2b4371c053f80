import fsp from "node:fs/promises";
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
  /**
   * The image's filesystem being assembled. Removed once the ext4 image exists. In the build dir,
   * or under the tree root (builds/tree-root.ts) when there is one.
   */
  rootfs: string;
  /** Scratch space (archive transports, partial files). */
  temp: string;
  /** Image config and build metadata as JSON. */
  metadata: string;
  /** The build's output: an ext4 image. */
  artifact: string;
}

export function buildPaths(
  dataDir: string,
  tenantId: string,
  buildId: string,
  treeRoot?: string,
): BuildPaths {
  const root = path.join(tenantDir(dataDir, tenantId), "builds", buildId);
  return {
    root,
    rootfs: treeRoot ? path.join(treeRoot, buildId) : path.join(root, "rootfs"),
    temp: path.join(root, "temp"),
    metadata: path.join(root, "metadata"),
    artifact: path.join(root, "rootfs.ext4"),
  };
}

/** Deletes everything of a build on disk: its dir, and its tree when that is elsewhere. */
export async function removeBuildFiles(paths: BuildPaths): Promise<void> {
  await Promise.all([paths.root, paths.rootfs].map((p) => fsp.rm(p, { recursive: true, force: true })));
}
