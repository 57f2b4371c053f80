import { create, fromJsonString, toJsonString } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { metald } from "@kiln/api";
import { InvalidArgumentError } from "@kiln/kit";
import type { Isolation } from "./backends/backend.js";
import type { VmSample } from "./metering/sampler.js";
import { VM_STATES, type VmState } from "./vms/lifecycle.js";
import type { VmRequest, VmRuntime } from "./vms/manager.js";
import type { DeploymentRow, VmRow } from "./vms/store.js";

export const stateToProto = (s: VmState): metald.VmState => (VM_STATES.indexOf(s) + 1) as metald.VmState;
export function stateFromProto(s: metald.VmState): VmState {
  const v = VM_STATES[s - 1];
  if (!v) throw new InvalidArgumentError(`unknown VM state ${s}`, { field: "state_filter" });
  return v;
}

/** The request's VmConfig in domain terms. */
export function vmRequest(config: metald.VmConfig): VmRequest {
  const roots = config.storage.filter((d) => d.isRootDevice);
  if (roots.length > 1) {
    throw new InvalidArgumentError("at most one storage device may be the root device", {
      field: "config.storage",
    });
  }
  if (config.rootfsAssetId && roots.length > 0) {
    throw new InvalidArgumentError("set rootfs_asset_id or a root storage device, not both", {
      field: "config.rootfs_asset_id",
    });
  }
  if (config.storage.some((d) => !d.isRootDevice)) {
    throw new InvalidArgumentError("extra (non-root) storage devices are not supported yet", {
      field: "config.storage",
    });
  }
  return {
    vcpus: config.cpu?.vcpuCount ?? 0,
    memoryBytes: Number(config.memory?.sizeBytes ?? 0n),
    rootfsAssetId: config.rootfsAssetId || (roots[0]?.assetId ?? ""),
    kernelAssetId: config.boot?.kernelAssetId ?? "",
    initrdAssetId: config.boot?.initrdAssetId ?? "",
    kernelArgs: (config.boot?.kernelArgs ?? "").split(/\s+/).filter(Boolean),
    ports: config.ports.map((p) => ({
      containerPort: p.containerPort,
      hostPort: p.hostPort,
      protocol: p.protocol === "udp" ? "udp" : "tcp",
    })),
    env: { ...config.env },
    backend: config.backend,
    configJson: toJsonString(metald.VmConfigSchema, config),
  };
}

export function vmInfo(
  row: VmRow,
  rt: VmRuntime | undefined,
  sample: VmSample | undefined,
  host: string,
): metald.VmInfo {
  const ms = (v: number | null) => (v ? timestampFromMs(v) : undefined);
  return create(metald.VmInfoSchema, {
    vmId: row.vm_id,
    tenantId: row.tenant_id,
    state: stateToProto(row.state),
    config: fromJsonString(metald.VmConfigSchema, row.config_json),
    metrics: sample
      ? {
          sampledAt: timestampFromMs(sample.sampledAt),
          cpuTimeNanos: sample.cpuTimeNanos,
          memoryUsageBytes: BigInt(sample.memoryUsageBytes),
          memoryLimitBytes: BigInt(sample.memoryLimitBytes),
          diskReadBytes: BigInt(sample.diskReadBytes),
          diskWriteBytes: BigInt(sample.diskWriteBytes),
          networkRxBytes: BigInt(sample.networkRxBytes),
          networkTxBytes: BigInt(sample.networkTxBytes),
          pids: BigInt(sample.pids),
        }
      : undefined,
    backendInfo: {
      backend: row.backend,
      pid: row.pid ?? 0,
      socketPath: rt?.handle?.details.qmpSocket ?? rt?.handle?.details.apiSocket ?? "",
      details: { ...(rt?.handle?.details ?? {}) },
    },
    endpoint: endpoint(rt, host),
    failureReason: row.failure_reason,
    createdAt: timestampFromMs(row.created_at),
    updatedAt: timestampFromMs(row.updated_at),
    bootedAt: ms(row.booted_at),
    deploymentId: row.deployment_id ?? "",
  });
}

export function endpoint(rt: VmRuntime | undefined, host: string) {
  return {
    host,
    ipAddress: rt?.network?.guestIp ?? "",
    ports: (rt?.ports ?? []).map((p) => ({
      containerPort: p.containerPort,
      hostPort: p.hostPort,
      protocol: p.protocol,
    })),
  };
}

const ISOLATION: Record<Isolation, metald.IsolationLevel> = {
  "hardware-vm": metald.IsolationLevel.VIRTUAL_MACHINE,
  "software-vm": metald.IsolationLevel.VIRTUAL_MACHINE,
  sandbox: metald.IsolationLevel.SANDBOX,
  container: metald.IsolationLevel.CONTAINER,
};
export const isolationToProto = (i: Isolation) => ISOLATION[i];

const DEPLOYMENT_STATES: Record<string, metald.DeploymentState> = {
  pending: metald.DeploymentState.PENDING,
  active: metald.DeploymentState.ACTIVE,
  scaling: metald.DeploymentState.SCALING,
  failed: metald.DeploymentState.FAILED,
  deleting: metald.DeploymentState.DELETING,
};

export function deployment(row: DeploymentRow, vmIds: string[], ready: number): metald.Deployment {
  const template = JSON.parse(row.template_json) as VmRequest;
  return create(metald.DeploymentSchema, {
    deploymentId: row.deployment_id,
    tenantId: row.tenant_id,
    name: row.name,
    template: fromJsonString(metald.VmConfigSchema, template.configJson),
    replicas: row.replicas,
    readyReplicas: ready,
    vmIds,
    createdAt: timestampFromMs(row.created_at),
    updatedAt: timestampFromMs(row.updated_at),
    state: DEPLOYMENT_STATES[row.state] ?? metald.DeploymentState.UNSPECIFIED,
  });
}
