import { type Logger, NotFoundError, newId, type TenantContext } from "@kiln/kit";
import type { VmManager, VmRequest } from "./manager.js";
import type { DeploymentRow, VmStore } from "./store.js";

export type DeploymentState = "pending" | "active" | "scaling" | "failed" | "deleting";

export class DeploymentNotFoundError extends NotFoundError {
  constructor(readonly deploymentId: string) {
    super(`deployment ${deploymentId} not found`);
  }
}

/**
 * N replicas of one VM config. Scaling up creates and boots VMs; scaling down deletes the newest;
 * a new template replaces replicas one at a time (new one booted before the old one goes).
 */
export function createDeployments(deps: { store: VmStore; vms: VmManager; log: Logger }) {
  const { store, vms } = deps;

  async function owned(tenant: TenantContext, id: string): Promise<DeploymentRow> {
    const row = await store.deployments.get(tenant.tenantId, id);
    if (!row) throw new DeploymentNotFoundError(id);
    return row;
  }

  async function addReplica(tenant: TenantContext, id: string, template: VmRequest): Promise<string> {
    const vm = await vms.createVm(tenant, template, { deploymentId: id });
    await vms.bootVm(tenant, vm.vm_id);
    return vm.vm_id;
  }

  /** Brings a deployment to `replicas` VMs of `template`; records failures on the deployment. */
  async function reconcile(
    tenant: TenantContext,
    id: string,
    template: VmRequest,
    replicas: number,
    replace: boolean,
  ) {
    await store.deployments.update(id, { state: "scaling" });
    try {
      let current = await store.deployments.vmIds(id);
      if (replace) {
        for (const old of [...current]) {
          if (current.length <= replicas) await addReplica(tenant, id, template);
          await vms.deleteVm(tenant, old);
          current = await store.deployments.vmIds(id);
        }
      }
      while (current.length < replicas) {
        await addReplica(tenant, id, template);
        current = await store.deployments.vmIds(id);
      }
      for (const extra of current.slice(replicas).reverse()) await vms.deleteVm(tenant, extra);
      await store.deployments.update(id, { state: "active" });
    } catch (err) {
      deps.log.warn({ err, deployment_id: id }, "deployment could not reach its replica count");
      await store.deployments.update(id, { state: "failed" });
      throw err;
    }
  }

  return {
    async create(
      tenant: TenantContext,
      d: { name: string; template: VmRequest; replicas: number },
    ): Promise<DeploymentRow> {
      const now = Date.now();
      const row: DeploymentRow = {
        deployment_id: newId("dep"),
        tenant_id: tenant.tenantId,
        name: d.name,
        template_json: JSON.stringify(d.template),
        replicas: d.replicas,
        state: "pending",
        created_at: now,
        updated_at: now,
      };
      await store.deployments.insert(row);
      await reconcile(tenant, row.deployment_id, d.template, d.replicas, false);
      return owned(tenant, row.deployment_id);
    },

    async get(
      tenant: TenantContext,
      id: string,
    ): Promise<{ row: DeploymentRow; vmIds: string[]; ready: number }> {
      const row = await owned(tenant, id);
      const vmIds = await store.deployments.vmIds(id);
      let ready = 0;
      for (const vmId of vmIds) if ((await vms.getVm(tenant, vmId)).row.state === "running") ready++;
      return { row, vmIds, ready };
    },

    async update(
      tenant: TenantContext,
      id: string,
      u: { replicas?: number; template?: VmRequest },
    ): Promise<DeploymentRow> {
      const row = await owned(tenant, id);
      const template = u.template ?? (JSON.parse(row.template_json) as VmRequest);
      const replicas = u.replicas ?? row.replicas;
      await store.deployments.update(id, { replicas, template_json: JSON.stringify(template) });
      await reconcile(tenant, id, template, replicas, u.template !== undefined);
      return owned(tenant, id);
    },

    async delete(tenant: TenantContext, id: string): Promise<void> {
      await owned(tenant, id);
      await store.deployments.update(id, { state: "deleting" });
      for (const vmId of await store.deployments.vmIds(id)) await vms.deleteVm(tenant, vmId);
      await store.deployments.delete(id);
    },

    async list(tenant: TenantContext, pageSize: number, pageToken: string) {
      const limit = pageSize > 0 ? pageSize : 50;
      const after = pageToken ? Buffer.from(pageToken, "base64url").toString("utf8") : undefined;
      const { rows, total } = await store.deployments.list(tenant.tenantId, limit + 1, after);
      const page = rows.slice(0, limit);
      return {
        rows: page,
        total,
        nextPageToken:
          rows.length > limit ? Buffer.from(page.at(-1)!.deployment_id).toString("base64url") : "",
      };
    },
  };
}

export type Deployments = ReturnType<typeof createDeployments>;
