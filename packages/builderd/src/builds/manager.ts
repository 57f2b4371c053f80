import fs from "node:fs/promises";
import path from "node:path";
import {
  createKeyedLock,
  InvalidArgumentError,
  KilnError,
  type LimitsResolver,
  type Logger,
  newId,
  type TenantContext,
  UnavailableError,
} from "@kiln/kit";
import type { LayerCache } from "../cache/layer-cache.js";
import { BuildNotFoundError, QuotaExceededError } from "../errors.js";
import type { LayerApplier } from "../extract/layer-applier.js";
import type { BuilderMetrics } from "../metrics.js";
import { checkRegistryAllowed, resolveLocalPath } from "../sources/policy.js";
import { parseImageRef } from "../sources/reference.js";
import type { RootfsAssets } from "./assets.js";
import type { BuildEvent, BuildEvents, Progress } from "./events.js";
import { buildPaths, removeBuildFiles } from "./paths.js";
import { type BuildOutput, type BuildSpec, runPipeline } from "./pipeline.js";
import { ACTIVE, type BuildState, isTerminal, predecessors } from "./states.js";
import type { BuildRow, BuildStore } from "./store.js";
import { createThrottle } from "./throttle.js";
import type { Trash } from "./trash.js";
import { roomFor } from "./tree-root.js";

export interface BuildSettings {
  /** Builds running at once on this builderd (all tenants); more wait as PENDING. */
  maxConcurrentBuilds: number;
  layerConcurrency: number;
  ext4Writer: "kiln" | "mkfs";
  insecureRegistries: string[];
  localImageDirs: string[];
  tiniPath: string;
  busyboxPath: string;
}

export interface BuildManagerDeps {
  store: BuildStore;
  /** Where finished rootfs images are registered; without it they stay as local files. */
  assets?: RootfsAssets;
  events: BuildEvents;
  dataDir: string;
  /** Where extracted trees are assembled, if not in their build dirs (builds/tree-root.ts). */
  treeRoot?: string;
  limits: LimitsResolver;
  cacheFor(tenantId: string): LayerCache;
  applier: LayerApplier;
  /** Where finished builds' extracted trees wait, to be deleted once their results are recorded. */
  trash: Trash;
  settings: BuildSettings;
  metrics: BuilderMetrics;
  log: Logger;
}

export interface CreateBuildInput {
  spec: BuildSpec;
  /** The request's BuildConfig as JSON, secrets removed (stored and echoed back). */
  configJson: string;
  timeoutSeconds: number;
  idempotencyKey: string;
}

/** The rootfs was built but assetmanagerd would not take it. */
class RegistrationError extends Error {
  constructor(cause: unknown) {
    super(
      `could not register the rootfs with assetmanagerd: ${cause instanceof Error ? cause.message : String(cause)}`,
      {
        cause,
      },
    );
  }
}

/** Why a running build was stopped. */
class StopReason extends Error {
  constructor(
    readonly kind: "cancel" | "timeout" | "shutdown",
    message: string,
  ) {
    super(message);
  }
}

interface Running {
  tenant: TenantContext;
  abort: AbortController;
  done: Promise<void>;
}

interface Queued {
  buildId: string;
  tenant: TenantContext;
  input: CreateBuildInput;
}

const DAY_MS = 86_400_000;
/** Live progress to followers: a few updates a second, not one per network chunk. */
const PROGRESS_EVERY_MS = 100;

/**
 * Builds' lifecycle: admission (tenant quotas), a bounded queue, running the pipeline with a
 * timeout and cancellation, persisting state and progress, and recovery after a crash.
 * Knows nothing of RPC.
 */
export function createBuildManager(deps: BuildManagerDeps) {
  const { store, events, log, metrics } = deps;
  const running = new Map<string, Running>();
  const queue: Queued[] = [];
  let stopping = false;

  const pathsOf = (tenantId: string, buildId: string) =>
    buildPaths(deps.dataDir, tenantId, buildId, deps.treeRoot);

  /** Serialises admission per tenant, so two concurrent CreateBuilds cannot both pass a quota. */
  const withTenantLock = createKeyedLock();

  async function getOwned(tenant: TenantContext, buildId: string): Promise<BuildRow> {
    const row = await store.get(tenant.tenantId, buildId);
    if (!row) throw new BuildNotFoundError(buildId, tenant.tenantId);
    return row;
  }

  /** Moves a build to `state` if the state table allows it from where the build is now. */
  async function setState(
    buildId: string,
    state: BuildState,
    patch: Parameters<BuildStore["update"]>[1] = {},
  ) {
    const moved = await store.update(buildId, { ...patch, state }, predecessors(state));
    if (!moved) {
      log.warn({ build_id: buildId, to: state }, "build state change refused by the state table");
      return;
    }
    if (isTerminal(state)) await events.flush(buildId);
    events.emit(buildId, { kind: "state", state, error: patch.error_message });
  }

  function pump(): void {
    while (!stopping && running.size < deps.settings.maxConcurrentBuilds && queue.length > 0) {
      const next = queue.shift()!;
      start(next);
    }
    metrics.queue.set(queue.length);
  }

  function start({ buildId, tenant, input }: Queued): void {
    const abort = new AbortController();
    const entry: Running = { tenant, abort, done: Promise.resolve() };
    running.set(buildId, entry);
    metrics.active.inc({ tenant_id: tenant.tenantId });
    entry.done = execute(buildId, tenant, input, abort).finally(() => {
      running.delete(buildId);
      metrics.active.dec({ tenant_id: tenant.tenantId });
      events.forget(buildId);
      pump();
    });
  }

  async function execute(
    buildId: string,
    tenant: TenantContext,
    input: CreateBuildInput,
    abort: AbortController,
  ) {
    const started = Date.now();
    const limits = await deps.limits(tenant);
    // A tree root short of room (a small tmpfs, other builds' trees): this tree goes in the build
    // dir. Cleanup still finds it there, as pathsOf's `root`.
    const treeRoot = deps.treeRoot && (await roomFor(deps.treeRoot)) ? deps.treeRoot : undefined;
    if (deps.treeRoot && !treeRoot)
      log.warn(
        { build_id: buildId, tenant_id: tenant.tenantId, path: deps.treeRoot },
        "tree root short of room: extracting in the build dir",
      );
    const paths = buildPaths(deps.dataDir, tenant.tenantId, buildId, treeRoot);
    const timeoutSeconds = effectiveTimeout(input.timeoutSeconds, limits.timeoutSeconds);
    const timer =
      timeoutSeconds > 0
        ? setTimeout(
            () => abort.abort(new StopReason("timeout", `timed out after ${timeoutSeconds}s`)),
            timeoutSeconds * 1000,
          )
        : undefined;
    const progress: Progress = {
      stage: "pending",
      bytesDone: 0,
      bytesTotal: 0,
      layersDone: 0,
      layersTotal: 0,
      percent: 0,
      step: "",
    };
    let lastSaved = 0;
    const sendProgress = createThrottle(PROGRESS_EVERY_MS, () =>
      events.emit(buildId, { kind: "progress", progress: { ...progress } }),
    );
    const saveProgress = (force = false) => {
      progress.percent = percentOf(progress);
      sendProgress.call(force);
      const now = Date.now();
      if (!force && now - lastSaved < 500) return;
      lastSaved = now;
      store
        .update(buildId, {
          progress_percent: progress.percent,
          current_step: progress.step,
          progress_json: JSON.stringify(progress),
        })
        .catch((err) => log.warn({ err, build_id: buildId }, "could not save build progress"));
    };
    const blog = log.child({ build_id: buildId, tenant_id: tenant.tenantId });

    try {
      await store.update(buildId, { started_at: started }, ["pending"]);
      const output = await runPipeline(input.spec, {
        paths,
        cache: deps.cacheFor(tenant.tenantId),
        applier: deps.applier,
        limits,
        insecureRegistries: deps.settings.insecureRegistries,
        localImageDirs: deps.settings.localImageDirs,
        layerConcurrency: deps.settings.layerConcurrency,
        ext4Writer: deps.settings.ext4Writer,
        tiniPath: deps.settings.tiniPath,
        busyboxPath: deps.settings.busyboxPath,
        discard: (dir) => deps.trash.discard(dir),
        checksum: !deps.assets,
        log: blog,
        signal: abort.signal,
        report: {
          async stage(state, step) {
            if (progress.stage !== state) {
              progress.stage = state;
              progress.step = step;
              await setState(buildId, state, { current_step: step });
              events.log(buildId, "info", state, step);
            } else {
              progress.step = step;
            }
            saveProgress(true);
          },
          progress(p) {
            Object.assign(progress, p);
            saveProgress();
          },
          log(level, component, message, meta) {
            events.log(buildId, level, component, message, meta);
          },
        },
        findExisting: (key) => reuse(tenant, buildId, key, paths.artifact),
        onPull(registry, seconds) {
          metrics.pulls.inc({ registry });
          metrics.pullDuration.observe({ registry }, seconds);
        },
      });
      if (deps.assets && !output.assetId) {
        events.log(buildId, "info", "register", "registering the rootfs with assetmanagerd");
        const reg = await deps.assets
          .register(tenant, {
            buildId,
            file: output.rootfsPath,
            checksum: output.rootfsChecksum || undefined,
            image: output.image,
          })
          .catch((err: unknown) => {
            throw new RegistrationError(err);
          });
        // assetmanagerd now owns the image (it took the file by hard link): drop our name for it.
        await fs.rm(output.rootfsPath, { force: true });
        Object.assign(output, {
          rootfsPath: reg.location,
          rootfsChecksum: reg.checksum,
          assetId: reg.assetId,
        });
        events.log(buildId, "info", "register", `rootfs asset ${reg.assetId}`, { checksum: reg.checksum });
      }
      progress.stage = "completed";
      progress.step = output.reusedFrom ? `reused the rootfs of ${output.reusedFrom}` : "done";
      progress.percent = 100;
      const completedAt = Date.now();
      events.log(buildId, "info", "build", `completed in ${completedAt - started} ms`, {
        rootfs: output.rootfsChecksum,
      });
      await setState(buildId, "completed", {
        completed_at: completedAt,
        dedupe_key: output.dedupeKey,
        image_digest: output.image.imageDigest,
        rootfs_path: output.rootfsPath,
        rootfs_size_bytes: output.rootfsSizeBytes,
        rootfs_checksum: output.rootfsChecksum,
        asset_id: output.assetId ?? null,
        image_metadata_json: JSON.stringify(output.image),
        metrics_json: JSON.stringify({ ...output.metrics, totalDurationMs: completedAt - started }),
        progress_percent: 100,
        current_step: progress.step,
        progress_json: JSON.stringify(progress),
      });
      finished("completed", started);
      blog.info({ duration_ms: completedAt - started, reused_from: output.reusedFrom }, "build completed");
    } catch (err) {
      const reason = abort.signal.aborted ? abort.signal.reason : undefined;
      if (reason instanceof StopReason && reason.kind === "cancel") {
        await setState(buildId, "cleaning", { current_step: "removing temporary files" });
        await removeBuildFiles(paths);
        events.log(buildId, "info", "build", "cancelled");
        await setState(buildId, "cancelled", {
          completed_at: Date.now(),
          error_message: "cancelled by request",
        });
        finished("cancelled", started);
        return;
      }
      const message =
        reason instanceof StopReason ? reason.message : err instanceof Error ? err.message : String(err);
      if (!(err instanceof KilnError) && !(reason instanceof StopReason))
        blog.error({ err }, "build failed unexpectedly");
      else blog.info({ error: message }, "build failed");
      events.log(buildId, "error", "build", `failed: ${message}`);
      await removeBuildFiles(paths).catch(() => {});
      await setState(buildId, "failed", { completed_at: Date.now(), error_message: message });
      finished("failed", started);
    } finally {
      clearTimeout(timer);
      sendProgress.cancel();
      // The result is recorded: now the extracted tree may be deleted.
      deps.trash.purge();
    }
  }

  function finished(status: "completed" | "failed" | "cancelled", started: number) {
    metrics.builds.inc({ status });
    metrics.duration.observe({ status }, (Date.now() - started) / 1000);
  }

  /** An earlier identical build's output, hard-linked into this build's directory. */
  async function reuse(
    tenant: TenantContext,
    buildId: string,
    dedupeKey: string,
    artifact: string,
  ): Promise<BuildOutput | undefined> {
    const prior = await store.completedByDedupeKey(tenant.tenantId, dedupeKey, buildId);
    if (!prior?.rootfs_path || !prior.image_metadata_json) return undefined;
    const shared = {
      dedupeKey,
      image: JSON.parse(prior.image_metadata_json),
      metrics: { ...JSON.parse(prior.metrics_json ?? "{}"), layersDownloaded: 0, bytesDownloaded: 0 },
      reusedFrom: prior.build_id,
      rootfsSizeBytes: prior.rootfs_size_bytes ?? 0,
    };
    if (deps.assets) {
      // The registered asset is the result; if it was deleted since, build again.
      const asset = prior.asset_id ? await deps.assets.find(tenant, prior.asset_id) : undefined;
      if (!asset) return undefined;
      return {
        ...shared,
        rootfsPath: asset.location,
        rootfsChecksum: asset.checksum,
        assetId: prior.asset_id!,
      };
    }
    try {
      await fs.mkdir(pathsOf(tenant.tenantId, buildId).root, { recursive: true });
      await fs.link(prior.rootfs_path, artifact);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined; // its artifact is gone: build again
      throw err;
    }
    return { ...shared, rootfsPath: artifact, rootfsChecksum: prior.rootfs_checksum ?? "" };
  }

  return {
    async createBuild(tenant: TenantContext, input: CreateBuildInput): Promise<BuildRow> {
      if (stopping)
        throw new UnavailableError("builderd is stopping; retry against another instance or after restart");
      // Fail fast on a malformed or disallowed reference, before anything is stored.
      const ref = parseImageRef(input.spec.imageUri);
      return withTenantLock(tenant.tenantId, async () => {
        if (input.idempotencyKey) {
          const prior = await store.byIdempotencyKey(tenant.tenantId, input.idempotencyKey);
          if (prior) return prior;
        }
        const limits = await deps.limits(tenant);
        if (ref.transport === "docker") {
          checkRegistryAllowed(ref.registry!, limits.allowedRegistries, deps.settings.insecureRegistries);
        } else {
          await resolveLocalPath(ref.path!, deps.settings.localImageDirs);
        }
        if (limits.maxConcurrentBuilds > 0) {
          const active = await store.countActive(tenant.tenantId, ACTIVE);
          if (active >= limits.maxConcurrentBuilds) {
            throw new QuotaExceededError(
              "MaxConcurrentBuilds",
              limits.maxConcurrentBuilds,
              `${active} build(s) of tenant ${tenant.tenantId} are not finished; wait or cancel one`,
            );
          }
        }
        if (limits.maxDailyBuilds > 0) {
          const now = Date.now();
          const today = await store.countCreatedSince(tenant.tenantId, now - (now % DAY_MS));
          if (today >= limits.maxDailyBuilds) {
            throw new QuotaExceededError(
              "MaxDailyBuilds",
              limits.maxDailyBuilds,
              `tenant ${tenant.tenantId} started ${today} builds today (UTC)`,
            );
          }
        }
        const now = Date.now();
        const row = {
          build_id: newId("bld"),
          tenant_id: tenant.tenantId,
          state: "pending" as const,
          config_json: input.configJson,
          source_ref: input.spec.imageUri,
          idempotency_key: input.idempotencyKey || null,
          dedupe_key: null,
          image_digest: null,
          progress_percent: 0,
          current_step: "waiting for a build slot",
          progress_json: "{}",
          rootfs_path: null,
          rootfs_size_bytes: null,
          rootfs_checksum: null,
          asset_id: null,
          image_metadata_json: null,
          metrics_json: null,
          error_message: "",
          created_at: now,
          started_at: null,
          completed_at: null,
          updated_at: now,
        };
        await store.insert(row);
        events.log(row.build_id, "info", "build", `accepted ${input.spec.imageUri}`);
        queue.push({ buildId: row.build_id, tenant, input });
        pump();
        return row;
      });
    },

    async getBuild(tenant: TenantContext, buildId: string): Promise<BuildRow> {
      return getOwned(tenant, buildId);
    },

    async listBuilds(
      tenant: TenantContext,
      opts: { states: BuildState[]; pageSize: number; pageToken: string },
    ): Promise<{ rows: BuildRow[]; total: number; nextPageToken: string }> {
      const limit = opts.pageSize > 0 ? opts.pageSize : 50;
      const before = opts.pageToken ? decodePageToken(opts.pageToken) : undefined;
      const { rows, total } = await store.list(tenant.tenantId, {
        states: opts.states,
        limit: limit + 1,
        before,
      });
      const page = rows.slice(0, limit);
      const last = page.at(-1);
      const nextPageToken =
        rows.length > limit && last
          ? encodePageToken({ createdAt: last.created_at, buildId: last.build_id })
          : "";
      return { rows: page, total, nextPageToken };
    },

    /** Stops a pending or running build; returns false when it had already ended. */
    async cancelBuild(
      tenant: TenantContext,
      buildId: string,
    ): Promise<{ success: boolean; state: BuildState }> {
      const row = await getOwned(tenant, buildId);
      if (isTerminal(row.state)) return { success: false, state: row.state };
      const queuedAt = queue.findIndex((q) => q.buildId === buildId);
      if (queuedAt >= 0) {
        queue.splice(queuedAt, 1);
        metrics.queue.set(queue.length);
        events.log(buildId, "info", "build", "cancelled before it started");
        await setState(buildId, "cancelled", {
          completed_at: Date.now(),
          error_message: "cancelled by request",
        });
        metrics.builds.inc({ status: "cancelled" });
        return { success: true, state: "cancelled" };
      }
      const r = running.get(buildId);
      if (r) {
        r.abort.abort(new StopReason("cancel", "cancelled by request"));
        await r.done;
      }
      const after = await getOwned(tenant, buildId);
      return { success: after.state === "cancelled", state: after.state };
    },

    /** Removes a build and its artifacts; a build still running is cancelled first. */
    async deleteBuild(tenant: TenantContext, buildId: string): Promise<{ state: BuildState }> {
      let row = await getOwned(tenant, buildId);
      if (!isTerminal(row.state)) {
        await this.cancelBuild(tenant, buildId);
        row = await getOwned(tenant, buildId);
      }
      await removeBuildFiles(pathsOf(tenant.tenantId, buildId));
      await store.delete(buildId);
      return { state: row.state };
    },

    follow(
      tenant: TenantContext,
      buildId: string,
      opts: { follow: boolean; signal?: AbortSignal },
    ): AsyncGenerator<BuildEvent> {
      const currentState = async () => (await getOwned(tenant, buildId)).state;
      return events.follow(buildId, { follow: opts.follow, currentState, signal: opts.signal });
    },

    async stats(tenant: TenantContext, from: number, to: number) {
      const rows = await store.inRange(tenant.tenantId, from, to);
      const ended = rows.filter((r) => r.completed_at && r.started_at);
      const completed = rows.filter((r) => r.state === "completed");
      const durations = completed
        .filter((r) => r.completed_at && r.started_at)
        .map((r) => (r.completed_at ?? 0) - (r.started_at ?? 0));
      return {
        total: rows.length,
        successful: completed.length,
        failed: rows.filter((r) => r.state === "failed").length,
        cancelled: rows.filter((r) => r.state === "cancelled").length,
        active: rows.filter((r) => !isTerminal(r.state)).length,
        avgBuildTimeMs: durations.length
          ? Math.round(durations.reduce((a, b) => a + b, 0) / durations.length)
          : 0,
        storageBytes: completed.reduce((n, r) => n + (r.rootfs_size_bytes ?? 0), 0),
        computeMinutes: ended.reduce((n, r) => n + ((r.completed_at ?? 0) - (r.started_at ?? 0)), 0) / 60_000,
        recent: rows.slice(0, 10),
      };
    },

    /**
     * Start-up: builds a previous process left unfinished are failed with the reason (their
     * partial files removed), and the layer caches drop interrupted downloads.
     */
    async recover(): Promise<number> {
      const left = await store.unfinished(ACTIVE);
      for (const row of left) {
        const message = `interrupted: builderd stopped while the build was ${row.state.toUpperCase()}; start it again`;
        await removeBuildFiles(pathsOf(row.tenant_id, row.build_id)).catch(() => {});
        await store.update(row.build_id, {
          state: "failed",
          error_message: message,
          completed_at: Date.now(),
        });
        await events.log(row.build_id, "error", "build", message);
        log.warn(
          { build_id: row.build_id, tenant_id: row.tenant_id, state: row.state },
          "failed a build interrupted by a restart",
        );
      }
      // Downloads cut off by the crash left temp files in the tenants' layer caches, and
      // trees still being deleted are in the trash.
      const tenants = await fs.readdir(path.join(deps.dataDir, "tenants")).catch(() => [] as string[]);
      for (const t of tenants) if (!t.startsWith(".")) await deps.cacheFor(t).cleanup();
      await deps.trash.sweep();
      return left.length;
    },

    /** Graceful stop: queued builds and running ones end as FAILED with the reason. */
    async stop(): Promise<void> {
      stopping = true;
      for (const q of queue.splice(0)) {
        await setState(q.buildId, "failed", {
          completed_at: Date.now(),
          error_message: "interrupted: builderd stopped before the build started; start it again",
        });
      }
      for (const r of running.values())
        r.abort.abort(new StopReason("shutdown", "interrupted: builderd stopped; start it again"));
      await Promise.all([...running.values()].map((r) => r.done));
      await deps.applier.close();
      deps.trash.purge();
      await deps.trash.drain();
    },
  };
}

export type BuildManager = ReturnType<typeof createBuildManager>;

/** The request's timeout, capped by the tier's (0 = none). */
export function effectiveTimeout(requested: number, tierLimit: number): number {
  if (tierLimit <= 0) return Math.max(requested, 0);
  return requested > 0 ? Math.min(requested, tierLimit) : tierLimit;
}

/** Rough progress over the whole pipeline: pulling ~45%, extracting ~30%, the rest ~25%. */
function percentOf(p: Progress): number {
  const pulled = p.bytesTotal > 0 ? p.bytesDone / p.bytesTotal : 0;
  const extracted = p.layersTotal > 0 ? p.layersDone / p.layersTotal : 0;
  switch (p.stage) {
    case "pending":
      return 0;
    case "pulling":
    case "extracting":
      return Math.min(74, Math.round(45 * pulled + 30 * extracted));
    case "building":
      return 78;
    case "optimizing":
      return 85;
    default:
      return 100;
  }
}

function encodePageToken(t: { createdAt: number; buildId: string }): string {
  return Buffer.from(JSON.stringify([t.createdAt, t.buildId])).toString("base64url");
}

function decodePageToken(token: string): { createdAt: number; buildId: string } {
  try {
    const [createdAt, buildId] = JSON.parse(Buffer.from(token, "base64url").toString("utf8")) as [
      number,
      string,
    ];
    if (typeof createdAt !== "number" || typeof buildId !== "string") throw new Error();
    return { createdAt, buildId };
  } catch {
    throw new InvalidArgumentError("page_token is not a token this server issued", { field: "page_token" });
  }
}
