/**
 * The platform slice metald's tests run against: assetmanagerd, builderd and metald on one data
 * dir, wired in-process as `kiln up` does, plus helpers to poll a workload and count leftovers.
 */
import fs from "node:fs";
import type { Transport } from "@connectrpc/connect";
import { assetmanagerd } from "@kiln/assetmanagerd";
import { builderd } from "@kiln/builderd";
import { startTestService } from "@kiln/kit/testing";
import { metald } from "../definition.js";
import { httpGet } from "./http.js";

export const headers = (tenant: string, tier = "pro") => ({
  headers: { "x-kiln-tenant-id": tenant, "x-kiln-tenant-tier": tier },
});

/** The body of a GET (fast connection failures retried: testing/http.ts), or undefined. */
export async function get(url: string, timeoutMs = 2_000): Promise<string | undefined> {
  return (await httpGet(url, timeoutMs))?.body;
}

export async function until<T>(fn: () => Promise<T | undefined>, timeoutMs = 20_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error("timed out waiting");
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** assetmanagerd + builderd + metald on one data dir, wired in-process as `kiln up` does. */
export async function startPlatform(dataDir: string, insecure: string, backend = "runc") {
  const assets = await startTestService(assetmanagerd, { env: { UNKEY_ASSETMANAGERD_DATA_DIR: dataDir } });
  const builder = await startTestService(builderd, {
    env: { UNKEY_BUILDERD_DATA_DIR: dataDir, UNKEY_BUILDERD_INSECURE_REGISTRIES: insecure },
    peerTransport: () => assets.service.transport,
  });
  /**
   * `billaged`: a transport standing in for billaged (usage hand-off is enabled with it).
   * `assets`: wraps metald's transport to assetmanagerd (to watch its calls).
   */
  const startMetald = (opts: { billaged?: Transport; assets?: (t: Transport) => Transport } = {}) =>
    startTestService(metald, {
      env: {
        UNKEY_METALD_DATA_DIR: dataDir,
        UNKEY_METALD_BACKEND: backend,
        UNKEY_METALD_SHUTDOWN_GRACE: "5s",
        // Tests get their own router and VM network, apart from a real metald on this host.
        UNKEY_METALD_ROUTER_NAME: "kiln-test",
        UNKEY_METALD_NETWORK_CIDR: "10.214.0.0/16",
        ...(opts.billaged
          ? { UNKEY_METALD_BILLAGED_ENABLED: "true", UNKEY_METALD_USAGE_BATCH_INTERVAL: "300ms" }
          : {}),
      },
      peerTransport: (peer) =>
        peer === "billaged" && opts.billaged
          ? opts.billaged
          : (opts.assets?.(assets.service.transport) ?? assets.service.transport),
    });
  return { assets, builder, metald: await startMetald(), startMetald };
}

/** Kiln resources that still mention a VM: its netns, router interface, cgroup, process. */
export function leaks(vmId: string, tenant = "acme"): string[] {
  const short = vmId.slice(-12);
  const found: string[] = [];
  const netns = fs.existsSync("/var/run/netns") ? fs.readdirSync("/var/run/netns") : [];
  found.push(...netns.filter((n) => n.includes(short)).map((n) => `netns ${n}`));
  for (const ctl of ["cpu", "memory", "pids", "freezer"]) {
    const dir = `/sys/fs/cgroup/${ctl}/kiln/${tenant}/${vmId}`;
    if (fs.existsSync(dir)) found.push(`cgroup ${dir}`);
  }
  for (const pid of fs.readdirSync("/proc").filter((d) => /^\d+$/.test(d))) {
    try {
      if (fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").includes(vmId)) found.push(`process ${pid}`);
    } catch {}
  }
  return found;
}
