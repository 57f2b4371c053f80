import { create, fromJsonString, type MessageInitShape, toJsonString } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { builderd, common } from "@kiln/api";
import { UnimplementedError } from "@kiln/kit";
import type { BuildEvent, Progress } from "./builds/events.js";
import type { BuildMetrics, BuildSpec, ImageMetadata } from "./builds/pipeline.js";
import { BUILD_STATES, type BuildState } from "./builds/states.js";
import type { BuildRow, LogRow } from "./builds/store.js";

/** Domain state ↔ proto enum (same order as BUILD_STATES, after UNSPECIFIED). */
export function stateToProto(s: BuildState): builderd.BuildState {
  return (BUILD_STATES.indexOf(s) + 1) as builderd.BuildState;
}

export function stateFromProto(s: builderd.BuildState): BuildState {
  const state = BUILD_STATES[s - 1];
  if (!state) throw new Error(`unknown build state ${s}`);
  return state;
}

/** The request's config as the domain's BuildSpec; refuses sources that later issues add. */
export function specFromConfig(config: builderd.BuildConfig): BuildSpec {
  const src = config.source?.sourceType;
  if (src?.case !== "dockerImage") {
    throw new UnimplementedError(
      `${src?.case === "gitRepository" ? "git" : "archive"} sources are not implemented yet; use docker_image`,
    );
  }
  if (config.target?.targetType.case === "containerImage") {
    throw new UnimplementedError("container_image targets are not implemented yet; use microvm_rootfs");
  }
  const mv = config.target?.targetType.case === "microvmRootfs" ? config.target.targetType.value : undefined;
  const rc = mv?.runtimeConfig;
  const opt = mv?.optimization;
  const auth = src.value.auth;
  return {
    imageUri: src.value.imageUri,
    auth: auth ? { username: auth.username, password: auth.password, token: auth.token } : undefined,
    runtime: {
      entrypoint: rc?.entrypoint ?? [],
      command: rc?.command ?? [],
      workingDir: rc?.workingDir ?? "",
      environment: { ...(rc?.environment ?? {}) },
      exposedPorts: rc?.exposedPorts ?? [],
      user: rc?.user ?? "",
    },
    optimization: {
      removeDocs: opt?.removeDocs ?? false,
      removeCache: opt?.removeCache ?? false,
      excludePatterns: opt?.excludePatterns ?? [],
      preservePaths: opt?.preservePaths ?? [],
      stripDebugSymbols: opt?.stripDebugSymbols ?? false,
      maxSizeBytes: Number(opt?.maxSizeBytes ?? 0n),
    },
  };
}

/** The config to store and echo back: registry credentials are never kept. */
export function configJsonWithoutSecrets(config: builderd.BuildConfig): string {
  const copy = create(builderd.BuildConfigSchema, config);
  if (copy.source?.sourceType.case === "dockerImage") copy.source.sourceType.value.auth = undefined;
  if (copy.source?.sourceType.case === "gitRepository") copy.source.sourceType.value.auth = undefined;
  return toJsonString(builderd.BuildConfigSchema, copy);
}

const ms = (v: number | null) => (v ? timestampFromMs(v) : undefined);

export function buildJob(row: BuildRow): builderd.BuildJob {
  const image = row.image_metadata_json ? (JSON.parse(row.image_metadata_json) as ImageMetadata) : undefined;
  const m = row.metrics_json ? (JSON.parse(row.metrics_json) as BuildMetrics) : undefined;
  const p = safeJson<Partial<Progress>>(row.progress_json);
  return create(builderd.BuildJobSchema, {
    buildId: row.build_id,
    tenantId: row.tenant_id,
    config: fromJsonString(builderd.BuildConfigSchema, row.config_json),
    state: stateToProto(row.state),
    createdAt: timestampFromMs(row.created_at),
    startedAt: ms(row.started_at),
    completedAt: ms(row.completed_at),
    rootfsPath: row.rootfs_path ?? "",
    rootfsSizeBytes: BigInt(row.rootfs_size_bytes ?? 0),
    rootfsChecksum: row.rootfs_checksum ?? "",
    assetId: row.asset_id ?? "",
    imageMetadata: image ? imageMetadata(image) : undefined,
    metrics: m ? buildMetrics(m) : undefined,
    errorMessage: row.error_message,
    progressPercent: row.progress_percent,
    currentStep: row.current_step,
    progress: p.stage ? progress(p as Progress) : undefined,
  });
}

function imageMetadata(i: ImageMetadata): MessageInitShape<typeof builderd.ImageMetadataSchema> {
  return {
    originalImage: i.originalImage,
    imageDigest: i.imageDigest,
    layers: i.layers,
    labels: i.runtime.labels,
    command: i.runtime.cmd,
    entrypoint: i.runtime.entrypoint,
    workingDir: i.runtime.workingDir,
    env: i.runtime.env,
    exposedPorts: i.runtime.exposedPorts,
    user: i.runtime.user,
    sizeBytes: BigInt(i.sizeBytes),
    platform: i.platform,
  };
}

function buildMetrics(m: BuildMetrics): MessageInitShape<typeof builderd.BuildMetricsSchema> {
  return {
    pullDurationMs: BigInt(m.pullDurationMs ?? 0),
    extractDurationMs: BigInt(m.extractDurationMs ?? 0),
    buildDurationMs: BigInt(m.buildDurationMs ?? 0),
    optimizeDurationMs: BigInt(m.optimizeDurationMs ?? 0),
    totalDurationMs: BigInt(m.totalDurationMs ?? 0),
    originalSizeBytes: BigInt(m.originalSizeBytes ?? 0),
    rootfsSizeBytes: BigInt(m.rootfsSizeBytes ?? 0),
    compressionRatio: m.originalSizeBytes ? m.rootfsSizeBytes / m.originalSizeBytes : 0,
    layersCached: m.layersCached ?? 0,
    layersDownloaded: m.layersDownloaded ?? 0,
    bytesDownloaded: BigInt(m.bytesDownloaded ?? 0),
  };
}

function progress(p: Progress): MessageInitShape<typeof builderd.BuildProgressSchema> {
  return {
    stage: stateToProto(p.stage),
    bytesDone: BigInt(p.bytesDone ?? 0),
    bytesTotal: BigInt(p.bytesTotal ?? 0),
    layersDone: p.layersDone ?? 0,
    layersTotal: p.layersTotal ?? 0,
  };
}

const LEVELS: Record<string, common.LogLevel> = {
  debug: common.LogLevel.DEBUG,
  info: common.LogLevel.INFO,
  warn: common.LogLevel.WARN,
  error: common.LogLevel.ERROR,
};

export function logMessage(
  e: BuildEvent,
  state: BuildState,
): MessageInitShape<typeof builderd.StreamBuildLogsResponseSchema> {
  switch (e.kind) {
    case "log":
      return { entry: logEntry(e.entry), state: stateToProto(state) };
    case "progress":
      return { progress: progress(e.progress), state: stateToProto(e.progress.stage) };
    case "state":
      return { state: stateToProto(e.state) };
  }
}

function logEntry(l: LogRow): MessageInitShape<typeof builderd.BuildLogEntrySchema> {
  return {
    timestamp: timestampFromMs(l.ts),
    level: LEVELS[l.level] ?? common.LogLevel.INFO,
    message: l.message,
    component: l.component,
    metadata: safeJson<Record<string, string>>(l.metadata_json),
  };
}

function safeJson<T>(text: string | null): T {
  try {
    return JSON.parse(text ?? "{}") as T;
  } catch {
    return {} as T;
  }
}
