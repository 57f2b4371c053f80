import { createHash } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { toJson } from "@bufbuild/protobuf";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { type AssetManagerClient, assetmanagerd as api, createAssetManagerClient } from "@kiln/api";
import { buildInitramfs, findHostKernel, uploadAssetFile } from "@kiln/assetmanagerd";
import { Command } from "commander";
import { type CliContext, contextOf } from "../client.js";
import { printJson, printRows } from "../output.js";

const TYPES = ["rootfs", "kernel", "initrd", "disk_image"] as const;
const STATUSES = ["uploading", "available", "deleting", "error"] as const;

const client = (cmd: Command) => {
  const ctx = contextOf(cmd);
  return { ctx, assets: createAssetManagerClient(ctx.transport("assetmanagerd")) };
};

function parseType(s: string): api.AssetType {
  const v = api.AssetType[s.toUpperCase() as keyof typeof api.AssetType];
  if (typeof v !== "number" || v === 0)
    throw new Error(`--type ${JSON.stringify(s)}: one of ${TYPES.join(", ")}`);
  return v;
}

function parseStatus(s: string): api.AssetStatus {
  const v = api.AssetStatus[s.toUpperCase() as keyof typeof api.AssetStatus];
  if (typeof v !== "number" || v === 0)
    throw new Error(`--status ${JSON.stringify(s)}: one of ${STATUSES.join(", ")}`);
  return v;
}

function collectLabel(value: string, acc: Record<string, string>): Record<string, string> {
  const eq = value.indexOf("=");
  if (eq <= 0) throw new Error(`--label ${JSON.stringify(value)}: expected KEY=VALUE`);
  return { ...acc, [value.slice(0, eq)]: value.slice(eq + 1) };
}

/** "90s", "30m", "24h", "7d" → seconds. */
function parseAge(s: string): bigint {
  const m = /^(\d+)(s|m|h|d)$/.exec(s.trim());
  if (!m) throw new Error(`--max-age ${JSON.stringify(s)}: expected a duration such as 90s, 30m, 24h or 7d`);
  return BigInt(Number(m[1]) * { s: 1, m: 60, h: 3600, d: 86400 }[m[2] as "s" | "m" | "h" | "d"]);
}

function size(bytes: bigint): string {
  const n = Number(bytes);
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(1)} ${units[i]}`;
}

const typeName = (t: api.AssetType) => (api.AssetType[t] ?? "UNSPECIFIED").toLowerCase();
const statusName = (s: api.AssetStatus) => (api.AssetStatus[s] ?? "UNSPECIFIED").toLowerCase();

function assetRows(assets: api.Asset[]): Array<Record<string, unknown>> {
  return assets.map((a) => ({
    id: a.id,
    name: a.name,
    type: typeName(a.type),
    status: statusName(a.status),
    size: size(a.sizeBytes),
    leases: a.referenceCount,
    created: a.createdAt ? timestampDate(a.createdAt).toISOString() : "",
    labels: Object.entries(a.labels)
      .map(([k, v]) => `${k}=${v}`)
      .join(","),
  }));
}

const ASSET_COLUMNS = [
  { key: "id", header: "ID" },
  { key: "name", header: "NAME" },
  { key: "type", header: "TYPE" },
  { key: "status", header: "STATUS" },
  { key: "size", header: "SIZE" },
  { key: "leases", header: "LEASES" },
  { key: "created", header: "CREATED" },
  { key: "labels", header: "LABELS" },
];

const assetJson = (a: api.Asset) => toJson(api.AssetSchema, a) as Record<string, unknown>;

export function assetsCommand(): Command {
  const cmd = new Command("assets").description(
    "the tenant's assets (rootfs, kernel, initrd, disk images): list, inspect, delete, garbage-collect, import the host kernel",
  );

  cmd
    .command("list")
    .description("the tenant's assets, newest first")
    .option("--type <type>", `only this type (${TYPES.join(", ")})`)
    .option("--status <status>", `only this status (${STATUSES.join(", ")}; default available)`)
    .option("--label <KEY=VALUE>", "only assets with this label (repeatable)", collectLabel, {})
    .option("--limit <n>", "page size", Number, 100)
    .option("--page-token <token>", "continue from a previous page")
    .option("--json", "print JSON")
    .action(async function (
      this: Command,
      opts: {
        type?: string;
        status?: string;
        label: Record<string, string>;
        limit: number;
        pageToken?: string;
      },
    ) {
      const { ctx, assets } = client(this);
      const res = await assets.listAssets(
        {
          type: opts.type ? parseType(opts.type) : api.AssetType.UNSPECIFIED,
          status: opts.status ? parseStatus(opts.status) : api.AssetStatus.UNSPECIFIED,
          labelSelector: opts.label,
          pageSize: opts.limit,
          pageToken: opts.pageToken ?? "",
        },
        ctx.callOptions,
      );
      if (ctx.json) {
        printJson(toJson(api.ListAssetsResponseSchema, res));
        return;
      }
      printRows(assetRows(res.assets), { columns: ASSET_COLUMNS });
      process.stdout.write(
        `${res.assets.length} of ${res.totalCount}${res.nextPageToken ? ` — next page: --page-token ${res.nextPageToken}` : ""}\n`,
      );
    });

  cmd
    .command("get")
    .description("one asset, with its location, checksum and labels")
    .argument("<asset>", "asset id")
    .option("--json", "print JSON")
    .action(async function (this: Command, id: string) {
      const { ctx, assets } = client(this);
      const { asset } = await assets.getAsset({ id }, ctx.callOptions);
      if (!asset) throw new Error(`asset ${id} not found`);
      if (ctx.json) {
        printJson(assetJson(asset));
        return;
      }
      const rows: Array<[string, string]> = [
        ["id", asset.id],
        ["name", asset.name],
        ["type", typeName(asset.type)],
        ["status", statusName(asset.status)],
        ["size", `${size(asset.sizeBytes)} (${asset.sizeBytes} bytes)`],
        ["checksum", asset.checksum],
        ["location", asset.location],
        ["leases", String(asset.referenceCount)],
        ["created", asset.createdAt ? timestampDate(asset.createdAt).toISOString() : ""],
        ["last used", asset.lastAccessedAt ? timestampDate(asset.lastAccessedAt).toISOString() : ""],
        ["created by", asset.createdBy],
        ["build", asset.buildId],
        ["source image", asset.sourceImage],
        ...Object.entries(asset.labels).map(([k, v]): [string, string] => [`label ${k}`, v]),
      ];
      for (const [k, v] of rows) if (v !== "") process.stdout.write(`${k.padEnd(14)} ${v}\n`);
    });

  cmd
    .command("delete")
    .description("delete an asset (refused while leased, unless --force); its blob goes once nothing uses it")
    .argument("<asset>", "asset id")
    .option("--force", "delete even while leased, ending the leases")
    .option("--json", "print JSON")
    .action(async function (this: Command, id: string, opts: { force?: boolean }) {
      const { ctx, assets } = client(this);
      const res = await assets.deleteAsset({ id, force: opts.force === true }, ctx.callOptions);
      if (ctx.json) printJson({ id, deleted: res.success });
      else process.stdout.write(`asset ${id} deleted\n`);
    });

  cmd
    .command("gc")
    .description("release expired leases and delete assets nobody leases or used for --max-age")
    .option("--dry-run", "list what would be deleted, delete nothing")
    .option(
      "--max-age <age>",
      "unused for at least this long (90s, 30m, 24h, 7d; default: the service's retention)",
    )
    .option("--leases-only", "only release expired leases, delete no assets")
    .option("--json", "print JSON")
    .action(async function (
      this: Command,
      opts: { dryRun?: boolean; maxAge?: string; leasesOnly?: boolean },
    ) {
      const { ctx, assets } = client(this);
      const res = await assets.garbageCollect(
        {
          dryRun: opts.dryRun === true,
          deleteUnreferenced: opts.leasesOnly !== true,
          maxAgeSeconds: opts.maxAge ? parseAge(opts.maxAge) : 0n,
        },
        ctx.callOptions,
      );
      if (ctx.json) {
        printJson(toJson(api.GarbageCollectResponseSchema, res));
        return;
      }
      if (res.deletedAssets.length > 0) printRows(assetRows(res.deletedAssets), { columns: ASSET_COLUMNS });
      const verb = opts.dryRun ? "would delete" : "deleted";
      process.stdout.write(
        `${verb} ${res.deletedAssets.length} asset(s), freeing ${size(res.bytesFreed)}; ${res.leasesExpired} expired lease(s) ${opts.dryRun ? "to release" : "released"}\n`,
      );
    });

  cmd
    .command("import-kernel")
    .description(
      "register the host's kernel (linux-image-cloud-amd64) and a minimal initramfs loading the virtio modules as KERNEL and INITRD assets",
    )
    .option("--kernel-version <version>", "a kernel in /boot (default: the newest cloud kernel)")
    .option("--busybox <path>", "static busybox for the initramfs", "/bin/busybox")
    .option("--json", "print JSON")
    .action(async function (this: Command, opts: { kernelVersion?: string; busybox: string }) {
      const { ctx, assets } = client(this);
      const kernel = await findHostKernel({ version: opts.kernelVersion });
      const work = fs.mkdtempSync(path.join(os.tmpdir(), "kiln-import-kernel-"));
      try {
        const initrdFile = path.join(work, "initrd.img");
        const initrd = await buildInitramfs({
          modulesDir: kernel.modulesDir,
          busybox: opts.busybox,
          out: initrdFile,
        });
        const labels = { kernel_version: kernel.version, source: "host" };
        const k = await importFile(assets, ctx, {
          file: kernel.vmlinuz,
          name: `vmlinuz-${kernel.version}`,
          type: api.AssetType.KERNEL,
          labels,
        });
        const i = await importFile(assets, ctx, {
          file: initrdFile,
          name: `initrd-${kernel.version}.img`,
          type: api.AssetType.INITRD,
          labels: { ...labels, modules: initrd.modules.join(",").slice(0, 256) },
          checksum: initrd.sha256,
        });
        if (ctx.json) {
          printJson({
            kernelVersion: kernel.version,
            kernel: { ...assetJson(k.asset), reused: k.reused },
            initrd: { ...assetJson(i.asset), reused: i.reused, modules: initrd.modules },
          });
          return;
        }
        process.stdout.write(`kernel ${kernel.version} (${kernel.vmlinuz})\n`);
        process.stdout.write(`KERNEL ${k.asset.id}${k.reused ? " (already imported)" : ""}\n`);
        process.stdout.write(
          `INITRD ${i.asset.id}${i.reused ? " (already imported)" : ""} — loads ${initrd.modules.join(", ")}\n`,
        );
      } finally {
        fs.rmSync(work, { recursive: true, force: true });
      }
    });

  return cmd;
}

async function sha256File(file: string): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of fs.createReadStream(file)) hash.update(chunk as Buffer);
  return `sha256:${hash.digest("hex")}`;
}

/**
 * Uploads a file as an asset, unless the tenant already has one of that type with the same
 * content and kernel_version (import-kernel run twice registers nothing new).
 */
async function importFile(
  assets: AssetManagerClient,
  ctx: CliContext,
  f: { file: string; name: string; type: api.AssetType; labels: Record<string, string>; checksum?: string },
): Promise<{ asset: api.Asset; reused: boolean }> {
  const checksum = f.checksum ?? (await sha256File(f.file));
  const existing = await assets.listAssets(
    { type: f.type, labelSelector: { kernel_version: f.labels.kernel_version ?? "" }, pageSize: 1000 },
    ctx.callOptions,
  );
  const same = existing.assets.find((a) => a.checksum === checksum);
  if (same) return { asset: same, reused: true };
  // The file's size is declared from the file and its bytes read straight into the request
  // frames (no per-chunk copies): see uploadAssetFile.
  const res = await uploadAssetFile(
    ctx.endpoint("assetmanagerd"),
    {
      name: f.name,
      type: f.type,
      labels: f.labels,
      checksum,
    },
    f.file,
  );
  if (!res.asset) throw new Error(`uploading ${f.file} returned no asset`);
  return { asset: res.asset, reused: false };
}
