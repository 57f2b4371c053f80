/**
 * metald end to end on the isolating backends: the busybox-httpd image built by builderd and
 * registered by assetmanagerd runs as a QEMU microvm (TCG here; KVM where /dev/kvm works) and as
 * a gVisor sandbox, answers through its forwarded host port, pauses, resumes, shuts down and is
 * deleted without leftovers. (runc runs the same flow in src/service.test.ts.)
 */
import path from "node:path";
import { createClient } from "@connectrpc/connect";
import { metald as api, BuilderService, VmService } from "@kiln/api";
import { tempDir } from "@kiln/kit/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { HTTPD_INDEX, pushBusyboxHttpd } from "../../../builderd/src/testing/images.js";
import { startTestRegistry } from "../../../builderd/src/testing/registry.js";
import { get, headers, leaks, startPlatform, until } from "../../src/testing/platform.js";

const S = api.VmState;

describe.each(["qemu", "gvisor"])("metald on %s", (backend) => {
  const work = tempDir(`kiln-metald-${backend}-`);
  let registry: Awaited<ReturnType<typeof startTestRegistry>>;
  let p: Awaited<ReturnType<typeof startPlatform>>;
  let vms: ReturnType<typeof createClient<typeof VmService>>;
  let rootfsAssetId: string;

  beforeAll(async () => {
    registry = await startTestRegistry();
    const image = await pushBusyboxHttpd(work.path, registry.host);
    p = await startPlatform(path.join(work.path, "data"), registry.host, backend);
    const builds = createClient(BuilderService, p.builder.service.transport);
    const { buildId } = await builds.createBuild(
      { config: { source: { sourceType: { case: "dockerImage", value: { imageUri: image } } } } },
      headers("acme"),
    );
    for await (const _ of builds.streamBuildLogs({ buildId, follow: true }, headers("acme"))) {
    }
    rootfsAssetId = (await builds.getBuild({ buildId }, headers("acme"))).build!.assetId;
    vms = createClient(VmService, p.metald.service.transport);
  });

  afterAll(async () => {
    for (const vm of (await vms?.listVms({}, headers("acme")).catch(() => undefined))?.vms ?? []) {
      await vms.deleteVm({ vmId: vm.vmId }, headers("acme")).catch(() => {});
    }
    await p?.metald.stop();
    await p?.builder.stop();
    await p?.assets.stop();
    await registry?.stop();
    work.remove();
  });

  it("boots the image, serves it, pauses, resumes, shuts down and is deleted without leftovers", async () => {
    const started = performance.now();
    const created = await vms.createVm(
      { config: { rootfsAssetId, backend, memory: { sizeBytes: 256n << 20n } } },
      headers("acme"),
    );
    await vms.bootVm({ vmId: created.vmId }, headers("acme"));
    const url = `http://127.0.0.1:${created.endpoint!.ports[0]!.hostPort}`;
    expect(await until(() => get(`${url}/`), 90_000)).toBe(HTTPD_INDEX);
    console.log(
      `[metald e2e] ${backend}: create → first HTTP response ${Math.round(performance.now() - started)} ms`,
    );
    expect((await get(`${url}/cgi-bin/whoami`, 10_000))?.trim()).toMatch(/^uid=1000 gid=1000 host=vm-/);

    await vms.pauseVm({ vmId: created.vmId }, headers("acme"));
    expect(await get(`${url}/`, 1_500)).toBeUndefined();
    await vms.resumeVm({ vmId: created.vmId }, headers("acme"));
    expect(await until(() => get(`${url}/`), 30_000)).toBe(HTTPD_INDEX);

    const info = await until(async () => {
      const { vm } = await vms.getVmInfo({ vmId: created.vmId }, headers("acme"));
      return vm?.metrics && vm.metrics.cpuTimeNanos > 0n ? vm : undefined;
    });
    expect(info.metrics!.memoryUsageBytes).toBeGreaterThan(0n);

    expect((await vms.shutdownVm({ vmId: created.vmId, timeoutSeconds: 20 }, headers("acme"))).state).toBe(
      S.SHUTDOWN,
    );
    await vms.deleteVm({ vmId: created.vmId }, headers("acme"));
    expect(leaks(created.vmId)).toEqual([]);
  });
});
