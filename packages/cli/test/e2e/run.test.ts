/**
 * The CLI against a running platform (`kiln up` in this process, a real registry): `kiln run`
 * builds the image, boots it on runc and prints an endpoint that answers; `kiln vms`, `kiln
 * builds` and `kiln assets` see the results; `kiln vms delete` cleans up, and `kiln assets`
 * refuses to delete the leased rootfs, then garbage-collects (dry run) and deletes it.
 */
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import type { RunningService } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { HTTPD_INDEX, pushBusyboxHttpd } from "../../../builderd/src/testing/images.js";
import { startTestRegistry } from "../../../builderd/src/testing/registry.js";
import { startPlatform } from "../../src/platform.js";
import { SERVICES } from "../../src/services.js";

const exec = promisify(execFile);

describe("kiln run", () => {
  const dir = tempDir("kiln-cli-run-");
  let registry: Awaited<ReturnType<typeof startTestRegistry>>;
  let running: RunningService[];
  let image: string;
  const env: Record<string, string> = {};

  const kiln = async (...args: string[]) => {
    const main = new URL("../../src/main.ts", import.meta.url).pathname;
    const { stdout } = await exec(
      process.execPath,
      [
        "--conditions=kiln-source",
        "--import",
        "tsx",
        main,
        "--data-dir",
        dir.path,
        "--tenant",
        "cli",
        ...args,
      ],
      { env: { ...process.env, ...env } },
    );
    return stdout;
  };

  beforeAll(async () => {
    registry = await startTestRegistry();
    image = await pushBusyboxHttpd(dir.path, registry.host);
    const platformEnv: Record<string, string> = {
      UNKEY_BUILDERD_INSECURE_REGISTRIES: registry.host,
      UNKEY_METALD_BACKEND: "runc",
      UNKEY_METALD_ROUTER_NAME: "kiln-test",
      UNKEY_METALD_NETWORK_CIDR: "10.214.0.0/16",
    };
    for (const def of SERVICES) {
      const p = `UNKEY_${def.name.toUpperCase()}_`;
      Object.assign(platformEnv, { [`${p}PORT`]: "0", [`${p}METRICS_PORT`]: "0", [`${p}LOG_LEVEL`]: "warn" });
    }
    running = await startPlatform({ env: platformEnv, dataDir: dir.path });
    // The CLI finds services through KILN_<SERVICE>_URL (their ports were picked by the OS).
    for (const s of running) env[`KILN_${s.name.toUpperCase()}_URL`] = `http://127.0.0.1:${s.api.port}`;
  });

  afterAll(async () => {
    for (const s of [...(running ?? [])].reverse()) await s.stop();
    await registry?.stop();
    dir.remove();
  });

  it("builds, boots and prints an endpoint that answers; the other commands see it; delete cleans up", async () => {
    const out = JSON.parse(await kiln("run", image, "--backend", "runc", "--json")) as {
      vmId: string;
      buildId: string;
      assetId: string;
      endpoint: string;
    };
    expect(out.vmId).toMatch(/^vm_/);
    const hostPort = /127\.0\.0\.1:(\d+)→8080\/tcp/.exec(out.endpoint)?.[1];
    expect(hostPort).toBeDefined();
    expect(await (await fetch(`http://127.0.0.1:${hostPort}/`)).text()).toBe(HTTPD_INDEX);

    const vms = JSON.parse(await kiln("vms", "list", "--json")) as {
      vms: Array<{ vmId: string; state: string }>;
    };
    expect(vms.vms).toEqual([expect.objectContaining({ vmId: out.vmId, state: "VM_STATE_RUNNING" })]);
    const build = JSON.parse(await kiln("builds", "get", out.buildId, "--json")) as {
      state: string;
      assetId: string;
    };
    expect(build).toMatchObject({ state: "BUILD_STATE_COMPLETED", assetId: out.assetId });
    expect(await kiln("assets", "list")).toContain(out.assetId);
    expect(JSON.parse(await kiln("assets", "get", out.assetId, "--json"))).toMatchObject({
      id: out.assetId,
      type: "ASSET_TYPE_ROOTFS",
      status: "ASSET_STATUS_AVAILABLE",
      referenceCount: 1,
    });
    const leased = (await kiln("assets", "delete", out.assetId).catch((e) => e)) as {
      code: number;
      stderr: string;
    };
    expect(leased.code).toBe(1);
    expect(leased.stderr).toMatch(/active lease\(s\) \(held by metald:vm_.*release them first/);

    // Run it again: the rootfs is reused, a second VM starts.
    const again = JSON.parse(await kiln("run", image, "--backend", "runc", "--json")) as {
      vmId: string;
      assetId: string;
    };
    expect(again.assetId).toBe(out.assetId);
    expect(again.vmId).not.toBe(out.vmId);

    for (const id of [out.vmId, again.vmId]) expect(await kiln("vms", "delete", id)).toContain("DELETED");
    expect(JSON.parse(await kiln("vms", "list", "--json")).vms ?? []).toEqual([]);

    // Unleased now: a dry-run GC lists the rootfs and deletes nothing; delete removes it.
    await new Promise((r) => setTimeout(r, 1_100));
    const gc = await kiln("assets", "gc", "--dry-run", "--max-age", "1s");
    expect(gc).toContain(out.assetId);
    expect(gc).toMatch(/would delete 1 asset\(s\)/);
    expect(await kiln("assets", "get", out.assetId)).toMatch(/^status +available$/m);
    expect(await kiln("assets", "delete", out.assetId)).toContain(`asset ${out.assetId} deleted`);
    expect(await kiln("assets", "list")).not.toContain(out.assetId);
  });

  it("says what to do when a build fails", async () => {
    const err = (await kiln("run", "docker://127.0.0.1:1/nothing:1").catch((e) => e)) as {
      code: number;
      stderr: string;
    };
    expect(err.code).toBe(1);
    expect(err.stderr).toMatch(/kiln: .*127\.0\.0\.1:1/);
  });
});
