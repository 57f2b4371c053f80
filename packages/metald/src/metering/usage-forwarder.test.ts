import { Code, ConnectError, createRouterTransport, type ServiceImpl } from "@connectrpc/connect";
import { BillingService, type billaged } from "@kiln/api";
import { createLogger, HEADERS } from "@kiln/kit";
import { describe, expect, it } from "vitest";
import type { VmSample } from "./sampler.js";
import { createUsageForwarder } from "./usage-forwarder.js";

/**
 * billaged's RPCs are not implemented yet (a later issue), so the forwarder is tested against a
 * recording BillingService on an in-process transport: the boundary it talks to.
 */
function fakeBillaged() {
  const calls: Array<{ rpc: string; tenant: string | null; req: unknown }> = [];
  let failing = false;
  const record = (rpc: string) => async (req: unknown, ctx: { requestHeader: Headers }) => {
    if (failing) throw new ConnectError("billaged is down", Code.Unavailable);
    calls.push({ rpc, tenant: ctx.requestHeader.get(HEADERS.tenantId), req });
    return { success: true };
  };
  const impl = {
    sendMetricsBatch: record("batch"),
    sendHeartbeat: record("heartbeat"),
    notifyVmStarted: record("started"),
    notifyVmStopped: record("stopped"),
    notifyPossibleGap: record("gap"),
  } as unknown as ServiceImpl<typeof BillingService>;
  return {
    calls,
    setFailing: (f: boolean) => (failing = f),
    transport: createRouterTransport((r) => r.service(BillingService, impl)),
  };
}

const sample = (vmId: string, t: number, cpu: number): VmSample => ({
  vmId,
  seq: t,
  sampledAt: t,
  cpuTimeNanos: BigInt(cpu),
  memoryUsageBytes: 1,
  memoryPeakBytes: 1,
  memoryLimitBytes: 2,
  diskReadBytes: 0,
  diskWriteBytes: 0,
  networkRxBytes: 0,
  networkTxBytes: 0,
  pids: 1,
  extra: {},
});

const log = createLogger({ service: "metald", level: "silent" });
const acme = { tenantId: "acme", tier: "pro" as const };

describe("usage forwarder", () => {
  it("notifies starts and stops for the VM's tenant and sends samples in batches keyed by their first timestamp", async () => {
    const b = fakeBillaged();
    const f = createUsageForwarder({ transport: b.transport, instanceId: "host-1", log });
    f.started({ vmId: "vm_1", tenant: acme });
    for (let t = 1000; t < 1500; t += 100) f.sample(sample("vm_1", t, t));
    f.sample(sample("vm_unknown", 1000, 1)); // not started here: ignored
    await f.flush();
    for (let t = 1500; t < 1700; t += 100) f.sample(sample("vm_1", t, t));
    await f.stopped({ vmId: "vm_1", reason: "shutdown" });
    expect(b.calls.map((c) => [c.rpc, c.tenant])).toEqual([
      ["started", "acme"],
      ["batch", "acme"],
      ["batch", "acme"],
      ["stopped", "acme"],
    ]);
    const batches = b.calls
      .filter((c) => c.rpc === "batch")
      .map((c) => c.req as billaged.SendMetricsBatchRequest);
    expect(batches.map((r) => [Number(r.sequence), r.metrics.length])).toEqual([
      [1000, 5],
      [1500, 2],
    ]);
    expect(batches[0]!.metrics[4]!.cpuTimeNanos).toBe(1400n);
  });

  it("keeps samples while billaged is down and re-sends them with the same sequence", async () => {
    const b = fakeBillaged();
    const f = createUsageForwarder({ transport: b.transport, instanceId: "host-1", log });
    f.started({ vmId: "vm_2", tenant: acme });
    b.setFailing(true);
    f.sample(sample("vm_2", 2000, 1));
    await f.flush();
    f.sample(sample("vm_2", 2100, 2));
    b.setFailing(false);
    await f.flush();
    const batches = b.calls
      .filter((c) => c.rpc === "batch")
      .map((c) => c.req as billaged.SendMetricsBatchRequest);
    expect(batches.map((r) => [Number(r.sequence), r.metrics.length])).toEqual([[2000, 2]]);
  });

  it("drops the oldest samples past its bound and tells billaged about the gap first", async () => {
    const b = fakeBillaged();
    const f = createUsageForwarder({ transport: b.transport, instanceId: "host-1", maxBuffered: 3, log });
    f.started({ vmId: "vm_3", tenant: acme });
    await f.flush();
    b.setFailing(true);
    for (let t = 3000; t < 3600; t += 100) f.sample(sample("vm_3", t, t));
    await f.flush();
    b.setFailing(false);
    await f.flush();
    const after = b.calls.filter((c) => c.rpc !== "started");
    expect(after.map((c) => c.rpc)).toEqual(["gap", "batch"]);
    expect(Number((after[1]!.req as billaged.SendMetricsBatchRequest).sequence)).toBe(3300);
  });

  it("sends heartbeats naming the VMs it tracks", async () => {
    const b = fakeBillaged();
    const f = createUsageForwarder({
      transport: b.transport,
      instanceId: "host-1",
      heartbeatIntervalMs: 20,
      log,
    });
    f.adopted({ vmId: "vm_4", tenant: acme });
    f.start();
    await new Promise((r) => setTimeout(r, 70));
    await f.stop();
    const hb = b.calls.find((c) => c.rpc === "heartbeat")?.req as billaged.SendHeartbeatRequest;
    expect(hb).toMatchObject({ instanceId: "host-1", activeVms: ["vm_4"] });
    expect(b.calls.some((c) => c.rpc === "started")).toBe(false);
  });
});
