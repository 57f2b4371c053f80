import fs from "node:fs/promises";
import path from "node:path";
import { FailedPreconditionError, NotFoundError } from "@kiln/kit";

export interface HostKernel {
  version: string;
  /** The bzImage QEMU boots with `-kernel`. */
  vmlinuz: string;
  /** `/lib/modules/<version>`: where the virtio modules for the initramfs come from. */
  modulesDir: string;
}

const CLOUD_SUFFIX = "-cloud-amd64";
const INSTALL_HINT =
  "install the Debian package linux-image-cloud-amd64 (apt-get install linux-image-cloud-amd64)";

/**
 * Finds a host kernel to boot VMs with: `/boot/vmlinuz-<version>` with its modules in
 * `/lib/modules/<version>`. Debian's cloud kernel (`*-cloud-amd64`) is preferred because it is
 * small and has what a VM needs; among candidates the newest version wins.
 */
export async function findHostKernel(
  opts: { version?: string; bootDir?: string; modulesRoot?: string } = {},
): Promise<HostKernel> {
  const bootDir = opts.bootDir ?? "/boot";
  const modulesRoot = opts.modulesRoot ?? "/lib/modules";
  const withModules = async (version: string): Promise<HostKernel | undefined> => {
    const modulesDir = path.join(modulesRoot, version);
    const ok = await fs.stat(path.join(modulesDir, "modules.dep")).then(
      (s) => s.isFile(),
      () => false,
    );
    return ok ? { version, vmlinuz: path.join(bootDir, `vmlinuz-${version}`), modulesDir } : undefined;
  };

  if (opts.version !== undefined) {
    if (!/^[A-Za-z0-9._+-]+$/.test(opts.version)) {
      throw new NotFoundError(`kernel version ${JSON.stringify(opts.version)} is not a valid version string`);
    }
    const vmlinuz = path.join(bootDir, `vmlinuz-${opts.version}`);
    if (!(await isFile(vmlinuz))) {
      throw new NotFoundError(
        `kernel ${vmlinuz} does not exist; ${INSTALL_HINT}, or pick one of: ${(await versionsIn(bootDir)).join(", ") || "(none)"}`,
      );
    }
    const k = await withModules(opts.version);
    if (!k) {
      throw new FailedPreconditionError(
        `kernel ${opts.version} has no modules in ${path.join(modulesRoot, opts.version)} (modules.dep missing); reinstall its package`,
      );
    }
    return k;
  }

  const versions = await versionsIn(bootDir);
  const ranked = [...versions].sort((a, b) => {
    const cloud = Number(b.endsWith(CLOUD_SUFFIX)) - Number(a.endsWith(CLOUD_SUFFIX));
    return cloud !== 0 ? cloud : compareVersions(b, a);
  });
  for (const v of ranked) {
    const k = await withModules(v);
    if (k) return k;
  }
  throw new FailedPreconditionError(
    versions.length === 0
      ? `no kernel found in ${bootDir} (no vmlinuz-*); ${INSTALL_HINT}`
      : `no kernel in ${bootDir} has its modules in ${modulesRoot} (found ${versions.join(", ")}); ${INSTALL_HINT}`,
  );
}

async function versionsIn(bootDir: string): Promise<string[]> {
  const names = await fs.readdir(bootDir).catch(() => [] as string[]);
  const out: string[] = [];
  for (const n of names) {
    if (n.startsWith("vmlinuz-") && (await isFile(path.join(bootDir, n))))
      out.push(n.slice("vmlinuz-".length));
  }
  return out;
}

async function isFile(p: string): Promise<boolean> {
  return fs.stat(p).then(
    (s) => s.isFile(),
    () => false,
  );
}

/** Compares "6.1.0-56-cloud-amd64"-style versions numerically, part by part. */
export function compareVersions(a: string, b: string): number {
  const pa = a.split(/[.-]/);
  const pb = b.split(/[.-]/);
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const x = pa[i] ?? "";
    const y = pb[i] ?? "";
    const nx = /^\d+$/.test(x) ? Number(x) : Number.NaN;
    const ny = /^\d+$/.test(y) ? Number(y) : Number.NaN;
    const c = !Number.isNaN(nx) && !Number.isNaN(ny) ? nx - ny : x < y ? -1 : x > y ? 1 : 0;
    if (c !== 0) return c;
  }
  return 0;
}
