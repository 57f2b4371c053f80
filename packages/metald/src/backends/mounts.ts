import fs from "node:fs/promises";
import path from "node:path";
import { InvalidArgumentError } from "@kiln/kit";
import { runCommand } from "./command.js";

/**
 * The container backends' writable layer: the shared base image loop-mounted read-only
 * (`ro,noload`: ext4 replays no journal, so not one byte of the image is written) and an overlayfs
 * whose upper and work directories live in the VM's directory. The loop device is created with
 * autoclear, so unmounting the lower mount releases it.
 */
export interface OverlayPaths {
  /** Mount point of the read-only base image. */
  lower: string;
  upper: string;
  work: string;
  /** Mount point of the VM's writable root. */
  merged: string;
}

/** Mount points at or below `dir`, deepest first, from /proc/self/mountinfo. */
export async function mountsUnder(dir: string): Promise<string[]> {
  const text = await fs.readFile("/proc/self/mountinfo", "utf8");
  const prefix = path.resolve(dir);
  const found: string[] = [];
  for (const line of text.split("\n")) {
    const mountPoint = line.split(" ")[4];
    if (mountPoint === undefined) continue;
    const p = decodeMountPath(mountPoint);
    if (p === prefix || p.startsWith(`${prefix}/`)) found.push(p);
  }
  // Later (and deeper) mounts first, so stacked and nested mounts come off in order.
  return found.reverse().sort((a, b) => b.split("/").length - a.split("/").length);
}

export async function isMountPoint(p: string): Promise<boolean> {
  return (await mountsUnder(p)).includes(path.resolve(p));
}

/** mountinfo escapes space, tab, newline and backslash as \ooo. */
export function decodeMountPath(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(Number.parseInt(oct, 8)));
}

/** Unmounts everything at or below `dir`; a busy mount is detached lazily rather than left behind. */
export async function unmountUnder(dir: string): Promise<void> {
  for (let pass = 0; pass < 4; pass++) {
    const mounts = await mountsUnder(dir);
    if (mounts.length === 0) return;
    for (const m of mounts) {
      await runCommand("umount", [m], { tolerate: /not mounted|no mount point|not found/ }).catch(() =>
        runCommand("umount", ["-l", m], { tolerate: /not mounted|no mount point|not found/ }),
      );
    }
  }
  const left = await mountsUnder(dir);
  if (left.length > 0) throw new Error(`cannot unmount ${left.join(", ")}`);
}

/** Overlay options are comma- and colon-separated: paths containing either cannot be expressed. */
function checkOptionPath(p: string, field: string): void {
  if (/[,:\n\\]/.test(p)) {
    throw new InvalidArgumentError(
      `${field} ${JSON.stringify(p)} contains a comma, colon, newline or backslash, which overlayfs options cannot carry; use a plainer directory name`,
      { field },
    );
  }
}

/** Loop-mounts an ext4 image read-only at `at` unless something is mounted there already. */
export async function mountImage(image: string, at: string): Promise<void> {
  await fs.mkdir(at, { recursive: true });
  if (!(await isMountPoint(at))) {
    await runCommand("mount", ["-t", "ext4", "-o", "loop,ro,noload,nodev", image, at]);
  }
}

/**
 * Mounts the overlay of `paths.lower` (an image mounted with mountImage, or a shared image:
 * shared-images.ts) unless already mounted (idempotent: boot after a host reboot mounts it again).
 */
export async function mountOverlay(paths: OverlayPaths): Promise<void> {
  for (const [k, p] of Object.entries(paths)) checkOptionPath(p, `spec.dir (${k})`);
  for (const p of [paths.upper, paths.work, paths.merged]) await fs.mkdir(p, { recursive: true });
  if (!(await isMountPoint(paths.merged))) {
    await runCommand("mount", [
      "-t",
      "overlay",
      "overlay",
      "-o",
      `lowerdir=${paths.lower},upperdir=${paths.upper},workdir=${paths.work}`,
      paths.merged,
    ]);
  }
}
