import type { Kysely, Selectable } from "kysely";
import type { NamespacePoolTables } from "../network/netns-pool.js";
import type { NetworkTables } from "../network/pool.js";
import type { VmState } from "./lifecycle.js";

/** Times are epoch ms; *_json columns hold JSON text. */
export interface VmsTable {
  vm_id: string;
  tenant_id: string;
  state: VmState;
  backend: string;
  /** The request's VmConfig as proto JSON. */
  config_json: string;
  deployment_id: string | null;
  failure_reason: string;
  pid: number | null;
  pid_start_time: number | null;
  /** VmRuntime: the backend spec, handle, leases and network of the VM. */
  runtime_json: string;
  created_at: number;
  updated_at: number;
  booted_at: number | null;
}

export interface DeploymentsTable {
  deployment_id: string;
  tenant_id: string;
  name: string;
  template_json: string;
  replicas: number;
  state: string;
  created_at: number;
  updated_at: number;
}

export interface MetaldDb extends NetworkTables, NamespacePoolTables {
  vms: VmsTable;
  deployments: DeploymentsTable;
}

export type VmRow = Selectable<VmsTable>;
export type DeploymentRow = Selectable<DeploymentsTable>;
export type VmPatch = Partial<Omit<VmsTable, "vm_id" | "tenant_id" | "created_at">>;

export function createVmStore(db: Kysely<MetaldDb>) {
  return {
    db,
    async insert(row: VmsTable): Promise<void> {
      await db.insertInto("vms").values(row).execute();
    },
    async get(tenantId: string, vmId: string): Promise<VmRow | undefined> {
      return db
        .selectFrom("vms")
        .selectAll()
        .where("tenant_id", "=", tenantId)
        .where("vm_id", "=", vmId)
        .executeTakeFirst();
    },
    async update(vmId: string, patch: VmPatch): Promise<void> {
      await db
        .updateTable("vms")
        .set({ ...patch, updated_at: Date.now() })
        .where("vm_id", "=", vmId)
        .execute();
    },
    async delete(vmId: string): Promise<void> {
      await db.deleteFrom("vms").where("vm_id", "=", vmId).execute();
    },
    async list(
      tenantId: string,
      opts: { states: VmState[]; deploymentId?: string; limit: number; after?: string },
    ): Promise<{ rows: VmRow[]; total: number }> {
      let base = db.selectFrom("vms").where("tenant_id", "=", tenantId);
      if (opts.states.length > 0) base = base.where("state", "in", opts.states);
      if (opts.deploymentId) base = base.where("deployment_id", "=", opts.deploymentId);
      const total = await base.select((eb) => eb.fn.countAll<number>().as("n")).executeTakeFirstOrThrow();
      let page = base.selectAll();
      if (opts.after) page = page.where("vm_id", ">", opts.after);
      const rows = await page.orderBy("vm_id").limit(opts.limit).execute();
      return { rows, total: Number(total.n) };
    },
    async countForTenant(tenantId: string): Promise<number> {
      const r = await db
        .selectFrom("vms")
        .where("tenant_id", "=", tenantId)
        .select((eb) => eb.fn.countAll<number>().as("n"))
        .executeTakeFirstOrThrow();
      return Number(r.n);
    },
    async all(): Promise<VmRow[]> {
      return db.selectFrom("vms").selectAll().execute();
    },
    async countByStateAndBackend(): Promise<Array<{ state: string; backend: string; n: number }>> {
      const rows = await db
        .selectFrom("vms")
        .select(["state", "backend", (eb) => eb.fn.countAll<number>().as("n")])
        .groupBy(["state", "backend"])
        .execute();
      return rows.map((r) => ({ state: r.state, backend: r.backend, n: Number(r.n) }));
    },

    deployments: {
      async insert(row: DeploymentsTable): Promise<void> {
        await db.insertInto("deployments").values(row).execute();
      },
      async get(tenantId: string, id: string): Promise<DeploymentRow | undefined> {
        return db
          .selectFrom("deployments")
          .selectAll()
          .where("tenant_id", "=", tenantId)
          .where("deployment_id", "=", id)
          .executeTakeFirst();
      },
      async update(
        id: string,
        patch: Partial<Omit<DeploymentsTable, "deployment_id" | "tenant_id">>,
      ): Promise<void> {
        await db
          .updateTable("deployments")
          .set({ ...patch, updated_at: Date.now() })
          .where("deployment_id", "=", id)
          .execute();
      },
      async delete(id: string): Promise<void> {
        await db.deleteFrom("deployments").where("deployment_id", "=", id).execute();
      },
      async list(
        tenantId: string,
        limit: number,
        after?: string,
      ): Promise<{ rows: DeploymentRow[]; total: number }> {
        const base = db.selectFrom("deployments").where("tenant_id", "=", tenantId);
        const total = await base.select((eb) => eb.fn.countAll<number>().as("n")).executeTakeFirstOrThrow();
        let page = base.selectAll();
        if (after) page = page.where("deployment_id", ">", after);
        const rows = await page.orderBy("deployment_id").limit(limit).execute();
        return { rows, total: Number(total.n) };
      },
      async vmIds(id: string): Promise<string[]> {
        const rows = await db
          .selectFrom("vms")
          .select("vm_id")
          .where("deployment_id", "=", id)
          .orderBy("vm_id")
          .execute();
        return rows.map((r) => r.vm_id);
      },
    },
  };
}

export type VmStore = ReturnType<typeof createVmStore>;
