import fs from "node:fs/promises";
import path from "node:path";
import { buildInitramfs, findHostKernel } from "@kiln/assetmanagerd";

/**
 * The guest kernel VM backends boot when a VM names no kernel asset: the host's
 * linux-image-cloud-amd64 kernel plus Kiln's initramfs (virtio modules, switch_root to
 * /dev/vda), built once per kernel version under `<dir>/<version>/`.
 */
export function createHostKernel(dir: string): () => Promise<{ kernel: string; initrd: string }> {
  let pending: Promise<{ kernel: string; initrd: string }> | undefined;
  return () => {
    pending ??= (async () => {
      const host = await findHostKernel();
      const out = path.join(dir, host.version);
      const initrd = path.join(out, "initrd.img");
      try {
        await fs.access(initrd);
      } catch {
        await fs.mkdir(out, { recursive: true });
        const tmp = `${initrd}.tmp-${process.pid}`;
        await buildInitramfs({ modulesDir: host.modulesDir, out: tmp });
        await fs.rename(tmp, initrd);
      }
      return { kernel: host.vmlinuz, initrd };
    })().catch((err) => {
      pending = undefined; // let a later VM try again (e.g. after the package is installed)
      throw err;
    });
    return pending;
  };
}
