import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { Transport } from "@connectrpc/connect";
import { billaged, common, createBillagedClient } from "@kiln/api";
import { forTenant, type Logger, type TenantContext, type Tier } from "@kiln/kit";
import type { VmSample } from "./sampler.js";

/**
 * Hands a host's usage to billaged: NotifyVmStarted/Stopped, the 100 ms samples batched per VM
 * (SendMetricsBatch), and a heartbeat naming the running VMs.
 *
 * A batch's `sequence` is the timestamp (ms) of its first sample: monotonic per VM, and the same
 * when a batch is re-sent after a failure or a metald restart, so billaged can drop duplicates by
 * (vm, sequence). Samples wait in memory while billaged is unreachable, up to `maxBuffered` per VM
 * (600 = one minute); older ones are dropped then, and the next successful send is preceded by
 * NotifyPossibleGap so billing knows the counters jumped.
 */
export interface UsageForwarder {
  started(vm: { vmId: string; tenant: TenantContext; labels?: Record<string, string> }): void;
  /** Re-registers a VM adopted after a restart (no started notice: it never stopped). */
  adopted(vm: { vmId: string; tenant: TenantContext }): void;
  sample(s: VmSample): void;
  stopped(vm: { vmId: string; reason: string }): Promise<void>;
  /** Sends what is buffered now (also on a timer). */
  flush(): Promise<void>;
  start(): void;
  stop(): Promise<void>;
}

export interface UsageForwarderDeps {
  transport: Transport;
  /** This metald's id in heartbeats (host name by default). */
  instanceId: string;
  batchIntervalMs?: number;
  heartbeatIntervalMs?: number;
  maxBuffered?: number;
  log: Logger;
}

const TIERS: Record<Tier, common.TenantTier> = {
  free: common.TenantTier.FREE,
  pro: common.TenantTier.PRO,
  enterprise: common.TenantTier.ENTERPRISE,
  dedicated: common.TenantTier.DEDICATED,
};

interface Tracked {
  tenant: TenantContext;
  buffer: VmSample[];
  /** Time of the last sample billaged accepted, and of the first dropped one since. */
  lastSentAt?: number;
  droppedFrom?: number;
  /** Sends for one VM run one after another (timer flushes and a stop may overlap). */
  chain: Promise<void>;
}

export function createUsageForwarder(deps: UsageForwarderDeps): UsageForwarder {
  const client = createBillagedClient(deps.transport);
  const maxBuffered = deps.maxBuffered ?? 600;
  const vms = new Map<string, Tracked>();
  let timers: NodeJS.Timeout[] = [];
  let flushing: Promise<void> | undefined;

  /** Sends the VM's buffer after whatever send of it is under way. */
  function send(vmId: string, t: Tracked): Promise<void> {
    const next = t.chain.then(() => sendNow(vmId, t));
    t.chain = next.catch(() => {});
    return next;
  }

  async function sendNow(vmId: string, t: Tracked): Promise<void> {
    while (t.buffer.length > 0) {
      if (t.droppedFrom !== undefined) {
        await client.notifyPossibleGap(
          {
            vmId,
            lastSent: timestampFromMs(t.lastSentAt ?? t.droppedFrom),
            resumeTime: timestampFromMs(t.buffer[0]!.sampledAt),
          },
          forTenant(t.tenant),
        );
        t.droppedFrom = undefined;
      }
      const batch = t.buffer.slice(0, 6000);
      await client.sendMetricsBatch(
        {
          vmId,
          sequence: BigInt(batch[0]!.sampledAt),
          metrics: batch.map((s) =>
            create(billaged.VMUsageSampleSchema, {
              timestamp: timestampFromMs(s.sampledAt),
              cpuTimeNanos: s.cpuTimeNanos,
              memoryUsageBytes: BigInt(s.memoryUsageBytes),
              diskReadBytes: BigInt(s.diskReadBytes),
              diskWriteBytes: BigInt(s.diskWriteBytes),
              networkRxBytes: BigInt(s.networkRxBytes),
              networkTxBytes: BigInt(s.networkTxBytes),
            }),
          ),
        },
        forTenant(t.tenant),
      );
      t.lastSentAt = batch.at(-1)!.sampledAt;
      t.buffer.splice(0, batch.length);
    }
  }

  async function flush(): Promise<void> {
    flushing ??= (async () => {
      for (const [vmId, t] of vms) {
        try {
          await send(vmId, t);
        } catch (err) {
          deps.log.warn(
            { err, vm_id: vmId, buffered: t.buffer.length },
            "billaged did not take usage; keeping it",
          );
        }
      }
    })().finally(() => {
      flushing = undefined;
    });
    return flushing;
  }

  async function heartbeat(): Promise<void> {
    try {
      await client.sendHeartbeat({ instanceId: deps.instanceId, activeVms: [...vms.keys()] });
    } catch (err) {
      deps.log.warn({ err }, "billaged heartbeat failed");
    }
  }

  const track = (vmId: string, tenant: TenantContext) => {
    if (!vms.has(vmId)) vms.set(vmId, { tenant, buffer: [], chain: Promise.resolve() });
  };

  return {
    started({ vmId, tenant, labels }) {
      track(vmId, tenant);
      client
        .notifyVmStarted(
          { vmId, startTime: timestampFromMs(Date.now()), tier: TIERS[tenant.tier], labels: labels ?? {} },
          forTenant(tenant),
        )
        .catch((err) => deps.log.warn({ err, vm_id: vmId }, "billaged did not take the VM start"));
    },
    adopted({ vmId, tenant }) {
      track(vmId, tenant);
    },
    sample(s) {
      const t = vms.get(s.vmId);
      if (!t) return;
      t.buffer.push(s);
      if (t.buffer.length > maxBuffered) {
        const dropped = t.buffer.splice(0, t.buffer.length - maxBuffered);
        t.droppedFrom ??= dropped[0]!.sampledAt;
      }
    },
    async stopped({ vmId, reason }) {
      const t = vms.get(vmId);
      if (!t) return;
      try {
        await send(vmId, t);
        await client.notifyVmStopped(
          { vmId, stopTime: timestampFromMs(Date.now()), reason },
          forTenant(t.tenant),
        );
      } catch (err) {
        deps.log.warn({ err, vm_id: vmId }, "billaged did not take the VM stop; its last samples are lost");
      } finally {
        vms.delete(vmId);
      }
    },
    flush,
    start() {
      timers = [
        setInterval(() => void flush(), deps.batchIntervalMs ?? 1_000),
        setInterval(() => void heartbeat(), deps.heartbeatIntervalMs ?? 10_000),
      ];
      for (const t of timers) t.unref();
    },
    async stop() {
      for (const t of timers) clearInterval(t);
      timers = [];
      await flush();
    },
  };
}
