import fs from "node:fs/promises";
import path from "node:path";
import {
  createKeyedLock,
  FailedPreconditionError,
  InternalError,
  InvalidArgumentError,
  type LimitsResolver,
  type Logger,
  NotFoundError,
  newId,
  ResourceExhaustedError,
  settleAll,
  type TenantContext,
  UnavailableError,
} from "@kiln/kit";
import type { Backend, BackendHandle, BackendName, VmSpec, WorkloadConfig } from "../backends/backend.js";
import { type CgroupManager, cgroupLimits } from "../cgroups/cgroup.js";
import type { Sampler, VmSample } from "../metering/sampler.js";
import type { NetworkAttacher, VmNetwork } from "../network/attach.js";
import type { PortPool } from "../network/pool.js";
import type { PortForwarder } from "../network/port-forward.js";
import type { Router } from "../network/router.js";
import type { VmAssets } from "./assets.js";
import { transition, type VmState } from "./lifecycle.js";
import type { VmRow, VmStore } from "./store.js";

const MiB = 1024 * 1024;

/** What CreateVm asks for, in domain terms. */
export interface VmRequest {
  vcpus: number;
  memoryBytes: number;
  rootfsAssetId: string;
  kernelAssetId: string;
  initrdAssetId: string;
  kernelArgs: string[];
  ports: Array<{ containerPort: number; hostPort: number; protocol: "tcp" | "udp" }>;
  env: Record<string, string>;
  /** "" = the host default. */
  backend: string;
  /** The request's VmConfig as JSON (stored and echoed back). */
  configJson: string;
}

/** What a VM needs besides its row: kept as JSON in `vms.runtime_json`. */
export interface VmRuntime {
  spec: VmSpec;
  /** The tenant's tier when the VM was created (egress policy on recovery). */
  tier: TenantContext["tier"];
  handle?: BackendHandle;
  leases: Array<{ leaseId: string; assetId: string }>;
  ports: Array<{ containerPort: number; hostPort: number; protocol: "tcp" | "udp" }>;
  network?: VmNetwork;
  /** Set while BootVm runs: found on start-up, the boot was cut off by a metald crash. */
  booting?: boolean;
}

/** How metald finds and chooses VM backends (backends/index.ts). */
export interface BackendRegistry {
  get(name: BackendName): Backend;
  /** The backend to use for a request's choice ("" or "auto": the strongest available). */
  choose(requested: string): Promise<BackendName>;
}

/** Lifecycle facts for whoever bills (metering/usage-forwarder.ts hands them to billaged). */
export interface VmLifecycleEvents {
  started?(vm: { vmId: string; tenant: TenantContext }): void;
  /** A VM found still running after a metald restart. */
  adopted?(vm: { vmId: string; tenant: TenantContext }): void;
  stopped?(vm: { vmId: string; tenant: TenantContext; reason: string }): void;
}

export interface VmManagerDeps {
  store: VmStore;
  backends: BackendRegistry;
  assets: VmAssets;
  /** The host's default guest kernel and initramfs for VM backends (built once). */
  hostKernel: () => Promise<{ kernel: string; initrd: string }>;
  network: {
    router: Router;
    attacher: NetworkAttacher;
    ports: PortPool;
    forwarder: PortForwarder;
    /** Why VM networking cannot work on this host (set when the router could not be made). */
    unavailable?: () => string | undefined;
  };
  cgroups: CgroupManager;
  sampler: Sampler;
  limits: LimitsResolver;
  events?: VmLifecycleEvents;
  settings: {
    /** `<vm root>/<vm>/` is each VM's directory (assets placed by assetmanagerd under `assets/`). */
    vmRoot: string;
    /** The host name endpoints report (where forwarded ports listen). */
    endpointHost: string;
    shutdownTimeoutMs: number;
    defaultBackend: string;
  };
  metrics: {
    boot(backend: string, seconds: number): void;
    op(op: string, result: "ok" | "error"): void;
  };
  log: Logger;
}

export class VmNotFoundError extends NotFoundError {
  constructor(
    readonly vmId: string,
    readonly tenantId: string,
  ) {
    super(`VM ${vmId} not found`);
  }
}

const VM_BACKENDS: ReadonlySet<BackendName> = new Set(["qemu", "firecracker"]);

/**
 * The VMs of this host: creation (assets, network, cgroup, backend files), the lifecycle verbs
 * checked against the state table, deletion that leaves nothing behind, and recovery after a
 * metald restart. Knows nothing of RPC.
 */
export function createVmManager(deps: VmManagerDeps) {
  const { store, log } = deps;
  /** One operation at a time per VM. */
  const locked = createKeyedLock();

  async function owned(tenant: TenantContext, vmId: string): Promise<VmRow> {
    const row = await store.get(tenant.tenantId, vmId);
    if (!row) throw new VmNotFoundError(vmId, tenant.tenantId);
    return row;
  }

  /** What the row holds so far: CreateVm records its leases first and the rest at its end. */
  const partialRuntimeOf = (row: VmRow) => JSON.parse(row.runtime_json) as Partial<VmRuntime>;
  /** The VM's runtime once CreateVm finished; undefined while it runs (or a crash cut it off). */
  const runtimeOf = (row: VmRow): VmRuntime | undefined => {
    const rt = partialRuntimeOf(row);
    return rt.spec ? (rt as VmRuntime) : undefined;
  };
  const createdRuntimeOf = (row: VmRow): VmRuntime => {
    const rt = runtimeOf(row);
    if (rt) return rt;
    throw new FailedPreconditionError(
      row.state === "failed"
        ? `VM ${row.vm_id} is FAILED: ${row.failure_reason}`
        : `VM ${row.vm_id} is still being created; retry when CreateVm has returned`,
    );
  };
  const tenantOf = (row: VmRow): TenantContext => ({
    tenantId: row.tenant_id,
    tier: partialRuntimeOf(row).tier ?? "free",
  });

  async function measured<T>(op: string, fn: () => Promise<T>): Promise<T> {
    try {
      const r = await fn();
      deps.metrics.op(op, "ok");
      return r;
    } catch (err) {
      deps.metrics.op(op, "error");
      throw err;
    }
  }

  /** Starts port forwards and sampling for a VM whose process runs. */
  async function attachRunning(vmId: string, rt: VmRuntime): Promise<void> {
    if (rt.network) {
      for (const p of rt.ports) {
        await deps.network.forwarder.forward(vmId, {
          hostPort: p.hostPort,
          guestIp: rt.network.guestIp,
          containerPort: p.containerPort,
          protocol: p.protocol,
        });
      }
    }
    const cg = deps.cgroups.get(rt.spec.tenantId, vmId);
    deps.sampler.add({
      vmId,
      cgroup: {
        cpuacct: cg.path("cpuacct"),
        memory: cg.path("memory"),
        blkio: cg.path("blkio"),
        pids: cg.path("pids"),
      },
      netStatsDir: rt.network?.statsDir,
    });
  }

  async function detachRunning(vmId: string): Promise<void> {
    deps.sampler.remove(vmId);
    await deps.network.forwarder.stop(vmId);
  }

  /**
   * Removes everything a VM holds. Every step runs even when an earlier one fails; the failures
   * are reported together so a retried delete can finish the job.
   */
  async function teardown(row: VmRow, rt: Partial<VmRuntime> | undefined): Promise<string[]> {
    const failures: string[] = [];
    const step = async (what: string, fn: () => Promise<unknown>) => {
      try {
        await fn();
      } catch (err) {
        failures.push(`${what}: ${err instanceof Error ? err.message : String(err)}`);
        log.warn({ err, vm_id: row.vm_id }, `delete: ${what} failed`);
      }
    };
    await step("stop forwarding and sampling", () => detachRunning(row.vm_id));
    const spec = rt?.spec;
    if (spec) {
      await step("remove the backend's files", () =>
        deps.backends.get(row.backend as BackendName).delete(spec, rt.handle),
      );
    }
    await step("remove the cgroup", () => deps.cgroups.get(row.tenant_id, row.vm_id).remove());
    await step("release host ports", () => deps.network.ports.release(row.vm_id));
    await step("remove the network namespace", () => deps.network.attacher.detach(row.vm_id));
    for (const lease of rt?.leases ?? []) {
      await step(`release lease ${lease.leaseId}`, () => deps.assets.release(tenantOf(row), lease.leaseId));
    }
    await step("remove the VM directory", () => fs.rm(vmDir(row.vm_id), { recursive: true, force: true }));
    return failures;
  }

  const vmDir = (vmId: string) => path.join(deps.settings.vmRoot, vmId);

  /**
   * Start-up found a VM whose CreateVm a metald crash cut off (no runtime yet): what it got so far
   * (namespace, cgroup, address, ports, recorded leases, directory) is removed, and the row stays
   * FAILED to say so until the VM is deleted.
   */
  async function abandonCreation(row: VmRow): Promise<void> {
    const failures = await teardown(row, partialRuntimeOf(row));
    const reason = "creation was cut off by a metald restart; delete the VM and create it again";
    await store.update(row.vm_id, {
      state: "failed",
      failure_reason:
        failures.length === 0 ? reason : `${reason} (cleaning up failed: ${failures.join("; ")})`,
      // Leases that could not be released stay recorded, for DeleteVm to retry.
      ...(failures.length === 0 ? { runtime_json: "{}" } : {}),
    });
    log.warn(
      { vm_id: row.vm_id, tenant_id: row.tenant_id, failures },
      "a VM creation cut off by a restart was undone",
    );
  }

  return {
    /** Creates a VM: prepared, networked and limited, not started (CREATED). */
    async createVm(
      tenant: TenantContext,
      req: VmRequest,
      opts: { deploymentId?: string } = {},
    ): Promise<VmRow> {
      return measured("create", async () => {
        const down = deps.network.unavailable?.();
        if (down) throw new UnavailableError(`${down}; see metald's log and /health/ready`);
        const limits = await deps.limits(tenant);
        if (limits.maxVms > 0) {
          const have = await store.countForTenant(tenant.tenantId);
          if (have >= limits.maxVms) {
            throw new ResourceExhaustedError(
              `MaxVms (${limits.maxVms}) reached: tenant ${tenant.tenantId} has ${have} VMs; delete one first`,
            );
          }
        }
        const vcpus = req.vcpus || 1;
        const memoryBytes = req.memoryBytes || 128 * MiB;
        const cgLimits = cgroupLimits({ vcpus, memoryBytes }, limits, { memoryOverheadBytes: 64 * MiB });
        if (!req.rootfsAssetId) {
          throw new InvalidArgumentError("a VM needs a rootfs: set config.rootfs_asset_id (a ROOTFS asset)", {
            field: "config.rootfs_asset_id",
          });
        }
        const backendName = await deps.backends.choose(req.backend || deps.settings.defaultBackend);
        const backend = deps.backends.get(backendName);
        const vmId = deps.network.attacher.newVmId();
        const now = Date.now();
        const row: VmRow = {
          vm_id: vmId,
          tenant_id: tenant.tenantId,
          state: "created",
          backend: backendName,
          config_json: req.configJson,
          deployment_id: opts.deploymentId ?? null,
          failure_reason: "",
          pid: null,
          pid_start_time: null,
          runtime_json: "{}",
          created_at: now,
          updated_at: now,
          booted_at: null,
        };
        await store.insert(row);
        const rt: Partial<VmRuntime> & { leases: VmRuntime["leases"] } = { leases: [], tier: tenant.tier };
        const vlog = log.child({ vm_id: vmId, tenant_id: tenant.tenantId, backend: backendName });
        let wiring: Promise<void> | undefined;
        let cgroupMade: Promise<unknown> | undefined;
        try {
          // The network is planned first (address and names are all the VM's files need), then
          // its namespace is wired while the assets are placed and the backend prepares.
          const network = await deps.network.attacher.plan(
            { vmId, egressAllowed: limits.egressAllowed },
            { mode: VM_BACKENDS.has(backendName) ? "tap" : "address" },
          );
          rt.network = network;
          wiring = deps.network.attacher.wire({ vmId, egressAllowed: limits.egressAllowed }, network);
          wiring.catch(() => undefined); // awaited below; a failure meanwhile is not "unhandled"
          cgroupMade = deps.cgroups.create(tenant.tenantId, vmId, cgLimits);
          cgroupMade.catch(() => undefined); // awaited below
          await fs.mkdir(vmDir(vmId), { recursive: true, mode: 0o750 });
          // Assets: leased for the VM's lifetime, placed into its directory by assetmanagerd.
          // The lease ids are chosen and recorded before they are asked for, so a crash at any
          // point leaves none that recovery does not know of (abandonCreation releases them;
          // one never taken is simply not found).
          const wanted = [req.rootfsAssetId, req.kernelAssetId, req.initrdAssetId].filter(Boolean);
          rt.leases = wanted.map((assetId) => ({ assetId, leaseId: newId("lse") }));
          await store.update(vmId, { runtime_json: JSON.stringify({ tier: rt.tier, leases: rt.leases }) });
          const [placed, image] = await settleAll([
            deps.assets.prepare(tenant, wanted, `${vmId}/assets`, `metald:${vmId}`),
            deps.assets.imageConfig(tenant, req.rootfsAssetId),
            ...rt.leases.map((l) => deps.assets.acquire(tenant, l.assetId, `metald:${vmId}`, l.leaseId)),
          ] as const);
          const rootfs = placed[req.rootfsAssetId]!;
          let kernel: string | undefined;
          let initrd: string | undefined;
          if (VM_BACKENDS.has(backendName)) {
            const host = req.kernelAssetId ? undefined : await deps.hostKernel();
            kernel = req.kernelAssetId ? placed[req.kernelAssetId] : host!.kernel;
            initrd = req.initrdAssetId ? placed[req.initrdAssetId] : host?.initrd;
          }
          const workload: WorkloadConfig = {
            entrypoint: image?.entrypoint ?? [],
            cmd: image?.command ?? [],
            env: { ...(image?.env ?? {}), ...req.env },
            workingDir: image?.workingDir || "/",
            user: image?.user ?? "",
          };
          // Ports: the request's, else every port the image exposes; host ports from the pool.
          const portRequests =
            req.ports.length > 0
              ? req.ports
              : (image?.exposedPorts ?? []).map((p) => {
                  const [port, proto] = p.split("/");
                  return {
                    containerPort: Number(port),
                    hostPort: 0,
                    protocol: (proto === "udp" ? "udp" : "tcp") as "tcp" | "udp",
                  };
                });
          rt.ports = [];
          for (const p of portRequests) {
            const a = await deps.network.ports.allocate(vmId, p);
            rt.ports.push({ containerPort: a.containerPort, hostPort: a.hostPort, protocol: a.protocol });
          }
          const cgroup = deps.cgroups.get(tenant.tenantId, vmId);
          rt.spec = {
            vmId,
            tenantId: tenant.tenantId,
            vcpus,
            memoryBytes,
            dir: vmDir(vmId),
            rootfs,
            kernel,
            initrd,
            kernelArgs: req.kernelArgs,
            workload,
            hostname: vmId.replaceAll("_", "-"),
            network: {
              netnsPath: network.netnsPath,
              guestIp: network.guestIp,
              prefixLen: network.prefixLen,
              gateway: network.gateway,
              dns: network.dns,
              macAddress: network.macAddress,
              tapName: network.tapName,
            },
            ports: rt.ports.map((p) => ({
              guestPort: p.containerPort,
              hostPort: p.hostPort,
              protocol: p.protocol,
            })),
            cgroupParent: cgroup.relativePath,
            consoleLog: path.join(vmDir(vmId), "console.log"),
          };
          const handle = await backend.create(rt.spec);
          if (handle) rt.handle = handle;
          await settleAll([wiring, cgroupMade]);
          await store.update(vmId, { runtime_json: JSON.stringify(rt) });
          vlog.info({ rootfs_asset: req.rootfsAssetId, ports: rt.ports }, "VM created");
          return { ...row, runtime_json: JSON.stringify(rt) };
        } catch (err) {
          // Teardown must not race the namespace or cgroup still being made.
          await Promise.allSettled([wiring, cgroupMade]);
          vlog.warn({ err }, "VM creation failed; removing what was set up");
          await teardown(row, rt);
          await store.delete(vmId);
          throw err;
        }
      });
    },

    async bootVm(tenant: TenantContext, vmId: string): Promise<VmRow> {
      return locked(vmId, () =>
        measured("boot", async () => {
          const row = await owned(tenant, vmId);
          transition(vmId, row.state, "boot");
          const rt = createdRuntimeOf(row);
          const backend = deps.backends.get(row.backend as BackendName);
          const started = performance.now();
          await store.update(vmId, { runtime_json: JSON.stringify({ ...rt, booting: true }) });
          try {
            rt.handle = await backend.boot(rt.spec);
            await attachRunning(vmId, rt);
          } catch (err) {
            await detachRunning(vmId).catch(() => {});
            const reason = `boot failed: ${err instanceof Error ? err.message : String(err)}`;
            await store.update(vmId, {
              state: "failed",
              failure_reason: reason,
              runtime_json: JSON.stringify(rt),
            });
            throw err;
          }
          deps.metrics.boot(row.backend, (performance.now() - started) / 1000);
          const patch = {
            state: "running" as VmState,
            failure_reason: "",
            pid: rt.handle.pid,
            pid_start_time: rt.handle.pidStartTime,
            runtime_json: JSON.stringify(rt),
            booted_at: Date.now(),
          };
          await store.update(vmId, patch);
          deps.events?.started?.({ vmId, tenant });
          log.info({ vm_id: vmId, tenant_id: tenant.tenantId, pid: rt.handle.pid }, "VM booted");
          return { ...row, ...patch };
        }),
      );
    },

    async pauseVm(tenant: TenantContext, vmId: string): Promise<VmRow> {
      return this.simple(tenant, vmId, "pause", async (rt, b) => b.pause(rt.spec, rt.handle!));
    },

    async resumeVm(tenant: TenantContext, vmId: string): Promise<VmRow> {
      return this.simple(tenant, vmId, "resume", async (rt, b) => b.resume(rt.spec, rt.handle!));
    },

    async rebootVm(tenant: TenantContext, vmId: string): Promise<VmRow> {
      return this.simple(tenant, vmId, "reboot", async (rt, b) => {
        rt.handle = await b.reboot(rt.spec, rt.handle!);
      });
    },

    async shutdownVm(
      tenant: TenantContext,
      vmId: string,
      opts: { force: boolean; timeoutMs?: number },
    ): Promise<VmRow> {
      return this.simple(tenant, vmId, "shutdown", async (rt, b) => {
        await detachRunning(vmId);
        const { forced } = await b.shutdown(rt.spec, rt.handle!, {
          timeoutMs: opts.force ? 0 : (opts.timeoutMs ?? deps.settings.shutdownTimeoutMs),
        });
        deps.events?.stopped?.({ vmId, tenant, reason: forced ? "forced shutdown" : "shutdown" });
        rt.handle = undefined;
      });
    },

    /** A verb with no more to it than the state table and one backend call. */
    async simple(
      tenant: TenantContext,
      vmId: string,
      verb: "pause" | "resume" | "reboot" | "shutdown",
      act: (rt: VmRuntime, backend: Backend) => Promise<void>,
    ): Promise<VmRow> {
      return locked(vmId, () =>
        measured(verb, async () => {
          const row = await owned(tenant, vmId);
          const to = transition(vmId, row.state, verb) as VmState;
          const rt = createdRuntimeOf(row);
          await act(rt, deps.backends.get(row.backend as BackendName));
          const patch = {
            state: to,
            runtime_json: JSON.stringify(rt),
            pid: rt.handle?.pid ?? null,
            pid_start_time: rt.handle?.pidStartTime ?? null,
          };
          await store.update(vmId, patch);
          return { ...row, ...patch };
        }),
      );
    },

    /** Deletes a VM in any state; nothing of it remains (process, netns, cgroup, ports, address, leases, files). */
    async deleteVm(tenant: TenantContext, vmId: string): Promise<VmState> {
      return locked(vmId, () =>
        measured("delete", async () => {
          const row = await owned(tenant, vmId);
          const rt = partialRuntimeOf(row);
          if (row.state === "running" || row.state === "paused") {
            deps.events?.stopped?.({ vmId, tenant, reason: "deleted" });
          }
          const failures = await teardown(row, rt);
          if (failures.length > 0) {
            await store.update(vmId, {
              state: "failed",
              failure_reason: `delete incomplete: ${failures.join("; ")}`,
            });
            throw new InternalError(
              `VM ${vmId} was not fully deleted (${failures.join("; ")}); delete it again`,
            );
          }
          await store.delete(vmId);
          log.info({ vm_id: vmId, tenant_id: tenant.tenantId }, "VM deleted");
          return row.state;
        }),
      );
    },

    async getVm(
      tenant: TenantContext,
      vmId: string,
    ): Promise<{ row: VmRow; runtime?: VmRuntime; sample?: VmSample }> {
      const row = await owned(tenant, vmId);
      return {
        row,
        runtime: runtimeOf(row),
        sample: deps.sampler.latest(vmId),
      };
    },

    async listVms(
      tenant: TenantContext,
      opts: { states: VmState[]; deploymentId?: string; pageSize: number; pageToken: string },
    ): Promise<{ rows: VmRow[]; total: number; nextPageToken: string }> {
      const limit = opts.pageSize > 0 ? opts.pageSize : 50;
      const after = opts.pageToken ? Buffer.from(opts.pageToken, "base64url").toString("utf8") : undefined;
      if (after !== undefined && !/^vm_[a-z0-9]+$/.test(after)) {
        throw new InvalidArgumentError("page_token is not a token this server issued", {
          field: "page_token",
        });
      }
      const { rows, total } = await store.list(tenant.tenantId, { ...opts, limit: limit + 1, after });
      const page = rows.slice(0, limit);
      const next = rows.length > limit ? Buffer.from(page.at(-1)!.vm_id).toString("base64url") : "";
      return { rows: page, total, nextPageToken: next };
    },

    endpointHost: deps.settings.endpointHost,

    /** The VM's console log file (for StreamVmLogs), after the ownership check. */
    async consoleLog(
      tenant: TenantContext,
      vmId: string,
    ): Promise<{ file: string; state: () => Promise<VmState | undefined> }> {
      const row = await owned(tenant, vmId);
      const file = runtimeOf(row)?.spec.consoleLog ?? path.join(vmDir(vmId), "console.log");
      return { file, state: async () => (await store.get(tenant.tenantId, vmId))?.state };
    },

    /**
     * Start-up: make the router, then re-adopt VMs that still run (same pid and start time) and
     * mark the ones whose process vanished SHUTDOWN with the reason. Namespaces of stopped VMs are
     * repaired, so every VM can still boot.
     */
    async recover(): Promise<{ adopted: number; lost: number }> {
      await deps.network.router.ensure();
      let adopted = 0;
      let lost = 0;
      const rows = await store.all();
      for (const row of rows) {
        const rt = runtimeOf(row);
        if (!rt) {
          if (row.state !== "failed") await abandonCreation(row);
          continue;
        }
        const backend = deps.backends.get(row.backend as BackendName);
        const limits = await deps.limits(tenantOf(row));
        try {
          await deps.network.attacher.attach(
            { vmId: row.vm_id, egressAllowed: limits.egressAllowed },
            { mode: VM_BACKENDS.has(row.backend as BackendName) ? "tap" : "address" },
          );
          if (rt.booting && row.state !== "running" && row.state !== "paused") {
            // metald died inside BootVm: whatever the backend had started runs unaccounted.
            // Undo it; the VM keeps its state and can be booted again.
            await backend.delete(rt.spec, rt.handle);
            rt.handle = (await backend.create(rt.spec)) ?? undefined;
            rt.booting = undefined;
            await store.update(row.vm_id, { runtime_json: JSON.stringify(rt) });
            log.warn(
              { vm_id: row.vm_id, tenant_id: row.tenant_id, state: row.state },
              "a boot cut off by a metald restart was undone",
            );
            continue;
          }
          if (row.state !== "running" && row.state !== "paused") continue;
          const found = rt.handle ? await backend.adopt(rt.spec, rt.handle) : "gone";
          if (found === "gone") {
            lost++;
            await backend.delete(rt.spec, rt.handle);
            await backend.create(rt.spec);
            rt.handle = undefined;
            await store.update(row.vm_id, {
              state: "shutdown",
              pid: null,
              pid_start_time: null,
              runtime_json: JSON.stringify(rt),
              failure_reason: `the VM's process was gone when metald restarted (it was ${row.state.toUpperCase()})`,
            });
            log.warn(
              { vm_id: row.vm_id, tenant_id: row.tenant_id },
              "VM process gone after restart; marked SHUTDOWN",
            );
            continue;
          }
          adopted++;
          await attachRunning(row.vm_id, rt);
          deps.events?.adopted?.({ vmId: row.vm_id, tenant: tenantOf(row) });
          if (found !== row.state) await store.update(row.vm_id, { state: found });
          log.info(
            { vm_id: row.vm_id, tenant_id: row.tenant_id, state: found },
            "VM re-adopted after restart",
          );
        } catch (err) {
          log.error({ err, vm_id: row.vm_id }, "could not recover VM");
          await store.update(row.vm_id, {
            state: "failed",
            failure_reason: `recovery after restart failed: ${err instanceof Error ? err.message : String(err)}`,
          });
        }
      }
      await deps.network.attacher.start(rows.map((r) => r.vm_id));
      return { adopted, lost };
    },

    /** Stops forwarding and sampling; VMs keep running (a restarted metald re-adopts them). */
    async stop(): Promise<void> {
      deps.sampler.stop();
      await deps.network.forwarder.close();
      await deps.network.attacher.stop();
    },
  };
}

export type VmManager = ReturnType<typeof createVmManager>;
