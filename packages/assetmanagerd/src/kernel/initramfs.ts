import { createHash } from "node:crypto";
import fs from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import zlib from "node:zlib";
import { FailedPreconditionError } from "@kiln/kit";
import { type CpioEntry, writeCpio } from "./cpio.js";
import { renderInitramfsInit } from "./initramfs-init.js";
import { readModule, readModuleIndex, resolveLoadOrder } from "./modules.js";

const gzip = promisify(zlib.gzip);

/**
 * What a QEMU microvm needs before it can see its disk and network: virtio over MMIO (microvm's
 * transport), PCI (for machines that use it), the block and net drivers. Their own dependencies
 * (virtio_ring, net_failover, …) come from modules.dep.
 */
export const VIRTIO_MODULES = [
  "virtio",
  "virtio_ring",
  "virtio_mmio",
  "virtio_pci",
  "virtio_blk",
  "virtio_net",
];

export interface InitramfsOptions {
  /** `/lib/modules/<version>` of the kernel the initramfs is for. */
  modulesDir: string;
  /** A statically linked busybox (Debian: busybox-static). Default /bin/busybox. */
  busybox?: string;
  /** Where to write the gzip-compressed cpio archive (written atomically). */
  out: string;
  /** Modules to load instead of VIRTIO_MODULES (dependencies are added). */
  modules?: string[];
}

/**
 * Builds a small initramfs (gzip'd newc cpio): busybox, the virtio modules in dependency order
 * and an /init that loads them, mounts root=/dev/vda and switch_root's to /.kiln/init (see
 * initramfs-init.ts). Deterministic: the same kernel and busybox give the same bytes.
 */
export async function buildInitramfs(
  opts: InitramfsOptions,
): Promise<{ sizeBytes: number; sha256: string; modules: string[] }> {
  const busyboxPath = opts.busybox ?? "/bin/busybox";
  const busybox = await fs.readFile(busyboxPath).catch((err: unknown) => {
    throw new FailedPreconditionError(
      `cannot read busybox at ${busyboxPath}: install the busybox-static package`,
      { cause: err },
    );
  });
  if (!isStaticElf(busybox)) {
    throw new FailedPreconditionError(
      `${busyboxPath} is not a statically linked executable: the initramfs has no libc, install busybox-static`,
    );
  }

  const index = await readModuleIndex(opts.modulesDir);
  const order = resolveLoadOrder(index, opts.modules ?? VIRTIO_MODULES);
  const names = order.map((m) => m.name);

  const entries: CpioEntry[] = [
    { type: "dir", path: "bin" },
    { type: "dir", path: "dev" },
    // The kernel opens /dev/console for /init's stdio before anything is mounted.
    { type: "char-device", path: "dev/console", major: 5, minor: 1, mode: 0o600 },
    { type: "dir", path: "lib" },
    { type: "dir", path: "lib/modules" },
    { type: "dir", path: "newroot" },
    { type: "dir", path: "proc" },
    { type: "dir", path: "sys" },
    { type: "file", path: "bin/busybox", data: busybox, mode: 0o755 },
    { type: "symlink", path: "bin/sh", target: "busybox" },
    { type: "file", path: "init", data: Buffer.from(renderInitramfsInit(names)), mode: 0o755 },
  ];
  for (const m of order) {
    entries.push({
      type: "file",
      path: `lib/modules/${m.name}.ko`,
      data: await readModule(opts.modulesDir, m),
    });
  }
  const archive = await gzip(writeCpio(entries), { level: 9 });

  await fs.mkdir(path.dirname(opts.out), { recursive: true });
  const tmp = `${opts.out}.tmp-${process.pid}`;
  try {
    await fs.writeFile(tmp, archive);
    await fs.rename(tmp, opts.out);
  } catch (err) {
    await fs.rm(tmp, { force: true });
    throw err;
  }
  return {
    sizeBytes: archive.length,
    sha256: `sha256:${createHash("sha256").update(archive).digest("hex")}`,
    modules: names,
  };
}

/** An x86-64/ELF64 little-endian executable without a PT_INTERP program header. */
export function isStaticElf(buf: Buffer): boolean {
  if (buf.length < 64 || buf.readUInt32BE(0) !== 0x7f454c46 || buf[4] !== 2 || buf[5] !== 1) return false;
  const phoff = Number(buf.readBigUInt64LE(0x20));
  const phentsize = buf.readUInt16LE(0x36);
  const phnum = buf.readUInt16LE(0x38);
  for (let i = 0; i < phnum; i++) {
    const off = phoff + i * phentsize;
    if (off + 4 > buf.length) return false;
    if (buf.readUInt32LE(off) === 3) return false; // PT_INTERP: needs a dynamic loader
  }
  return true;
}
