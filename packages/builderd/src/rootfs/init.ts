import fs from "node:fs/promises";
import path from "node:path";
import { FailedPreconditionError, resolveImageUser } from "@kiln/kit";
import { KILN_DIR, renderInitScript, type WorkloadSpec, workloadArgv } from "./run-script.js";

export type { WorkloadSpec } from "./run-script.js";

export const DEFAULT_TINI = "/usr/bin/tini-static";
export const DEFAULT_BUSYBOX = "/bin/busybox";

/**
 * Makes a rootfs bootable as a microVM: writes /.kiln/{tini,busybox,init,workload.json}. The
 * kernel (through the initramfs' switch_root) runs /.kiln/init, which sets up the machine and
 * runs the workload (see renderInitScript). /.kiln is Kiln's: whatever the image had there is
 * replaced. The workload's user is resolved through the image's /etc/passwd and /etc/group now,
 * so a missing user fails the build rather than the boot.
 */
export async function injectInit(
  rootfs: string,
  spec: WorkloadSpec,
  opts: { tiniPath?: string; busyboxPath?: string } = {},
): Promise<void> {
  workloadArgv(spec); // fail early on an empty command
  const ids = await resolveImageUser(rootfs, spec.user, "config.target.microvm_rootfs.runtime_config.user");
  const script = renderInitScript({ ...spec, user: `${ids.uid}:${ids.gid}` });

  const dir = path.join(rootfs, KILN_DIR);
  // fs.rm never follows symlinks: an image's /.kiln → /somewhere link is removed, not traversed.
  await fs.rm(dir, { recursive: true, force: true });
  await fs.mkdir(dir, { mode: 0o755 });
  await ownByRoot(dir);
  await fs.chmod(dir, 0o755);
  await copyStaticBinary(opts.tiniPath ?? DEFAULT_TINI, path.join(dir, "tini"), "tini-static");
  await copyStaticBinary(opts.busyboxPath ?? DEFAULT_BUSYBOX, path.join(dir, "busybox"), "busybox-static");
  await writeOwned(path.join(dir, "init"), script, 0o755);
  const description = { ...spec, resolvedUser: ids, init: `${KILN_DIR}/init` };
  await writeOwned(path.join(dir, "workload.json"), `${JSON.stringify(description, null, 2)}\n`, 0o644);

  // Mount points the initramfs and the init use; created only where the image has nothing.
  for (const d of ["proc", "sys", "dev", "run"]) {
    await fs.mkdir(path.join(rootfs, d), { mode: 0o755 }).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== "EEXIST") throw err;
    });
  }
}

async function copyStaticBinary(from: string, to: string, pkg: string): Promise<void> {
  let head: Buffer;
  try {
    const fh = await fs.open(from, "r");
    try {
      const st = await fh.stat();
      head = Buffer.alloc(Math.min(st.size, 64 * 1024));
      await fh.read(head, 0, head.length, 0);
    } finally {
      await fh.close();
    }
  } catch (err) {
    throw new FailedPreconditionError(`cannot read ${from}: install the ${pkg} package`, { cause: err });
  }
  if (!isStaticElf(head)) {
    throw new FailedPreconditionError(
      `${from} is not a statically linked executable, so it cannot run inside arbitrary images: install ${pkg}`,
    );
  }
  await fs.copyFile(from, to);
  await ownByRoot(to);
  await fs.chmod(to, 0o755);
}

async function writeOwned(file: string, content: string, mode: number): Promise<void> {
  await fs.writeFile(file, content, { mode, flag: "wx" });
  await ownByRoot(file);
  await fs.chmod(file, mode);
}

/** The image's files carry the ids they will have in the VM; ours are root's (when we can say so). */
async function ownByRoot(file: string): Promise<void> {
  if (process.getuid?.() === 0) await fs.chown(file, 0, 0);
}

/** An ELF64 little-endian file whose program headers (within `buf`) include no PT_INTERP. */
function isStaticElf(buf: Buffer): boolean {
  if (buf.length < 64 || buf.readUInt32BE(0) !== 0x7f454c46 || buf[4] !== 2 || buf[5] !== 1) return false;
  const phoff = Number(buf.readBigUInt64LE(0x20));
  const phentsize = buf.readUInt16LE(0x36);
  const phnum = buf.readUInt16LE(0x38);
  for (let i = 0; i < phnum; i++) {
    const off = phoff + i * phentsize;
    if (off + 4 > buf.length) return false;
    if (buf.readUInt32LE(off) === 3) return false;
  }
  return true;
}
