import { createHash } from "node:crypto";
import fs from "node:fs/promises";
import path from "node:path";
import { InvalidArgumentError } from "@kiln/kit";

/**
 * Firecracker's jailer (docs/jailer.md): it creates `<chroot-base>/<exec-file-name>/<id>/root`,
 * copies the firecracker binary in, places the process in its cgroups, joins the network
 * namespace, pivots into the chroot, drops to the given uid/gid and execs firecracker. Everything
 * the VM needs (kernel, disk, log files) must be linked into the chroot beforehand, readable and
 * writable by that uid; paths given to the API are then paths inside the chroot.
 */
export interface JailerOptions {
  /** Firecracker's --id: alphanumerics and hyphens, ≤ 64 chars (see jailerId). */
  id: string;
  execFile: string;
  uid: number;
  gid: number;
  chrootBaseDir: string;
  netns?: string;
  /** cgroup v1 path under which the jailer creates `<id>`; only with `cgroups`. */
  parentCgroup?: string;
  /** `<cgroup file>=<value>` settings; the jailer creates the cgroup in each file's controller. */
  cgroups: Array<{ file: string; value: string }>;
  /** Arguments for firecracker itself (after `--`). */
  firecrackerArgs: string[];
}

const JAILER_ID = /^[A-Za-z0-9-]{1,64}$/;

/**
 * Firecracker's id for a VM. Kiln ids (`vm_…`) have an underscore the jailer refuses, so any id
 * that is not already valid becomes its valid characters plus a hash of the original, which keeps
 * two ids that differ only in such characters apart.
 */
export function jailerId(vmId: string): string {
  if (JAILER_ID.test(vmId)) return vmId;
  const hash = createHash("sha256").update(vmId).digest("hex").slice(0, 8);
  const clean = vmId.replace(/[^A-Za-z0-9-]/g, "-").slice(0, 55);
  return `${clean}-${hash}`;
}

/** The jailer's command line (after the jailer binary). */
export function jailerArgs(o: JailerOptions): string[] {
  if (!JAILER_ID.test(o.id)) {
    throw new InvalidArgumentError(
      `jailer id ${JSON.stringify(o.id)} must be 1–64 letters, digits or hyphens`,
      {
        field: "vmId",
      },
    );
  }
  if (!path.basename(o.execFile).includes("firecracker")) {
    throw new InvalidArgumentError(
      `the jailer only runs a binary whose name contains "firecracker" (got ${o.execFile})`,
      {
        field: "firecrackerBinary",
      },
    );
  }
  for (const [k, v] of [
    ["uid", o.uid],
    ["gid", o.gid],
  ] as const) {
    if (!Number.isInteger(v) || v <= 0 || v > 0xfffffffe) {
      throw new InvalidArgumentError(`jailer ${k} ${v} must be a non-root id`, { field: k });
    }
  }
  for (const c of o.cgroups) {
    if (!/^[a-z_]+\.[a-z_.]+$/.test(c.file) || /[\s=]/.test(c.value) || c.value === "") {
      throw new InvalidArgumentError(
        `cgroup setting ${c.file}=${c.value} is not <controller>.<file>=<value>`,
        {
          field: "cgroups",
        },
      );
    }
  }
  const args = [
    "--id",
    o.id,
    "--exec-file",
    o.execFile,
    "--uid",
    String(o.uid),
    "--gid",
    String(o.gid),
    "--chroot-base-dir",
    o.chrootBaseDir,
  ];
  if (o.netns !== undefined) args.push("--netns", o.netns);
  if (o.cgroups.length > 0) {
    args.push("--cgroup-version", "1");
    if (o.parentCgroup !== undefined) args.push("--parent-cgroup", o.parentCgroup);
    for (const c of o.cgroups) args.push("--cgroup", `${c.file}=${c.value}`);
  }
  args.push("--daemonize", "--", ...o.firecrackerArgs);
  return args;
}

/** Where the jailer builds the chroot for `id` (`<base>/<exec-file-name>/<id>/root`). */
export function chrootDir(chrootBaseDir: string, execFile: string, id: string): string {
  return path.join(chrootBaseDir, path.basename(execFile), id, "root");
}

/** Paths inside the chroot (as Firecracker sees them) of what Kiln puts there. */
export const JAILED = {
  apiSocket: "/api.sock",
  kernel: "/vmlinux",
  initrd: "/initrd.img",
  rootfs: "/rootfs.ext4",
  console: "/console.log",
  log: "/firecracker.log",
  metrics: "/metrics.json",
} as const;

/**
 * Links a host file into the chroot. Shared read-only assets (kernel, initrd) are hard-linked
 * and stay as they are (they must be world-readable); `own` files (the VM's disk, its logs)
 * are handed to the jail's uid/gid. Falls back to a copy across filesystems.
 */
export async function linkIntoChroot(
  chroot: string,
  hostFile: string,
  jailedPath: string,
  owner?: { uid: number; gid: number; mode: number },
): Promise<string> {
  const target = path.join(chroot, jailedPath);
  await fs.mkdir(path.dirname(target), { recursive: true });
  await fs.rm(target, { force: true });
  try {
    await fs.link(hostFile, target);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EXDEV") throw err;
    await fs.copyFile(hostFile, target, fs.constants.COPYFILE_FICLONE);
  }
  if (owner) {
    await fs.chown(target, owner.uid, owner.gid);
    await fs.chmod(target, owner.mode);
  } else {
    const st = await fs.stat(target);
    if ((st.mode & 0o004) === 0) {
      // Not readable by the jail's uid: give the VM its own readable copy instead.
      await fs.rm(target, { force: true });
      await fs.copyFile(hostFile, target);
      await fs.chmod(target, 0o444);
    }
  }
  return target;
}

/** An empty file in the chroot owned by the jail (Firecracker opens, never creates, its log and metrics files). */
export async function ownedFileInChroot(
  chroot: string,
  jailedPath: string,
  owner: { uid: number; gid: number },
): Promise<string> {
  const target = path.join(chroot, jailedPath);
  await fs.mkdir(path.dirname(target), { recursive: true });
  await fs.writeFile(target, "", { mode: 0o600 });
  await fs.chown(target, owner.uid, owner.gid);
  return target;
}
