import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import type { VmService } from "@kiln/api";
import { requireTenant } from "@kiln/kit";
import type { BackendReport } from "./backends/index.js";
import {
  deployment,
  endpoint,
  isolationToProto,
  stateFromProto,
  stateToProto,
  vmInfo,
  vmRequest,
} from "./convert.js";
import { readConsole } from "./vms/console.js";
import type { Deployments } from "./vms/deployments.js";
import type { VmManager } from "./vms/manager.js";

/** VmService: translates requests to the VM manager and back; no logic of its own. */
export function createVmService(deps: {
  vms: VmManager;
  deployments: Deployments;
  backends: { reports: BackendReport[]; auto: string | undefined };
}): ServiceImpl<typeof VmService> {
  const { vms, deployments } = deps;
  const info = async (tenant: ReturnType<typeof requireTenant>, vmId: string) => {
    const v = await vms.getVm(tenant, vmId);
    return vmInfo(v.row, v.runtime, v.sample, vms.endpointHost);
  };
  const deploymentOf = async (tenant: ReturnType<typeof requireTenant>, id: string) => {
    const d = await deployments.get(tenant, id);
    return deployment(d.row, d.vmIds, d.ready);
  };
  return {
    async createVm(req, ctx) {
      const row = await vms.createVm(requireTenant(ctx), vmRequest(req.config!));
      return {
        vmId: row.vm_id,
        state: stateToProto(row.state),
        endpoint: endpoint(JSON.parse(row.runtime_json), vms.endpointHost),
      };
    },
    async deleteVm(req, ctx) {
      await vms.deleteVm(requireTenant(ctx), req.vmId);
      return { success: true };
    },
    async bootVm(req, ctx) {
      const row = await vms.bootVm(requireTenant(ctx), req.vmId);
      return { success: true, state: stateToProto(row.state) };
    },
    async shutdownVm(req, ctx) {
      const row = await vms.shutdownVm(requireTenant(ctx), req.vmId, {
        force: req.force,
        timeoutMs: req.timeoutSeconds > 0 ? req.timeoutSeconds * 1000 : undefined,
      });
      return { success: true, state: stateToProto(row.state) };
    },
    async pauseVm(req, ctx) {
      return { success: true, state: stateToProto((await vms.pauseVm(requireTenant(ctx), req.vmId)).state) };
    },
    async resumeVm(req, ctx) {
      return { success: true, state: stateToProto((await vms.resumeVm(requireTenant(ctx), req.vmId)).state) };
    },
    async rebootVm(req, ctx) {
      return { success: true, state: stateToProto((await vms.rebootVm(requireTenant(ctx), req.vmId)).state) };
    },
    async getVmInfo(req, ctx) {
      return { vm: await info(requireTenant(ctx), req.vmId) };
    },
    async listVms(req, ctx) {
      const tenant = requireTenant(ctx);
      const page = await vms.listVms(tenant, {
        states: req.stateFilter.map(stateFromProto),
        deploymentId: req.deploymentId || undefined,
        pageSize: req.pageSize,
        pageToken: req.pageToken,
      });
      const out = [];
      for (const row of page.rows) out.push(await info(tenant, row.vm_id));
      return { vms: out, nextPageToken: page.nextPageToken, totalCount: page.total };
    },
    async *streamVmLogs(req, ctx) {
      const tenant = requireTenant(ctx);
      const log = await vms.consoleLog(tenant, req.vmId);
      const stillRunning = async () => {
        const s = await log.state();
        return s === "running" || s === "paused";
      };
      for await (const line of readConsole(log.file, {
        tailLines: req.tailLines,
        follow: req.follow,
        signal: ctx.signal,
        stillRunning,
      })) {
        yield { timestamp: timestampFromMs(Date.now()), stream: "console", line };
      }
    },
    async listBackends() {
      return {
        autoBackend: deps.backends.auto ?? "",
        backends: deps.backends.reports.map((r) => ({
          name: r.name,
          available: r.probe.available,
          reason: r.probe.reason,
          isolationLevel: isolationToProto(r.probe.isolation),
          accelerated: r.probe.accelerated,
          version: r.probe.version,
        })),
      };
    },
    async createDeployment(req, ctx) {
      const tenant = requireTenant(ctx);
      const row = await deployments.create(tenant, {
        name: req.name,
        template: vmRequest(req.template!),
        replicas: req.replicas,
      });
      return { deployment: await deploymentOf(tenant, row.deployment_id) };
    },
    async getDeployment(req, ctx) {
      return { deployment: await deploymentOf(requireTenant(ctx), req.deploymentId) };
    },
    async updateDeployment(req, ctx) {
      const tenant = requireTenant(ctx);
      await deployments.update(tenant, req.deploymentId, {
        replicas: req.replicas,
        template: req.template ? vmRequest(req.template) : undefined,
      });
      return { deployment: await deploymentOf(tenant, req.deploymentId) };
    },
    async deleteDeployment(req, ctx) {
      await deployments.delete(requireTenant(ctx), req.deploymentId);
      return { success: true };
    },
    async listDeployments(req, ctx) {
      const tenant = requireTenant(ctx);
      const page = await deployments.list(tenant, req.pageSize, req.pageToken);
      const out = [];
      for (const row of page.rows) out.push(await deploymentOf(tenant, row.deployment_id));
      return { deployments: out, nextPageToken: page.nextPageToken, totalCount: page.total };
    },
  };
}
