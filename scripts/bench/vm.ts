/**
 * `npm run bench -- vm [--runs N] [--vms N] [--backends runc,gvisor,qemu]`: metald against the
 * bare runtimes, in one run.
 *
 * builderd builds the busybox-httpd image into an ext4 rootfs. Then, per backend and side by
 * side (interleaved, after one untimed warm-up of each): create → first HTTP response through
 * Kiln (CreateVm + BootVm on metald's VmService, then polling the forwarded host port) and through
 * the same runtime started by hand on the same ext4 image (`runc run`, `runsc run`, the bare
 * `qemu-system-x86_64` line). The bare container runs are timed from the ext4 image: loop mount,
 * overlayfs, config.json, then the runtime (Kiln's time includes the same work); the runtime's
 * share alone is reported too. QEMU boots the image file as it is. Both poll
 * every 10 ms. Target (issue #5): Kiln ≤ 1.15× the bare runtime. Then CreateVm+BootVm throughput
 * on runc and gVisor. Everything started is deleted, also on failure.
 */
import { type ChildProcess, execFile, spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { createClient } from "@connectrpc/connect";
import { AssetManagerService, BuilderService, VmService } from "@kiln/api";
import { buildInitramfs, findHostKernel } from "@kiln/assetmanagerd";
import { resolveImageUser, sharedSpawner } from "@kiln/kit";
import {
  busyboxHttpdImage,
  HTTPD_INDEX,
  HTTPD_PORT,
  pushBusyboxHttpd,
} from "../../packages/builderd/src/testing/images.js";
import { freePort, startTestRegistry } from "../../packages/builderd/src/testing/registry.js";
import type { VmSpec } from "../../packages/metald/src/backends/backend.js";
import { mountImage, mountOverlay, unmountUnder } from "../../packages/metald/src/backends/mounts.js";
import { containerArgs, ociRuntimeConfig } from "../../packages/metald/src/backends/oci/config.js";
import { killAndWait, processesMentioning } from "../../packages/metald/src/backends/process.js";
import {
  hostTscKhz,
  kvmUsable,
  QEMU_BINARY,
  qemuArgs,
} from "../../packages/metald/src/backends/qemu/cmdline.js";
import { headers, leaks, startPlatform } from "../../packages/metald/src/testing/platform.js";

const exec = promisify(execFile);
const MEMORY = 256 * 1024 * 1024;
const H = headers("bench");
type Backend = "runc" | "gvisor" | "qemu";
type Vms = ReturnType<typeof createClient<typeof VmService>>;

const option = (args: string[], name: string, fallback: number) => {
  const i = args.indexOf(name);
  return i >= 0 && args[i + 1] ? Number(args[i + 1]) : fallback;
};
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const load = () =>
  os
    .loadavg()
    .join(" ")
    .replace(/(\.\d\d)\d*/g, "$1");
const note = (s: string) => process.stderr.write(`${s}\n`);
/** Runs a cleanup step; a failure is reported and the next step still runs. */
const safely = (what: string, fn: () => Promise<unknown>) =>
  fn().catch((err: unknown) => note(`cleanup: ${what} failed: ${String(err)}`));

/** Polls `url` every 10 ms until it serves the image's index page. */
async function firstAnswer(url: string, timeoutMs = 90_000): Promise<void> {
  const end = performance.now() + timeoutMs;
  while (performance.now() < end) {
    try {
      const res = await fetch(url, { signal: AbortSignal.timeout(2_000) });
      if ((await res.text()) === HTTPD_INDEX) return;
    } catch {}
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`${url} did not answer within ${timeoutMs} ms`);
}

/** Resolves with the exit code; the child's output goes to `log` (a detached container keeps its stdio). */
function runTo(file: string, args: string[], log: string): { child: ChildProcess; exited: Promise<number> } {
  const fd = fs.openSync(log, "a");
  const child = spawn(file, args, { stdio: ["ignore", fd, fd] });
  fs.closeSync(fd);
  const exited = new Promise<number>((resolve, reject) => {
    child.once("error", reject);
    child.once("exit", (code, signal) => resolve(code ?? (signal ? 128 : 1)));
  });
  return { child, exited };
}

/** A bare run's time: from the ext4 image (mounts and bundle included), and of the runtime alone. */
interface BareTimes {
  total: number;
  runtime: number;
}

/**
 * `runc run` / `runsc run` by hand on an overlay over the ext4 image, in the host netns on a free
 * port: loop-mount the image, overlay it, write config.json, run — what an operator types to run
 * the runtime on this rootfs. `runtime` is the run alone (bundle made beforehand).
 */
async function bareOci(kind: "runc" | "gvisor", ext4: string, work: string): Promise<BareTimes> {
  const dir = fs.mkdtempSync(path.join(work, `bare-${kind}-`));
  const id = `kiln-bench-${path.basename(dir)}`;
  const bundle = path.join(dir, "bundle");
  const log = path.join(dir, "console.log");
  const binary = kind === "runc" ? "runc" : "runsc";
  const flags = ["--root", path.join(dir, "state")];
  if (kind === "gvisor") flags.push("--platform=ptrace", "--network=host", "--overlay2=none");
  try {
    const t0 = performance.now();
    const merged = path.join(bundle, "rootfs");
    await mountImage(ext4, `${dir}/lower`);
    await mountOverlay({ lower: `${dir}/lower`, upper: `${dir}/upper`, work: `${dir}/work`, merged });
    const image = busyboxHttpdImage().config!;
    const port = await freePort();
    const cmd = (image.Cmd ?? []).map((a) => (a === String(HTTPD_PORT) ? String(port) : a));
    const spec: VmSpec = {
      vmId: id,
      tenantId: "bench",
      vcpus: 1,
      memoryBytes: MEMORY,
      dir,
      rootfs: ext4,
      kernelArgs: [],
      workload: {
        entrypoint: [],
        cmd,
        env: Object.fromEntries(
          (image.Env ?? []).map((e) => [e.split("=")[0]!, e.slice(e.indexOf("=") + 1)]),
        ),
        workingDir: image.WorkingDir ?? "/",
        user: image.User ?? "",
      },
      hostname: "bare",
      ports: [],
      consoleLog: log,
    };
    const config = ociRuntimeConfig({
      spec,
      user: await resolveImageUser(merged, spec.workload.user),
      args: containerArgs(spec, fs.existsSync(path.join(merged, ".kiln/tini"))),
      network: { kind: "inherit" }, // the host's network namespace
      cgroupsPath: `/${id}`,
      etcFiles: [],
      limits: { memory: kind === "runc", cpu: true }, // as metald's backends set them
      nofile: 1024,
    });
    fs.writeFileSync(path.join(bundle, "config.json"), JSON.stringify(config));
    const t1 = performance.now();
    // Started from the spawn helper, as the mounts above and Kiln's own commands are: a fork of
    // this process (the whole platform, hundreds of MiB) would add 10-20 ms that a shell does not.
    const run = await sharedSpawner().spawnDetached(
      binary,
      [...flags, "run", "--detach", "--bundle", bundle, id],
      {
        logFile: log,
        cwd: bundle,
      },
    );
    const { code } = await run.exited;
    if (code !== 0) throw new Error(`${binary} run exited ${code}: ${fs.readFileSync(log, "utf8")}`);
    await firstAnswer(`http://127.0.0.1:${port}/`);
    const t2 = performance.now();
    return { total: t2 - t0, runtime: t2 - t1 };
  } finally {
    await safely(`${binary} delete`, () => exec(binary, [...flags, "delete", "--force", id]));
    for (const p of await processesMentioning(dir)) await safely(`kill ${p.pid}`, () => killAndWait(p));
    for (const ctl of fs.readdirSync("/sys/fs/cgroup")) {
      try {
        fs.rmdirSync(`/sys/fs/cgroup/${ctl}/${id}`); // what the runtime left of its cgroup
      } catch {}
    }
    await unmountUnder(dir); // throws rather than leave a mount under a directory it would delete
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** The bare QEMU line (HOST-FACTS) on the ext4 image with `-snapshot`, user-mode hostfwd to a free port. */
async function bareQemu(ext4: string, kernel: string, initrd: string, work: string): Promise<BareTimes> {
  const dir = fs.mkdtempSync(path.join(work, "bare-qemu-"));
  const port = await freePort();
  const args = qemuArgs({
    kernel,
    initrd,
    rootfs: ext4,
    memoryMiB: MEMORY / 1024 / 1024,
    vcpus: 1,
    kvm: await kvmUsable(),
    tscKhz: await hostTscKhz(),
    qmpSocket: path.join(dir, "qmp.sock"),
    serial: { file: path.join(dir, "console.log") },
    hostfwd: [{ hostAddr: "127.0.0.1", hostPort: port, guestPort: HTTPD_PORT, protocol: "tcp" }],
  });
  const t0 = performance.now();
  const q = runTo(QEMU_BINARY, [...args, "-snapshot"], path.join(dir, "qemu.log"));
  try {
    const died = q.exited.then((c) => Promise.reject(new Error(`qemu exited ${c}`)));
    await Promise.race([firstAnswer(`http://127.0.0.1:${port}/`), died]);
    const ms = performance.now() - t0;
    return { total: ms, runtime: ms }; // QEMU boots the image file itself: nothing to prepare
  } finally {
    if (q.child.exitCode === null) q.child.kill("SIGKILL");
    await q.exited.catch(() => undefined);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

const vmRequest = (rootfsAssetId: string, backend: Backend) => ({
  config: { rootfsAssetId, backend, memory: { sizeBytes: BigInt(MEMORY) } },
});

interface KilnTimes {
  total: number;
  create: number;
  boot: number;
  serve: number;
}

/** CreateVm + BootVm through metald, then the forwarded port's first answer; the VM is deleted after. */
async function kiln(vms: Vms, rootfsAssetId: string, backend: Backend, leaked: string[]): Promise<KilnTimes> {
  const t0 = performance.now();
  let vmId: string | undefined;
  try {
    const created = await vms.createVm(vmRequest(rootfsAssetId, backend), H);
    vmId = created.vmId;
    const t1 = performance.now();
    await vms.bootVm({ vmId }, H);
    const t2 = performance.now();
    await firstAnswer(`http://127.0.0.1:${created.endpoint!.ports[0]!.hostPort}/`);
    const t3 = performance.now();
    return { total: t3 - t0, create: t1 - t0, boot: t2 - t1, serve: t3 - t2 };
  } finally {
    if (vmId) {
      await vms
        .deleteVm({ vmId }, H)
        .catch((err: unknown) => leaked.push(`${vmId}: delete failed: ${String(err)}`));
      leaked.push(...leaks(vmId, "bench"));
    }
  }
}

/** N CreateVm+BootVm at once (concurrently); VMs/s until every BootVm returned. Then all are deleted. */
async function throughput(vms: Vms, rootfsAssetId: string, backend: Backend, n: number, leaked: string[]) {
  const ids: string[] = [];
  const t0 = performance.now();
  let bootMs = 0;
  let deleteMs = 0;
  try {
    const results = await Promise.allSettled(
      Array.from({ length: n }, async () => {
        const { vmId } = await vms.createVm(vmRequest(rootfsAssetId, backend), H);
        ids.push(vmId);
        await vms.bootVm({ vmId }, H);
      }),
    );
    const failed = results.find((r) => r.status === "rejected");
    if (failed) throw failed.reason;
    bootMs = performance.now() - t0;
  } finally {
    const d0 = performance.now();
    await Promise.all(
      ids.map((vmId) =>
        vms.deleteVm({ vmId }, H).catch((err: unknown) => leaked.push(`${vmId}: ${String(err)}`)),
      ),
    );
    deleteMs = performance.now() - d0;
    for (const vmId of ids) leaked.push(...leaks(vmId, "bench"));
  }
  return { perSecond: (n / bootMs) * 1000, bootMs, deleteMs };
}

export async function run(args: string[] = []): Promise<void> {
  const runs = option(args, "--runs", 7);
  const n = option(args, "--vms", 10);
  const i = args.indexOf("--backends");
  const backends = (i >= 0 ? (args[i + 1] ?? "") : "runc,gvisor,qemu").split(",") as Backend[];
  for (const b of backends) {
    if (!["runc", "gvisor", "qemu"].includes(b))
      throw new Error(`--backends: unknown backend ${b} (runc, gvisor, qemu)`);
  }
  const loadStart = load();
  const work = fs.mkdtempSync(path.join(os.tmpdir(), "kiln-bench-vm-"));
  let registry: Awaited<ReturnType<typeof startTestRegistry>> | undefined;
  let p: Awaited<ReturnType<typeof startPlatform>> | undefined;
  const leaked: string[] = [];
  try {
    registry = await startTestRegistry();
    const image = await pushBusyboxHttpd(work, registry.host);
    p = await startPlatform(path.join(work, "data"), registry.host, "runc");
    const builds = createClient(BuilderService, p.builder.service.transport);
    const { buildId } = await builds.createBuild(
      { config: { source: { sourceType: { case: "dockerImage", value: { imageUri: image } } } } },
      H,
    );
    for await (const _ of builds.streamBuildLogs({ buildId, follow: true }, H)) {
    }
    const rootfsAssetId = (await builds.getBuild({ buildId }, H)).build!.assetId;
    const assets = createClient(AssetManagerService, p.assets.service.transport);
    const ext4 = (await assets.getAsset({ id: rootfsAssetId }, H)).asset!.location;
    const host = await findHostKernel();
    const initrd = path.join(work, "initrd.img");
    await buildInitramfs({ modulesDir: host.modulesDir, out: initrd });
    const vms = createClient(VmService, p.metald.service.transport);
    const bare: Record<Backend, () => Promise<BareTimes>> = {
      runc: () => bareOci("runc", ext4, work),
      gvisor: () => bareOci("gvisor", ext4, work),
      qemu: () => bareQemu(ext4, host.vmlinuz, initrd, work),
    };

    const rows: string[] = [];
    for (const backend of backends) {
      note(`${backend}: warm-up (untimed), then ${runs} × (kiln, bare)…`);
      await kiln(vms, rootfsAssetId, backend, leaked);
      await bare[backend]();
      const k: KilnTimes[] = [];
      const b: BareTimes[] = [];
      for (let i = 0; i < runs; i++) {
        k.push(await kiln(vms, rootfsAssetId, backend, leaked));
        b.push(await bare[backend]());
        note(
          `  run ${i + 1}: kiln ${k[i]!.total.toFixed(0)} ms (${k[i]!.create.toFixed(0)}+${k[i]!.boot.toFixed(0)}+${k[i]!.serve.toFixed(0)}), bare ${b[i]!.total.toFixed(0)} ms (runtime ${b[i]!.runtime.toFixed(0)} ms)`,
        );
      }
      const [kt, bt, rt] = [
        median(k.map((t) => t.total)),
        median(b.map((t) => t.total)),
        median(b.map((t) => t.runtime)),
      ];
      const phases = (["create", "boot", "serve"] as const).map((f) =>
        median(k.map((t) => t[f]))
          .toFixed(0)
          .padStart(6),
      );
      rows.push(
        `${backend.padEnd(7)} ${kt.toFixed(0).padStart(8)} ${phases.join(" ")} ${bt.toFixed(0).padStart(8)} ${(kt / bt).toFixed(2).padStart(6)}×  ${(kt / bt <= 1.15 ? "met" : "NOT met").padEnd(8)} ${rt.toFixed(0).padStart(10)} ${(kt / rt).toFixed(2).padStart(6)}×`,
      );
    }
    const tput: string[] = [];
    for (const backend of backends.filter((b) => b !== "qemu")) {
      note(`${backend}: ${n} concurrent CreateVm+BootVm…`);
      const t = await throughput(vms, rootfsAssetId, backend, n, leaked);
      tput.push(
        `${backend.padEnd(7)} ${n} VMs booted in ${t.bootMs.toFixed(0)} ms → ${t.perSecond.toFixed(2)} VMs/s (deleting all: ${t.deleteMs.toFixed(0)} ms)`,
      );
    }
    process.stdout.write(
      [
        "",
        `create → first HTTP response, median of ${runs} (ms; ${os.cpus().length} CPUs, qemu ${(await kvmUsable()) ? "KVM" : "TCG"})`,
        "bare: runc/runsc in the host netns on a free port (runsc --platform=ptrace --network=host --overlay2=none),",
        "      timed from the ext4 image (loop mount, overlay, config.json, run); 'runtime' = the run alone;",
        "      qemu with user-mode hostfwd and -snapshot on the image file",
        "backend  kiln ms create   boot  serve  bare ms  ratio  ≤ 1.15×  runtime ms  ratio",
        ...rows,
        "  kiln = create (CreateVm) + boot (BootVm) + serve (BootVm returned → first answer), each a median",
        "",
        "CreateVm+BootVm throughput (concurrent, until every BootVm returned):",
        ...tput,
        "",
        "sampling cost at 100 VMs: see `npm run bench -- sampling`",
        `leftovers after delete: ${leaked.length === 0 ? "none" : leaked.join("; ")}`,
        `load average (1/5/15 min): start ${loadStart}, end ${load()}`,
        "",
      ].join("\n"),
    );
  } finally {
    const platform = p;
    if (platform) {
      const vms = createClient(VmService, platform.metald.service.transport);
      for (const vm of (await vms.listVms({}, H).catch(() => undefined))?.vms ?? [])
        await safely(`delete ${vm.vmId}`, () => vms.deleteVm({ vmId: vm.vmId }, H));
      await safely("stop metald", () => platform.metald.stop());
      await safely("stop builderd", () => platform.builder.stop());
      await safely("stop assetmanagerd", () => platform.assets.stop());
    }
    await safely("stop the registry", async () => registry?.stop());
    for (const proc of await processesMentioning(work))
      await safely(`kill ${proc.pid}`, () => killAndWait(proc));
    await unmountUnder(work);
    fs.rmSync(work, { recursive: true, force: true });
  }
}
