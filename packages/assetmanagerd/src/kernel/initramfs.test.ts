import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import zlib from "node:zlib";
import { FailedPreconditionError } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, describe, expect, it } from "vitest";
import { parseCpio } from "./cpio.js";
import { findHostKernel } from "./host-kernel.js";
import { buildInitramfs } from "./initramfs.js";
import { readModuleIndex, resolveLoadOrder } from "./modules.js";

const dirs: Array<{ remove(): void }> = [];
afterEach(() => {
  for (const d of dirs.splice(0)) d.remove();
});
function workdir(): string {
  const d = tempDir("kiln-initramfs-");
  dirs.push(d);
  return d.path;
}

/**
 * A fake kernel modules directory shaped like Debian's, with compressed modules of each kind.
 * Module "files" are marker text so the test can see which file went where.
 */
function fakeModules(compression: "" | ".xz" | ".gz" | ".zst"): string {
  const dir = path.join(workdir(), "6.1.0-99-cloud-amd64");
  const mods: Record<string, string[]> = {
    "kernel/drivers/virtio/virtio_ring": [],
    "kernel/drivers/virtio/virtio": ["kernel/drivers/virtio/virtio_ring"],
    "kernel/drivers/virtio/virtio_mmio": [
      "kernel/drivers/virtio/virtio",
      "kernel/drivers/virtio/virtio_ring",
    ],
    "kernel/drivers/virtio/virtio_pci_modern_dev": [],
    "kernel/drivers/virtio/virtio_pci_legacy_dev": [],
    "kernel/drivers/virtio/virtio_pci": [
      "kernel/drivers/virtio/virtio_pci_legacy_dev",
      "kernel/drivers/virtio/virtio_pci_modern_dev",
      "kernel/drivers/virtio/virtio",
      "kernel/drivers/virtio/virtio_ring",
    ],
    "kernel/drivers/block/virtio_blk": ["kernel/drivers/virtio/virtio", "kernel/drivers/virtio/virtio_ring"],
    "kernel/net/core/failover": [],
    "kernel/drivers/net/net_failover": ["kernel/net/core/failover"],
    "kernel/drivers/net/virtio_net": [
      "kernel/drivers/net/net_failover",
      "kernel/net/core/failover",
      "kernel/drivers/virtio/virtio",
      "kernel/drivers/virtio/virtio_ring",
    ],
  };
  const lines: string[] = [];
  for (const [m, deps] of Object.entries(mods)) {
    const file = `${m}.ko${compression}`;
    lines.push(`${file}: ${deps.map((d) => `${d}.ko${compression}`).join(" ")}`.trimEnd());
    const abs = path.join(dir, file);
    fs.mkdirSync(path.dirname(abs), { recursive: true });
    const marker = Buffer.from(`module ${path.basename(m)}\n`);
    if (compression === "") fs.writeFileSync(abs, marker);
    else if (compression === ".gz") fs.writeFileSync(abs, zlib.gzipSync(marker));
    else {
      fs.writeFileSync(abs.slice(0, -compression.length), marker);
      const plain = abs.slice(0, -compression.length);
      // xz replaces its input by default; zstd keeps it unless told.
      execFileSync(
        compression === ".xz" ? "xz" : "zstd",
        compression === ".xz" ? ["-q", plain] : ["-q", "--rm", plain],
      );
    }
  }
  fs.writeFileSync(path.join(dir, "modules.dep"), `${lines.join("\n")}\n`);
  fs.writeFileSync(path.join(dir, "modules.builtin"), "kernel/fs/ext4/ext4.ko\n");
  return dir;
}

const hostKernel = await findHostKernel().catch(() => undefined);
const hasTool = (t: string) => spawnSync(t, ["--version"]).status === 0;

const EXPECTED_ORDER = [
  "virtio_ring",
  "virtio",
  "virtio_mmio",
  "virtio_pci_modern_dev",
  "virtio_pci_legacy_dev",
  "virtio_pci",
  "virtio_blk",
  "failover",
  "net_failover",
  "virtio_net",
];

function readInitramfs(file: string) {
  return parseCpio(zlib.gunzipSync(fs.readFileSync(file)));
}

describe("resolveLoadOrder", () => {
  it("puts every module after its dependencies, skipping built-ins", async () => {
    const index = await readModuleIndex(fakeModules(""));
    const names = resolveLoadOrder(index, [
      "virtio",
      "virtio_ring",
      "virtio-mmio",
      "virtio_pci",
      "virtio_blk",
      "virtio_net",
      "ext4",
    ]).map((m) => m.name);
    expect(names).toEqual(EXPECTED_ORDER);
  });

  it("names a module that is neither built in nor present, and who needs it", async () => {
    const dir = fakeModules("");
    fs.appendFileSync(path.join(dir, "modules.dep"), "kernel/x/needy.ko: kernel/x/ghost.ko\n");
    const index = await readModuleIndex(dir);
    expect(() => resolveLoadOrder(index, ["needy"])).toThrow(
      /ghost \(needed by needy\) is neither built into/,
    );
    expect(() => resolveLoadOrder(index, ["virtio_gpu"])).toThrow(FailedPreconditionError);
  });
});

describe("buildInitramfs", () => {
  it.each([
    ["uncompressed", ""],
    ["xz", ".xz"],
    ["gzip", ".gz"],
    ["zstd", ".zst"],
  ] as const)(
    "packs busybox, /init and the virtio modules (%s) in dependency order",
    async (tool, compression) => {
      if (tool === "xz" || tool === "zstd") expect(hasTool(tool), `${tool} is installed`).toBe(true);
      {
        const modulesDir = fakeModules(compression);
        const out = path.join(workdir(), "initrd.img");
        const r = await buildInitramfs({ modulesDir, out });
        expect(r.modules).toEqual(EXPECTED_ORDER);
        const bytes = fs.readFileSync(out);
        expect(r.sizeBytes).toBe(bytes.length);
        expect(r.sha256).toBe(`sha256:${createHash("sha256").update(bytes).digest("hex")}`);

        const entries = readInitramfs(out);
        const byPath = new Map(entries.map((e) => [e.path, e]));
        expect(byPath.get("bin/busybox")?.data.equals(fs.readFileSync("/bin/busybox"))).toBe(true);
        expect(byPath.get("bin/busybox")?.mode).toBe(0o755);
        expect(byPath.get("dev/console")).toMatchObject({ type: "char-device", rdevMajor: 5, rdevMinor: 1 });
        for (const m of EXPECTED_ORDER) {
          // Decompressed: busybox insmod gets plain object files.
          expect(byPath.get(`lib/modules/${m}.ko`)?.data.toString()).toBe(`module ${m}\n`);
        }
        const init = byPath.get("init");
        expect(init?.mode).toBe(0o755);
        const script = init!.data.toString();
        expect(script.startsWith("#!/bin/busybox sh\n")).toBe(true);
        expect(script).toContain(`for m in ${EXPECTED_ORDER.join(" ")}; do`);
        expect(script).toContain("switch_root /newroot");
        execFileSync("/bin/busybox", ["sh", "-n", "-c", script]);
      }
    },
  );

  it("is deterministic", async () => {
    const modulesDir = fakeModules("");
    const a = await buildInitramfs({ modulesDir, out: path.join(workdir(), "a") });
    const b = await buildInitramfs({ modulesDir, out: path.join(workdir(), "b") });
    expect(a.sha256).toBe(b.sha256);
  });

  it("refuses a dynamically linked busybox and a kernel without modules", async () => {
    const modulesDir = fakeModules("");
    const out = path.join(workdir(), "x");
    await expect(buildInitramfs({ modulesDir, out, busybox: "/usr/bin/ls" })).rejects.toThrow(
      /install busybox-static/,
    );
    await expect(buildInitramfs({ modulesDir: workdir(), out })).rejects.toThrow(/modules.dep/);
    expect(fs.existsSync(out)).toBe(false);
  });

  // Needs linux-image-cloud-amd64 (scripts/setup-system.sh installs it); the fake kernels above cover the rest.
  it.skipIf(!hostKernel)(
    "builds from the host's kernel, and GNU cpio lists the modules and /init",
    async () => {
      const kernel = hostKernel!;
      const out = path.join(workdir(), "initrd.img");
      const r = await buildInitramfs({ modulesDir: kernel.modulesDir, out });
      expect(r.modules).toEqual(
        expect.arrayContaining(["virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "virtio_net"]),
      );
      expect(r.modules.indexOf("virtio_ring")).toBeLessThan(r.modules.indexOf("virtio"));
      expect(r.modules.indexOf("virtio")).toBeLessThan(r.modules.indexOf("virtio_blk"));
      expect(r.sizeBytes).toBeLessThan(4 << 20);
      if (hasTool("cpio")) {
        const listing = execFileSync("sh", ["-c", `gzip -dc "${out}" | cpio -t --quiet`], {
          encoding: "utf8",
        });
        expect(listing.split("\n")).toEqual(
          expect.arrayContaining(["init", "bin/busybox", ...r.modules.map((m) => `lib/modules/${m}.ko`)]),
        );
      }
    },
  );
});
