import { createHash } from "node:crypto";
import fsp from "node:fs/promises";
import path from "node:path";
import {
  backgroundFlusher,
  type Logger,
  ResourceExhaustedError,
  resolveInRoot,
  type TenantLimits,
} from "@kiln/kit";
import type { GrowingFile, LayerCache } from "../cache/layer-cache.js";
import type { LayerApplier } from "../extract/layer-applier.js";
import { DATA_START_BLOCK, newNonce, restoreContent } from "../rootfs/ext4/data-area.js";
import { buildExt4, sealImage } from "../rootfs/ext4.js";
import { injectInit } from "../rootfs/init.js";
import { type OptimizeSettings, optimizeRootfs } from "../rootfs/optimize.js";
import { formatImageRef, parseImageRef } from "../sources/reference.js";
import { openImageSource, type ResolvedImage } from "../sources/source.js";
import type { Progress } from "./events.js";
import type { BuildPaths } from "./paths.js";
import { type RuntimeConfig, type RuntimeOverrides, resolveRuntimeConfig } from "./runtime-config.js";
import type { BuildState } from "./states.js";

/** What to build, in domain terms (the service translates the request into this). */
export interface BuildSpec {
  imageUri: string;
  auth?: { username?: string; password?: string; token?: string };
  runtime: RuntimeOverrides;
  optimization: OptimizeSettings & { maxSizeBytes: number };
}

export interface ImageMetadata {
  originalImage: string;
  imageDigest: string;
  platform: string;
  layers: string[];
  sizeBytes: number;
  runtime: RuntimeConfig;
}

export interface BuildMetrics {
  pullDurationMs: number;
  extractDurationMs: number;
  buildDurationMs: number;
  optimizeDurationMs: number;
  totalDurationMs: number;
  originalSizeBytes: number;
  rootfsSizeBytes: number;
  layersCached: number;
  layersDownloaded: number;
  bytesDownloaded: number;
}

export interface BuildOutput {
  dedupeKey: string;
  rootfsPath: string;
  rootfsSizeBytes: number;
  rootfsChecksum: string;
  image: ImageMetadata;
  metrics: BuildMetrics;
  /** Set when an earlier build's output was reused instead of building. */
  reusedFrom?: string;
  /** The registered rootfs asset, when the output is (or was reused from) one. */
  assetId?: string;
}

/** How the pipeline reports; the manager persists and broadcasts. */
export interface Reporter {
  stage(state: BuildState, step: string): Promise<void>;
  progress(p: Partial<Progress>): void;
  log(
    level: "debug" | "info" | "warn" | "error",
    component: string,
    message: string,
    meta?: Record<string, string | number>,
  ): void;
}

export interface PipelineDeps {
  paths: BuildPaths;
  cache: LayerCache;
  /** Applies layers in a worker thread (extraction blocks its thread; downloads go on here). */
  applier: LayerApplier;
  limits: TenantLimits;
  insecureRegistries: string[];
  localImageDirs: string[];
  layerConcurrency: number;
  /** kiln: content goes into the image as layers are extracted (rootfs/ext4/writer.ts); mkfs: `mkfs.ext4 -d`. */
  ext4Writer: "kiln" | "mkfs";
  tiniPath: string;
  busyboxPath: string;
  /** Moves a directory out of the way, to be deleted later (the extracted tree, once in the image). */
  discard(dir: string): Promise<void>;
  /** Hash and fsync the ext4 image here; off when assetmanagerd does both while registering it. */
  checksum: boolean;
  log: Logger;
  report: Reporter;
  signal: AbortSignal;
  /** An earlier completed build of the same tenant with this dedupe key, if any. */
  findExisting(dedupeKey: string): Promise<BuildOutput | undefined>;
  onPull?(registry: string, seconds: number): void;
}

/**
 * One build: resolve the image, download its layers concurrently into the tenant's cache while
 * extracting them in order, inject the VM init, optimize, and make the ext4 image.
 * Throws on failure or abort; the caller owns cleanup of `paths.root`.
 */
export async function runPipeline(spec: BuildSpec, deps: PipelineDeps): Promise<BuildOutput> {
  const { paths, report, signal } = deps;
  const t0 = performance.now();
  const ref = parseImageRef(spec.imageUri);
  await report.stage("pulling", `resolving ${formatImageRef(ref)}`);
  await fsp.mkdir(paths.temp, { recursive: true });
  const source = openImageSource(ref, {
    auth: spec.auth,
    insecureRegistries: deps.insecureRegistries,
    allowedRegistries: deps.limits.allowedRegistries,
    localImageDirs: deps.localImageDirs,
    log: deps.log,
    tempDir: paths.temp,
  });
  const image = await source.resolve(signal);
  const dedupeKey = dedupeKeyOf(image, spec);
  report.log(
    "info",
    "pull",
    `resolved ${formatImageRef(ref)} to ${image.manifestDigest} (${image.platform})`,
    {
      layers: image.layers.length,
    },
  );

  const existing = await deps.findExisting(dedupeKey);
  if (existing) {
    report.log(
      "info",
      "cache",
      `image ${image.manifestDigest} was already built with these settings; reusing ${existing.reusedFrom}`,
    );
    return existing;
  }

  // Downloads run ahead (bounded); extraction consumes layers strictly in order.
  const bytesTotal = image.layers.reduce((n, l) => n + l.size, 0);
  let bytesDone = 0;
  let layersCached = 0;
  let bytesDownloaded = 0;
  report.progress({
    stage: "pulling",
    bytesTotal,
    layersTotal: image.layers.length,
    bytesDone: 0,
    layersDone: 0,
  });
  const downloadAbort = new AbortController();
  const abortDownloads = () => downloadAbort.abort(signal.reason);
  signal.addEventListener("abort", abortDownloads, { once: true });
  const limit = semaphore(deps.layerConcurrency);
  const pullStarted = performance.now();
  // A layer's temp file while it downloads, so extraction can follow the download instead of
  // waiting for it (only for downloads this build started; a shared one is awaited whole).
  const growing = image.layers.map(() => deferred<GrowingFile>());
  const fetchLayer = (layer: (typeof image.layers)[number], i: number) =>
    limit(async () => {
      if (await deps.cache.has(layer.digest)) {
        layersCached++;
        bytesDone += layer.size;
        report.progress({ bytesDone });
        report.log("info", "pull", `layer ${i + 1}/${image.layers.length} ${short(layer.digest)} cached`);
        return deps.cache.path(layer.digest);
      }
      report.log("info", "pull", `pulling layer ${i + 1}/${image.layers.length} ${short(layer.digest)}`, {
        bytes: layer.size,
      });
      const file = await deps.cache.ingest(
        layer,
        () => source.openBlob(layer, downloadAbort.signal),
        (n) => {
          bytesDone += n;
          bytesDownloaded += n;
          report.progress({ bytesDone });
        },
        (g) => growing[i]!.resolve(g),
      );
      return file;
    });
  // Downloads start in order, at most layerConcurrency at once; extraction follows each layer's
  // bytes as they arrive, in order.
  const downloads = image.layers.map((layer, i) => fetchLayer(layer, i));
  // Layers complete in the cache so far: the next one's is decompressed ahead while one is applied.
  const complete: Array<string | undefined> = [];
  for (const [i, d] of downloads.entries()) {
    d.then(
      (file) => {
        complete[i] = file;
      },
      // A failed download must not leave others running or an unhandled rejection behind.
      () => downloadAbort.abort(),
    );
  }
  const allDownloaded = Promise.all(downloads).then(() => {
    const seconds = (performance.now() - pullStarted) / 1000;
    deps.onPull?.(source.registryLabel, seconds);
  });
  allDownloaded.catch(() => {});

  // With Kiln's writer, layers write file content straight into the image file, from block
  // DATA_START_BLOCK on, each layer after the previous one's content.
  const imageData =
    deps.ext4Writer === "kiln"
      ? { file: paths.artifact, nonce: newNonce(), nextBlock: DATA_START_BLOCK }
      : undefined;
  /**
   * Applies one layer. A file still downloading is applied as it grows; the layer counts as
   * applied only once its download is verified too — a digest mismatch fails the build (and
   * stops the extraction), so no unverified content survives into a rootfs. Verified is enough:
   * the next layer need not wait for this one's fsync into the cache.
   */
  const applyLayer = async (i: number, ready: string | GrowingFile, usedBytes: number) => {
    const nextFile = complete[i + 1];
    const next = nextFile ? { file: nextFile, compression: image.layers[i + 1]!.compression } : undefined;
    const compression = image.layers[i]!.compression;
    const opts = {
      maxBytes: deps.limits.maxDiskBytes,
      usedBytes,
      image: imageData,
      next,
    };
    if (typeof ready === "string")
      return deps.applier.apply(paths.rootfs, ready, compression, { ...opts, signal });
    const stop = new AbortController();
    const onAbort = () => stop.abort(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    try {
      const applying = deps.applier.apply(paths.rootfs, ready, compression, { ...opts, signal: stop.signal });
      // A failed download stops the extraction waiting for its bytes.
      const downloaded = ready.verified.catch((err) => {
        stop.abort(err);
        throw err;
      });
      // Both settle: a failed download stops the extraction at once, and a corrupt blob is
      // reported as such even when the extractor tripped over its bytes first.
      const [applied, download] = await Promise.allSettled([applying, downloaded]);
      if (download.status === "rejected") throw download.reason;
      if (applied.status === "rejected") throw applied.reason;
      return applied.value;
    } finally {
      signal.removeEventListener("abort", onAbort);
    }
  };

  let flusher: ReturnType<typeof backgroundFlusher> | undefined;
  try {
    const tExtract = performance.now();
    await fsp.mkdir(paths.rootfs, { recursive: true, mode: 0o755 });
    if (imageData) {
      await fsp.writeFile(imageData.file, "", { mode: 0o644 });
      // Each layer's content is flushed to disk while the next ones are extracted, so the image's
      // fsync at registration has little left: on a slow or throttled disk that fsync, more than
      // the hash, was the build's tail.
      flusher = backgroundFlusher(imageData.file);
    }
    let usedBytes = 0;
    for (let i = 0; i < image.layers.length; i++) {
      // Whichever comes first: the verified file, or the file still downloading.
      const ready = await Promise.race([downloads[i]!, growing[i]!.promise]);
      signal.throwIfAborted();
      await report.stage("extracting", `extracting layer ${i + 1}/${image.layers.length}`);
      const result = await applyLayer(i, ready, usedBytes);
      usedBytes += result.bytesWritten;
      if (imageData) imageData.nextBlock = result.nextBlock ?? imageData.nextBlock;
      flusher?.kick();
      for (const s of result.skipped) report.log("warn", "extract", `skipped ${s.path}: ${s.reason}`);
      report.progress({ layersDone: i + 1 });
      report.log("info", "extract", `layer ${i + 1}/${image.layers.length} applied`, {
        entries: result.entries,
        bytes: result.bytesWritten,
      });
    }
    // Every layer is verified; their commits into the cache (fsync, rename) finish while the
    // image is made, and are awaited before the build succeeds.
    const pullDurationMs = performance.now() - pullStarted;
    const extractDurationMs = performance.now() - tExtract;

    const tBuild = performance.now();
    await report.stage("building", "injecting the VM init");
    const runtime = resolveRuntimeConfig(image.config.config, spec.runtime);
    if (imageData) {
      // The user is resolved through the image's own files: put their content back in the tree.
      for (const rel of ["etc/passwd", "etc/group"]) {
        // A path that cannot be resolved (a symlink loop) is left for the user's resolution to
        // report, should the build need it.
        const file = await resolveInRoot(paths.rootfs, rel).catch(() => undefined);
        if (file) await restoreContent(file, imageData.file, imageData.nonce);
      }
    }
    await injectInit(
      paths.rootfs,
      {
        entrypoint: runtime.entrypoint,
        cmd: runtime.cmd,
        env: runtime.env,
        workingDir: runtime.workingDir,
        user: runtime.user,
      },
      { tiniPath: deps.tiniPath, busyboxPath: deps.busyboxPath },
    );
    const metadata: ImageMetadata = {
      originalImage: formatImageRef(ref),
      imageDigest: image.manifestDigest,
      platform: image.platform,
      layers: image.layers.map((l) => l.digest),
      sizeBytes: usedBytes,
      runtime,
    };
    await fsp.mkdir(paths.metadata, { recursive: true });
    await fsp.writeFile(
      path.join(paths.metadata, "image.json"),
      JSON.stringify({ ...metadata, config: image.config }, null, 2),
    );
    const buildDurationMs = performance.now() - tBuild;

    const tOptimize = performance.now();
    await report.stage("optimizing", "optimizing the rootfs");
    const removed = await optimizeRootfs(paths.rootfs, spec.optimization);
    if (removed.removedEntries > 0) {
      report.log("info", "optimize", `removed ${removed.removedEntries} entries`, {
        bytes: removed.removedBytes,
      });
    }
    report.progress({ step: "making the ext4 image" });
    const seal = { signal, checksum: deps.checksum, sync: deps.checksum };
    const ext4 = imageData
      ? await deps.applier
          .writeImage(
            {
              rootfs: paths.rootfs,
              image: imageData.file,
              nonce: imageData.nonce,
              nextBlock: imageData.nextBlock,
            },
            signal,
          )
          .then(async (w) => {
            await flusher?.close();
            return { sizeBytes: w.sizeBytes, sha256: await sealImage(imageData.file, seal) };
          })
      : await buildExt4(paths.rootfs, paths.artifact, seal);
    if (spec.optimization.maxSizeBytes > 0 && ext4.sizeBytes > spec.optimization.maxSizeBytes) {
      throw new RootfsTooLargeError(ext4.sizeBytes, spec.optimization.maxSizeBytes);
    }
    report.log(
      "info",
      "image",
      `ext4 image ${ext4.sha256 ?? "made"} (${deps.ext4Writer === "kiln" ? "Kiln's writer" : "mkfs.ext4 -d"})`,
      {
        bytes: ext4.sizeBytes,
      },
    );
    // The tree is now inside the image; keep only the artifact and metadata. Its inodes are
    // deleted in the background once the build's result is recorded (builds/trash.ts).
    await deps.discard(paths.rootfs);
    await deps.discard(paths.temp);
    await allDownloaded;
    const optimizeDurationMs = performance.now() - tOptimize;

    return {
      dedupeKey,
      rootfsPath: paths.artifact,
      rootfsSizeBytes: ext4.sizeBytes,
      rootfsChecksum: ext4.sha256 ?? "",
      image: metadata,
      metrics: {
        pullDurationMs: Math.round(pullDurationMs),
        extractDurationMs: Math.round(extractDurationMs),
        buildDurationMs: Math.round(buildDurationMs),
        optimizeDurationMs: Math.round(optimizeDurationMs),
        totalDurationMs: Math.round(performance.now() - t0),
        originalSizeBytes: usedBytes,
        rootfsSizeBytes: ext4.sizeBytes,
        layersCached,
        layersDownloaded: image.layers.length - layersCached,
        bytesDownloaded,
      },
    };
  } finally {
    await flusher?.close();
    signal.removeEventListener("abort", abortDownloads);
    downloadAbort.abort();
    for (const g of growing) g.settled?.close();
  }
}

export class RootfsTooLargeError extends ResourceExhaustedError {
  constructor(
    readonly sizeBytes: number,
    readonly limitBytes: number,
  ) {
    super(`the rootfs image is ${sizeBytes} bytes, over optimization.max_size_bytes (${limitBytes})`);
  }
}

/** Same tenant + same platform manifest + same target settings = the same rootfs. */
export function dedupeKeyOf(image: ResolvedImage, spec: BuildSpec): string {
  const h = createHash("sha256");
  h.update(
    JSON.stringify({
      manifest: image.manifestDigest,
      runtime: spec.runtime,
      optimization: spec.optimization,
      v: 1,
    }),
  );
  return `sha256:${h.digest("hex")}`;
}

function short(digest: string): string {
  return digest.slice(0, 19);
}

/** A promise resolved from outside; `settled` keeps the value (to release it later). */
function deferred<T>() {
  let resolve!: (v: T) => void;
  const d: { promise: Promise<T>; resolve: (v: T) => void; settled?: T } = {
    promise: new Promise<T>((r) => {
      resolve = r;
    }),
    resolve: (v) => {
      d.settled = v;
      resolve(v);
    },
  };
  return d;
}

/** Runs at most `n` of the given tasks at once. */
function semaphore(n: number) {
  let active = 0;
  const waiting: Array<() => void> = [];
  return async <T>(task: () => Promise<T>): Promise<T> => {
    while (active >= n) await new Promise<void>((r) => waiting.push(r));
    active++;
    try {
      return await task();
    } finally {
      active--;
      waiting.shift()?.();
    }
  };
}
