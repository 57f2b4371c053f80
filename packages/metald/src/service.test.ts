/**
 * metald end to end on the runc backend (fast enough for the unit project): builderd builds the
 * busybox-httpd image, assetmanagerd registers it, metald creates, boots and drives the VM, and
 * the workload answers through its forwarded host port. The QEMU and gVisor runs of the same flow
 * are in test/e2e/vm-lifecycle.test.ts.
 */
import fs from "node:fs";
import path from "node:path";
import {
  Code,
  ConnectError,
  createClient,
  createRouterTransport,
  type ServiceImpl,
} from "@connectrpc/connect";
import {
  AssetManagerService,
  metald as api,
  BillingService,
  BuilderService,
  type billaged,
  VmService,
} from "@kiln/api";
import { newId, openDatabase } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { HTTPD_INDEX, pushBusyboxHttpd } from "../../builderd/src/testing/images.js";
import { startTestRegistry } from "../../builderd/src/testing/registry.js";
import type { VmSpec } from "./backends/backend.js";
import { isAlive } from "./backends/process.js";
import { createRuncBackend } from "./backends/runc.js";
import { ip } from "./network/command.js";
import { get, headers, leaks, startPlatform, until } from "./testing/platform.js";
import { createVmStore, type MetaldDb } from "./vms/store.js";

const S = api.VmState;

describe("metald on runc", () => {
  const work = tempDir("kiln-metald-");
  let registry: Awaited<ReturnType<typeof startTestRegistry>>;
  let p: Awaited<ReturnType<typeof startPlatform>>;
  let vms: ReturnType<typeof createClient<typeof VmService>>;
  let rootfsAssetId: string;

  beforeAll(async () => {
    registry = await startTestRegistry();
    const image = await pushBusyboxHttpd(work.path, registry.host);
    p = await startPlatform(path.join(work.path, "data"), registry.host);
    const builds = createClient(BuilderService, p.builder.service.transport);
    const { buildId } = await builds.createBuild(
      { config: { source: { sourceType: { case: "dockerImage", value: { imageUri: image } } } } },
      headers("acme"),
    );
    for await (const _ of builds.streamBuildLogs({ buildId, follow: true }, headers("acme"))) {
    }
    const { build } = await builds.getBuild({ buildId }, headers("acme"));
    expect(build?.errorMessage).toBe("");
    rootfsAssetId = build!.assetId;
    vms = createClient(VmService, p.metald.service.transport);
  }, 120_000);

  afterAll(async () => {
    // VMs outlive metald by design: delete what a failed test left before stopping it.
    for (const tenant of ["acme", "intruder"]) {
      for (const vm of (await vms?.listVms({}, headers(tenant)).catch(() => undefined))?.vms ?? []) {
        await vms.deleteVm({ vmId: vm.vmId }, headers(tenant)).catch(() => {});
      }
    }
    await p?.metald.stop();
    await p?.builder.stop();
    await p?.assets.stop();
    await registry?.stop();
    work.remove();
  });

  it("lists the backends that work here, with reasons for the others", async () => {
    const res = await vms.listBackends({}, headers("acme"));
    const runc = res.backends.find((b) => b.name === "runc");
    expect(runc?.available).toBe(true);
    const fc = res.backends.find((b) => b.name === "firecracker");
    expect(fc?.available).toBe(false);
    expect(fc?.reason).not.toBe("");
    expect(res.autoBackend).not.toBe("");
  });

  it("runs the image: create, boot, serve, pause, resume, reboot, shutdown, boot, delete — leaving nothing", async () => {
    const created = await vms.createVm(
      { config: { rootfsAssetId, backend: "runc", env: { GREETING: "from metald" } } },
      headers("acme"),
    );
    expect(created.state).toBe(S.CREATED);
    const port = created.endpoint?.ports.find((x) => x.containerPort === 8080)?.hostPort;
    expect(port).toBeGreaterThan(0);
    const vmId = created.vmId;
    const url = `http://127.0.0.1:${port}`;

    // Illegal transitions are refused before any backend call, naming the state.
    const early = await vms.pauseVm({ vmId }, headers("acme")).catch((e) => ConnectError.from(e));
    expect((early as ConnectError).code).toBe(Code.FailedPrecondition);
    expect((early as ConnectError).rawMessage).toMatch(/it is CREATED/);

    expect((await vms.bootVm({ vmId }, headers("acme"))).state).toBe(S.RUNNING);
    expect(await until(() => get(`${url}/`))).toBe(HTTPD_INDEX);
    expect((await get(`${url}/cgi-bin/whoami`))?.trim()).toBe(
      `uid=1000 gid=1000 host=${vmId.replaceAll("_", "-")} greeting=from metald`,
    );

    // Live metrics from the 100 ms sampler.
    const info = await until(async () => {
      const { vm } = await vms.getVmInfo({ vmId }, headers("acme"));
      return vm?.metrics && vm.metrics.cpuTimeNanos > 0n ? vm : undefined;
    });
    expect(info.state).toBe(S.RUNNING);
    expect(info.metrics!.memoryUsageBytes).toBeGreaterThan(0n);
    expect(info.endpoint?.ipAddress).toMatch(/^10\.214\./);
    expect(info.backendInfo?.pid).toBeGreaterThan(0);

    expect((await vms.pauseVm({ vmId }, headers("acme"))).state).toBe(S.PAUSED);
    expect(await get(`${url}/`, 1_000)).toBeUndefined();
    expect((await vms.resumeVm({ vmId }, headers("acme"))).state).toBe(S.RUNNING);
    expect(await until(() => get(`${url}/`))).toBe(HTTPD_INDEX);

    expect((await vms.rebootVm({ vmId }, headers("acme"))).state).toBe(S.RUNNING);
    expect(await until(() => get(`${url}/`))).toBe(HTTPD_INDEX);

    const logs: string[] = [];
    for await (const m of vms.streamVmLogs({ vmId, follow: false }, headers("acme"))) logs.push(m.line);
    expect(logs.join("\n")).toMatch(/response:200/);

    expect((await vms.shutdownVm({ vmId }, headers("acme"))).state).toBe(S.SHUTDOWN);
    expect(await get(`${url}/`, 1_000)).toBeUndefined();
    expect((await vms.bootVm({ vmId }, headers("acme"))).state).toBe(S.RUNNING);
    expect(await until(() => get(`${url}/`))).toBe(HTTPD_INDEX);

    const before = leaks(vmId);
    expect(before.length).toBeGreaterThan(0);
    await vms.deleteVm({ vmId }, headers("acme"));
    expect(leaks(vmId)).toEqual([]);
    expect(fs.existsSync(path.join(work.path, "data", "vms", vmId))).toBe(false);
    const gone = await vms.getVmInfo({ vmId }, headers("acme")).catch((e) => ConnectError.from(e));
    expect((gone as ConnectError).code).toBe(Code.NotFound);
  });

  it("keeps tenants apart: another tenant's VM is not found", async () => {
    const { vmId } = await vms.createVm({ config: { rootfsAssetId, backend: "runc" } }, headers("acme"));
    try {
      for (const call of [
        () => vms.getVmInfo({ vmId }, headers("intruder")),
        () => vms.bootVm({ vmId }, headers("intruder")),
        () => vms.deleteVm({ vmId }, headers("intruder")),
      ]) {
        expect(((await call().catch((e) => ConnectError.from(e))) as ConnectError).code).toBe(Code.NotFound);
      }
      expect((await vms.listVms({}, headers("intruder"))).totalCount).toBe(0);
      // Another tenant cannot use acme's rootfs asset either.
      const err = await vms
        .createVm({ config: { rootfsAssetId, backend: "runc" } }, headers("intruder"))
        .catch((e) => ConnectError.from(e));
      expect((err as ConnectError).code).toBe(Code.NotFound);
    } finally {
      await vms.deleteVm({ vmId }, headers("acme"));
    }
  });

  it("enforces the tier's VM limits", async () => {
    const big = await vms
      .createVm(
        { config: { rootfsAssetId, backend: "runc", cpu: { vcpuCount: 8 } } },
        headers("acme", "free"),
      )
      .catch((e) => ConnectError.from(e));
    expect((big as ConnectError).code).toBe(Code.InvalidArgument);
    expect((big as ConnectError).rawMessage).toMatch(/vcpu count 8 exceeds the tenant's limit of 1/);
  });

  it("re-adopts a running VM after metald restarts, and marks one whose process died SHUTDOWN", async () => {
    const a = await vms.createVm({ config: { rootfsAssetId, backend: "runc" } }, headers("acme"));
    const b = await vms.createVm({ config: { rootfsAssetId, backend: "runc" } }, headers("acme"));
    await vms.bootVm({ vmId: a.vmId }, headers("acme"));
    await vms.bootVm({ vmId: b.vmId }, headers("acme"));
    const portA = a.endpoint!.ports[0]!.hostPort;
    await until(() => get(`http://127.0.0.1:${portA}/`));
    const pidB = (await vms.getVmInfo({ vmId: b.vmId }, headers("acme"))).vm!.backendInfo!.pid;

    await p.metald.stop(); // VMs keep running without metald
    process.kill(pidB, "SIGKILL");
    p.metald = await p.startMetald();
    vms = createClient(VmService, p.metald.service.transport);

    const infoA = (await vms.getVmInfo({ vmId: a.vmId }, headers("acme"))).vm!;
    expect(infoA.state).toBe(S.RUNNING);
    expect(await until(() => get(`http://127.0.0.1:${portA}/`))).toBe(HTTPD_INDEX);
    const infoB = (await vms.getVmInfo({ vmId: b.vmId }, headers("acme"))).vm!;
    expect(infoB.state).toBe(S.SHUTDOWN);
    expect(infoB.failureReason).toMatch(/process was gone when metald restarted/);
    // …and it can boot again.
    expect((await vms.bootVm({ vmId: b.vmId }, headers("acme"))).state).toBe(S.RUNNING);

    await vms.deleteVm({ vmId: a.vmId }, headers("acme"));
    await vms.deleteVm({ vmId: b.vmId }, headers("acme"));
    expect(leaks(a.vmId)).toEqual([]);
    expect(leaks(b.vmId)).toEqual([]);
  });

  it("gives new VMs namespaces made ahead of time, and removes the unused ones when it stops", async () => {
    // VM namespaces are wired to the test router by their kv-<short id> interface.
    const wired = async () =>
      (JSON.parse(await ip("kiln-test", ["-j", "link", "show"])) as Array<{ ifname: string }>)
        .map((l) => l.ifname)
        .filter((n) => n.startsWith("kv-"));
    const ready = await until(async () => {
      const links = await wired();
      return links.length >= 4 ? links : undefined; // UNKEY_METALD_NETNS_POOL_SIZE's default
    });
    const { vmId } = await vms.createVm({ config: { rootfsAssetId, backend: "runc" } }, headers("acme"));
    expect(ready).toContain(`kv-${vmId.slice(-12)}`);
    await p.metald.stop();
    expect(await wired()).toEqual([`kv-${vmId.slice(-12)}`]);
    p.metald = await p.startMetald();
    vms = createClient(VmService, p.metald.service.transport);
    await vms.deleteVm({ vmId }, headers("acme"));
    expect(leaks(vmId)).toEqual([]);
  });

  it("undoes a boot cut off by a metald crash: nothing runs unaccounted, and the VM boots again", async () => {
    const c = await vms.createVm({ config: { rootfsAssetId, backend: "runc" } }, headers("acme"));
    await p.metald.stop();
    // What a metald killed inside BootVm leaves: the row still CREATED with its boot marker,
    // the container started by the runtime.
    const db = openDatabase<MetaldDb>({
      url: "",
      defaultSqlitePath: path.join(work.path, "data", "db", "metald.sqlite"),
    });
    const store = createVmStore(db.db);
    const rt = JSON.parse((await store.get("acme", c.vmId))!.runtime_json) as { spec: VmSpec };
    await store.update(c.vmId, { runtime_json: JSON.stringify({ ...rt, booting: true }) });
    await db.close();
    const orphan = await createRuncBackend().boot(rt.spec);
    const url = `http://127.0.0.1:${c.endpoint!.ports[0]!.hostPort}/`;
    expect(await isAlive({ pid: orphan.pid, startTime: orphan.pidStartTime })).toBe(true);

    p.metald = await p.startMetald();
    vms = createClient(VmService, p.metald.service.transport);
    expect(await isAlive({ pid: orphan.pid, startTime: orphan.pidStartTime })).toBe(false);
    expect((await vms.getVmInfo({ vmId: c.vmId }, headers("acme"))).vm!.state).toBe(S.CREATED);
    expect((await vms.bootVm({ vmId: c.vmId }, headers("acme"))).state).toBe(S.RUNNING);
    expect(await until(() => get(url))).toBe(HTTPD_INDEX);
    await vms.deleteVm({ vmId: c.vmId }, headers("acme"));
    expect(leaks(c.vmId)).toEqual([]);
  });

  it("records every lease before asking assetmanagerd for it, so a crash cannot lose one", async () => {
    await p.metald.stop();
    const dbPath = path.join(work.path, "data", "db", "metald.sqlite");
    const asked: Array<{ leaseId: string; recorded: boolean }> = [];
    p.metald = await p.startMetald({
      assets: (t) => ({
        ...t,
        async unary(method, signal, timeoutMs, header, input, contextValues) {
          if (method.name === "AcquireAsset") {
            const req = input as { holder: string; leaseId: string };
            const db = openDatabase<MetaldDb>({ url: "", defaultSqlitePath: dbPath });
            try {
              const row = await createVmStore(db.db).get("acme", req.holder.replace(/^metald:/, ""));
              asked.push({
                leaseId: req.leaseId,
                recorded: row?.runtime_json.includes(req.leaseId) ?? false,
              });
            } finally {
              await db.close();
            }
          }
          return t.unary(method, signal, timeoutMs, header, input, contextValues);
        },
      }),
    });
    vms = createClient(VmService, p.metald.service.transport);
    const { vmId } = await vms.createVm({ config: { rootfsAssetId, backend: "runc" } }, headers("acme"));
    try {
      expect(asked).toEqual([{ leaseId: expect.stringMatching(/^lse_/), recorded: true }]);
    } finally {
      await vms.deleteVm({ vmId }, headers("acme"));
    }
  });

  it("undoes a creation cut off by a metald crash: nothing leaks, leases are released, the VM is FAILED", async () => {
    await p.metald.stop();
    // What a metald killed inside CreateVm leaves: the row without a runtime, the lease ids it
    // recorded before asking for them (one taken, one it never got to ask for), and part of the
    // VM's namespace, cgroup and directory.
    const vmId = newId("vm");
    const assets = createClient(AssetManagerService, p.assets.service.transport);
    const refs = async () =>
      (await assets.getAsset({ id: rootfsAssetId }, headers("acme"))).asset!.referenceCount;
    const before = await refs();
    const leaseId = newId("lse");
    await assets.acquireAsset({ assetId: rootfsAssetId, holder: `metald:${vmId}`, leaseId }, headers("acme"));
    const neverTaken = { assetId: rootfsAssetId, leaseId: newId("lse") };
    const db = openDatabase<MetaldDb>({
      url: "",
      defaultSqlitePath: path.join(work.path, "data", "db", "metald.sqlite"),
    });
    await createVmStore(db.db).insert({
      vm_id: vmId,
      tenant_id: "acme",
      state: "created",
      backend: "runc",
      config_json: "{}",
      deployment_id: null,
      failure_reason: "",
      pid: null,
      pid_start_time: null,
      runtime_json: JSON.stringify({
        tier: "pro",
        leases: [{ assetId: rootfsAssetId, leaseId }, neverTaken],
      }),
      created_at: Date.now(),
      updated_at: Date.now(),
      booted_at: null,
    });
    await db.close();
    await ip(undefined, ["netns", "add", `kiln-${vmId.slice(-12)}`]);
    fs.mkdirSync(`/sys/fs/cgroup/memory/kiln/acme/${vmId}`, { recursive: true });
    fs.mkdirSync(path.join(work.path, "data", "vms", vmId, "assets"), { recursive: true });
    expect(leaks(vmId)).toHaveLength(2);
    expect(await refs()).toBe(before + 1);

    p.metald = await p.startMetald();
    vms = createClient(VmService, p.metald.service.transport);
    const vm = (await vms.getVmInfo({ vmId }, headers("acme"))).vm!;
    expect(vm.state).toBe(S.FAILED);
    expect(vm.failureReason).toMatch(/creation was cut off by a metald restart/);
    expect(vm.failureReason).not.toMatch(/cleaning up failed/);
    expect(leaks(vmId)).toEqual([]);
    expect(await refs()).toBe(before);
    expect(fs.existsSync(path.join(work.path, "data", "vms", vmId))).toBe(false);
    const boot = await vms.bootVm({ vmId }, headers("acme")).catch((e) => ConnectError.from(e));
    expect((boot as ConnectError).code).toBe(Code.FailedPrecondition);
    await vms.deleteVm({ vmId }, headers("acme"));
    expect((await vms.listVms({}, headers("acme"))).vms.map((v) => v.vmId)).not.toContain(vmId);
  });

  it("hands starts, 100 ms usage samples in batches, and stops to billaged", async () => {
    // billaged's RPCs are a later issue: a recording BillingService stands in for it.
    const seen: Array<{ rpc: string; tenant: string | null; req: unknown }> = [];
    const record = (rpc: string) => async (req: unknown, ctx: { requestHeader: Headers }) => {
      seen.push({ rpc, tenant: ctx.requestHeader.get("x-kiln-tenant-id"), req });
      return { success: true };
    };
    const billaged = createRouterTransport((r) =>
      r.service(BillingService, {
        sendMetricsBatch: record("batch"),
        sendHeartbeat: record("heartbeat"),
        notifyVmStarted: record("started"),
        notifyVmStopped: record("stopped"),
        notifyPossibleGap: record("gap"),
      } as unknown as ServiceImpl<typeof BillingService>),
    );
    await p.metald.stop();
    p.metald = await p.startMetald({ billaged });
    vms = createClient(VmService, p.metald.service.transport);
    const { vmId } = await vms.createVm({ config: { rootfsAssetId, backend: "runc" } }, headers("acme"));
    await vms.bootVm({ vmId }, headers("acme"));
    const sent = () =>
      seen
        .filter((c) => c.rpc === "batch")
        .reduce((n, c) => n + (c.req as billaged.SendMetricsBatchRequest).metrics.length, 0);
    // Wait for a few batches' worth: at 100 ms sampling and 300 ms batches, ~1.5 s.
    await until(
      async () => (sent() >= 12 && seen.filter((c) => c.rpc === "batch").length >= 2 ? true : undefined),
      15_000,
    );
    await vms.shutdownVm({ vmId }, headers("acme"));
    await vms.deleteVm({ vmId }, headers("acme"));
    const mine = seen.filter((c) => c.rpc !== "heartbeat");
    expect(mine[0]).toMatchObject({ rpc: "started", tenant: "acme" });
    expect(mine.at(-1)).toMatchObject({ rpc: "stopped", tenant: "acme" });
    const batches = mine
      .filter((c) => c.rpc === "batch")
      .map((c) => c.req as billaged.SendMetricsBatchRequest);
    const samples = batches.flatMap((b) => b.metrics);
    expect(samples.length).toBeGreaterThanOrEqual(12);
    // Cumulative CPU never goes back; sequences (first sample's time) strictly increase.
    for (let i = 1; i < samples.length; i++)
      expect(samples[i]!.cpuTimeNanos >= samples[i - 1]!.cpuTimeNanos).toBe(true);
    for (let i = 1; i < batches.length; i++)
      expect(batches[i]!.sequence > batches[i - 1]!.sequence).toBe(true);
  });

  it("runs deployments: N replicas, scaled up and down, deleted with their VMs", async () => {
    const { deployment } = await vms.createDeployment(
      { name: "web", replicas: 2, template: { rootfsAssetId, backend: "runc" } },
      headers("acme"),
    );
    expect(deployment?.vmIds).toHaveLength(2);
    expect(deployment?.readyReplicas).toBe(2);
    const up = await vms.updateDeployment(
      { deploymentId: deployment!.deploymentId, replicas: 3 },
      headers("acme"),
    );
    expect(up.deployment?.vmIds).toHaveLength(3);
    const down = await vms.updateDeployment(
      { deploymentId: deployment!.deploymentId, replicas: 1 },
      headers("acme"),
    );
    expect(down.deployment?.vmIds).toEqual([deployment!.vmIds[0]]);
    await vms.deleteDeployment({ deploymentId: deployment!.deploymentId }, headers("acme"));
    expect((await vms.listVms({}, headers("acme"))).totalCount).toBe(0);
  });
});
