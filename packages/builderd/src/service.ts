import { timestampDate } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import type { BuilderService } from "@kiln/api";
import { requireTenant } from "@kiln/kit";
import type { BuildManager } from "./builds/manager.js";
import type { BuildState } from "./builds/states.js";
import {
  buildJob,
  configJsonWithoutSecrets,
  logMessage,
  specFromConfig,
  stateFromProto,
  stateToProto,
} from "./convert.js";

const DAY_MS = 86_400_000;

/** BuilderService: translates requests to the build manager and back; no logic of its own. */
export function createBuilderService(manager: BuildManager): ServiceImpl<typeof BuilderService> {
  return {
    async createBuild(req, ctx) {
      const tenant = requireTenant(ctx);
      const config = req.config!; // required by the contract's validation
      const row = await manager.createBuild(tenant, {
        spec: specFromConfig(config),
        configJson: configJsonWithoutSecrets(config),
        timeoutSeconds: config.timeoutSeconds,
        idempotencyKey: req.idempotencyKey,
      });
      const job = buildJob(row);
      return { buildId: job.buildId, state: job.state, createdAt: job.createdAt };
    },

    async getBuild(req, ctx) {
      return { build: buildJob(await manager.getBuild(requireTenant(ctx), req.buildId)) };
    },

    async listBuilds(req, ctx) {
      const page = await manager.listBuilds(requireTenant(ctx), {
        states: req.stateFilter.map(stateFromProto),
        pageSize: req.pageSize,
        pageToken: req.pageToken,
      });
      return { builds: page.rows.map(buildJob), nextPageToken: page.nextPageToken, totalCount: page.total };
    },

    async cancelBuild(req, ctx) {
      const r = await manager.cancelBuild(requireTenant(ctx), req.buildId);
      return { success: r.success, state: stateToProto(r.state) };
    },

    async deleteBuild(req, ctx) {
      const r = await manager.deleteBuild(requireTenant(ctx), req.buildId);
      return { success: true, state: stateToProto(r.state) };
    },

    async *streamBuildLogs(req, ctx) {
      const tenant = requireTenant(ctx);
      let state: BuildState = (await manager.getBuild(tenant, req.buildId)).state;
      for await (const e of manager.follow(tenant, req.buildId, { follow: req.follow, signal: ctx.signal })) {
        if (e.kind === "state") state = e.state;
        yield logMessage(e, state);
      }
    },

    async getBuildStats(req, ctx) {
      const to = req.endTime ? timestampDate(req.endTime).getTime() : Date.now();
      const from = req.startTime ? timestampDate(req.startTime).getTime() : to - 30 * DAY_MS;
      const s = await manager.stats(requireTenant(ctx), from, to);
      return {
        totalBuilds: s.total,
        successfulBuilds: s.successful,
        failedBuilds: s.failed,
        cancelledBuilds: s.cancelled,
        avgBuildTimeMs: BigInt(s.avgBuildTimeMs),
        totalStorageBytes: BigInt(s.storageBytes),
        totalComputeMinutes: s.computeMinutes,
        recentBuilds: s.recent.map(buildJob),
        activeBuilds: s.active,
      };
    },
  };
}
