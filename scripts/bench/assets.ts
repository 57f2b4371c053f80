/**
 * `npm run bench -- assets [--size-mib N] [--prepares N]`: assetmanagerd against `cp`, in one run.
 *
 * 1. UploadAsset of a 1 GiB random file (Connect binary over HTTP/1.1 from this process to
 *    assetmanagerd running as its own process, 256 KiB chunks; the service hashes, writes, fsyncs
 *    and links the blob) against `cp` of the same file on the same filesystem, both reading it
 *    from the page cache. The upload is made as the CLI makes it (`uploadAssetFile`); the same
 *    upload through the generated Connect client is shown after it. `cp` does not fsync, so
 *    `cp` + `sync FILE` is shown too, and so is RegisterAsset of the same file from the host (no
 *    network). Target: ≥ 0.5× cp's throughput.
 * 2. PrepareAssets latency for a kernel + rootfs pair hard-linked into a fresh VM directory per
 *    call, p50/p99 over 200 calls: as a client in another process sees it (Connect over
 *    HTTP/1.1, then over HTTP/2 as gRPC clients call), and through the in-process transport (the
 *    service's own share). Target: < 5 ms.
 */
import { execFile } from "node:child_process";
import { randomFillSync } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { createClient } from "@connectrpc/connect";
import { AssetManagerService, assetmanagerd as api } from "@kiln/api";
import { assetmanagerd, uploadAssetFile } from "@kiln/assetmanagerd";
import { startService } from "@kiln/kit";
import { captureLogs } from "@kiln/kit/testing";
import { assetClient, asTenant, uploadStream } from "../../packages/assetmanagerd/src/testing/client.js";
import { spawnAssetmanagerd } from "../../packages/assetmanagerd/src/testing/process.js";
import { option, timed } from "./util.js";

const exec = promisify(execFile);
const MiB = 1024 * 1024;

function writeRandomFile(file: string, bytes: number): void {
  const fd = fs.openSync(file, "w");
  try {
    const buf = Buffer.alloc(16 * MiB);
    for (let left = bytes; left > 0; left -= buf.length) {
      randomFillSync(buf);
      fs.writeSync(fd, buf, 0, Math.min(buf.length, left));
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** The file's content as UploadAsset chunks, read as the client streams. */
async function* fileChunks(file: string): AsyncGenerator<Uint8Array> {
  for await (const chunk of fs.createReadStream(file, { highWaterMark: 256 * 1024 })) yield chunk as Buffer;
}

/** CPU time (user + system, ms) a process used so far, from /proc (Linux's 100 Hz clock ticks). */
function processCpuMs(pid: number): number {
  const fields = fs.readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]!.split(" ");
  return (Number(fields[11]) + Number(fields[12])) * 10;
}

/** Runs one upload, timing it and the CPU both sides spent on it. */
async function measuredUpload<T>(
  servicePid: number,
  fn: () => Promise<T>,
): Promise<{ ms: number; res: T; serviceCpuMs: number; clientCpuMs: number }> {
  // Client and service share the machine's cores: where the upload's CPU goes says which
  // side bounds it.
  const serviceCpu0 = processCpuMs(servicePid);
  const clientCpu0 = process.cpuUsage();
  const [ms, res] = await timed(fn);
  const serviceCpuMs = processCpuMs(servicePid) - serviceCpu0;
  const clientCpu = process.cpuUsage(clientCpu0);
  return { ms, res, serviceCpuMs, clientCpuMs: (clientCpu.user + clientCpu.system) / 1000 };
}

/** Latencies (sorted) of `n` PrepareAssets calls made by `call(target)`, after 10 warm-up calls. */
async function prepareLatencies(
  n: number,
  prefix: string,
  call: (targetPath: string) => Promise<{ assetPaths: Record<string, string> }>,
): Promise<number[]> {
  for (let i = 0; i < 10; i++) await call(`warmup-${prefix}/vm_${i}`);
  const latencies: number[] = [];
  for (let i = 0; i < n; i++) {
    const [ms, res] = await timed(() => call(`${prefix}/vm_${i}/root`));
    if (Object.keys(res.assetPaths).length !== 2)
      throw new Error("PrepareAssets placed fewer files than asked");
    latencies.push(ms);
  }
  return latencies.sort((a, b) => a - b);
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!;
}

export async function run(args: string[]): Promise<void> {
  const sizeMiB = option(args, "--size-mib", 1024);
  const prepares = option(args, "--prepares", 200);
  const size = sizeMiB * MiB;
  // cp, the blob store and the VM root all on one filesystem, so PrepareAssets hard-links.
  const work = fs.mkdtempSync(path.join(os.tmpdir(), "kiln-bench-assets-"));
  const dataDir = path.join(work, "kiln");
  fs.mkdirSync(dataDir);
  let svc: Awaited<ReturnType<typeof spawnAssetmanagerd>> | undefined;
  try {
    process.stderr.write(`writing a ${sizeMiB} MiB random file in ${work}…\n`);
    const source = path.join(work, "source.bin");
    writeRandomFile(source, size);
    // Written back before anything is timed, and still in the page cache: cp and the upload
    // both read it from memory and neither pays for its writeback.
    await exec("sync", [source]);
    const copy = path.join(work, "copy.bin");

    const [cpMs] = await timed(() => exec("cp", [source, copy]));
    const [syncMs] = await timed(() => exec("sync", [copy]));
    fs.rmSync(copy);

    svc = await spawnAssetmanagerd({ dataDir, env: { UNKEY_ASSETMANAGERD_IMPORT_DIRS: work } });
    const client = assetClient(svc.baseUrl, { binary: true });
    const as = asTenant(svc.token, "bench", "enterprise");
    // The upload as users make it (`kiln assets import-kernel`, uploadAssetFile): the file read
    // straight into the request frames.
    const upload = await measuredUpload(svc.pid, () =>
      uploadAssetFile(
        { baseUrl: svc!.baseUrl, headers: as.headers },
        { name: "bench.img", type: api.AssetType.ROOTFS },
        source,
        { chunkBytes: 256 * 1024 },
      ),
    );
    const uploaded = upload.res;
    if (Number(uploaded.asset?.sizeBytes) !== size)
      throw new Error(`uploaded ${uploaded.asset?.sizeBytes} bytes, expected ${size}`);
    // The same file imported from the host (builderd's path for a finished rootfs): on the
    // store's filesystem it is taken by hard link and read once to hash it (no copy).
    const [registerMs] = await timed(() =>
      client.registerAsset({ name: "bench-import.img", type: api.AssetType.ROOTFS, location: source }, as),
    );

    // PrepareAssets: a kernel-sized and the rootfs asset into a fresh directory per call.
    const kernel = await client.uploadAsset(
      uploadStream({ name: "vmlinuz", type: api.AssetType.KERNEL }, Buffer.alloc(8 * MiB, 7)),
      as,
    );
    const ids = [kernel.asset!.id, uploaded.asset!.id];
    // Let the writeback of this run's gigabytes finish first: it would slow every mkdir and link.
    await exec("sync", ["-f", dataDir]);
    const latencies = await prepareLatencies(prepares, "bench", (targetPath) =>
      client.prepareAssets({ assetIds: ids, targetPath, preparedFor: `vm:${targetPath}` }, as),
    );
    // The same over HTTP/2 (h2c), as gRPC clients call.
    const h2 = assetClient(svc.baseUrl, { binary: true, http2: true });
    const h2Latencies = await prepareLatencies(prepares, "bench-h2", (targetPath) =>
      h2.prepareAssets({ assetIds: ids, targetPath }, as),
    );
    // The same calls inside one process through the service's in-process transport (every
    // interceptor, no HTTP): the service's own share of the latency.
    const inDir = path.join(work, "kiln-in-process");
    const local = await startService(assetmanagerd, {
      env: {
        UNKEY_ASSETMANAGERD_PORT: "0",
        UNKEY_ASSETMANAGERD_METRICS_PORT: "0",
        UNKEY_ASSETMANAGERD_DATA_DIR: inDir,
      },
      logDestination: captureLogs().destination,
    });
    let inProcess: number[];
    try {
      const lc = createClient(AssetManagerService, local.transport);
      const h = { headers: { "x-kiln-tenant-id": "bench", "x-kiln-tenant-tier": "enterprise" } };
      const k = await lc.uploadAsset(
        uploadStream({ name: "vmlinuz", type: api.AssetType.KERNEL }, Buffer.alloc(8 * MiB, 7)),
        h,
      );
      const r = await lc.uploadAsset(
        uploadStream({ name: "rootfs", type: api.AssetType.ROOTFS }, Buffer.alloc(64 * MiB, 9)),
        h,
      );
      const lids = [k.asset!.id, r.asset!.id];
      inProcess = await prepareLatencies(prepares, "bench", (targetPath) =>
        lc.prepareAssets({ assetIds: lids, targetPath }, h),
      );
    } finally {
      await local.stop();
    }
    // Last, so the measurements above run as before: the same upload through the generated
    // Connect client (`client.uploadAsset(stream)` of a read stream's chunks), for comparison.
    const generic = await measuredUpload(svc.pid, async () => {
      async function* requests() {
        yield {
          data: {
            case: "metadata" as const,
            value: { name: "bench-generic.img", type: api.AssetType.ROOTFS },
          },
        };
        for await (const chunk of fileChunks(source))
          yield { data: { case: "chunk" as const, value: chunk } };
      }
      return client.uploadAsset(requests(), as);
    });
    if (Number(generic.res.asset?.sizeBytes) !== size)
      throw new Error(`uploaded ${generic.res.asset?.sizeBytes} bytes, expected ${size}`);

    const placed = path.join(dataDir, "vms", "bench", "vm_0", "root", "rootfs.ext4");
    const linked = fs.statSync(placed).ino === fs.statSync(uploaded.asset!.location).ino;

    const mbps = (ms: number) => size / 1e6 / (ms / 1000);
    const uploadMs = upload.ms;
    const ratio = mbps(uploadMs) / mbps(cpMs);
    const p50 = percentile(latencies, 50);
    const p99 = percentile(latencies, 99);
    const out = process.stdout;
    out.write(`\nfile: ${sizeMiB} MiB random, ${os.cpus().length} CPUs, data dir on ${work}\n`);
    out.write(
      `cp                          ${cpMs.toFixed(0).padStart(7)} ms  ${mbps(cpMs).toFixed(1).padStart(7)} MB/s\n`,
    );
    out.write(
      `cp + sync FILE              ${(cpMs + syncMs).toFixed(0).padStart(7)} ms  ${mbps(cpMs + syncMs)
        .toFixed(1)
        .padStart(7)} MB/s\n`,
    );
    out.write(
      `UploadAsset (hash+fsync)    ${uploadMs.toFixed(0).padStart(7)} ms  ${mbps(uploadMs).toFixed(1).padStart(7)} MB/s  ${ratio.toFixed(2)}× cp, ${(mbps(uploadMs) / mbps(cpMs + syncMs)).toFixed(2)}× cp+sync\n`,
    );
    out.write(
      `  CPU during the upload: service ${(upload.serviceCpuMs / 1000).toFixed(2)} s, this client ${(upload.clientCpuMs / 1000).toFixed(2)} s (${os.cpus().length} CPUs)\n`,
    );
    out.write(
      `  same, generic Connect client ${generic.ms.toFixed(0).padStart(5)} ms  ${mbps(generic.ms).toFixed(1).padStart(7)} MB/s  ${(mbps(generic.ms) / mbps(cpMs)).toFixed(2)}× cp; CPU: service ${(generic.serviceCpuMs / 1000).toFixed(2)} s, client ${(generic.clientCpuMs / 1000).toFixed(2)} s\n`,
    );
    out.write(
      `RegisterAsset (host file)   ${registerMs.toFixed(0).padStart(7)} ms  ${mbps(registerMs).toFixed(1).padStart(7)} MB/s  ${(mbps(registerMs) / mbps(cpMs)).toFixed(2)}× cp\n`,
    );
    out.write(
      `PrepareAssets (2 assets, ${linked ? "hard links" : "NOT hard links"}) over ${prepares} calls: p50 ${p50.toFixed(2)} ms, p99 ${p99.toFixed(2)} ms, max ${latencies[latencies.length - 1]!.toFixed(2)} ms\n`,
    );
    out.write(
      `PrepareAssets over HTTP/2 over ${prepares} calls: p50 ${percentile(h2Latencies, 50).toFixed(2)} ms, p99 ${percentile(h2Latencies, 99).toFixed(2)} ms\n`,
    );
    out.write(
      `PrepareAssets in-process (no HTTP) over ${prepares} calls: p50 ${percentile(inProcess, 50).toFixed(2)} ms, p99 ${percentile(inProcess, 99).toFixed(2)} ms\n`,
    );
    out.write(
      `targets: upload ≥ 0.5× cp → ${ratio >= 0.5 ? "met" : "NOT met"}; PrepareAssets < 5 ms → p50 ${p50 < 5 ? "met" : "NOT met"}, p99 ${p99 < 5 ? "met" : "NOT met"} (over HTTP)\n`,
    );
  } finally {
    await svc?.kill("SIGTERM");
    fs.rmSync(work, { recursive: true, force: true });
  }
}
