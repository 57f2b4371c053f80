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
function decodeMountPath(s: string): string {
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
 * Mounts the overlay of `paths.lower` (an image mounted with mountImage or mountSharedImage)
 * unless already mounted (idempotent: boot after a host reboot mounts it again).
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

/**
 * Base images shared between VMs: one read-only loop mount per image file under `imagesDir`,
 * named for the file's device and inode — the VM directories' hard links to one stored blob are
 * one inode, so every VM of an image shares the mount (one mount command less per VM, and the
 * image's files are cached once, not once per VM). The kernel's mount table is the reference
 * count: a shared mount goes with the last overlay over it. Mounting and unmounting an image's
 * overlays hold a per-image lock, so an image is never unmounted between another VM's image
 * check and its overlay mount. Returns the shared lower directory.
 */
export async function mountOverlayOnSharedImage(
  imagesDir: string,
  image: string,
  paths: Omit<OverlayPaths, "lower">,
): Promise<string> {
  const existing = await overlayLower(paths.merged);
  if (existing) return existing; // mounted already (boot after create, reboot)
  const st = await fs.stat(image);
  const lower = path.join(path.resolve(imagesDir), `${st.dev}-${st.ino}`);
  clearTimeout(lingering.get(lower));
  lingering.delete(lower);
  await imageLock(lower, async () => {
    await mountImage(image, lower);
    await mountOverlay({ ...paths, lower });
  });
  return lower;
}

/**
 * Unmounts the overlay at `merged`. A shared image no overlay uses any more is unmounted too —
 * after `lingerMs` (kept meanwhile for the next VM of the image: re-creating or scaling a
 * deployment back up skips the loop mount), or at once with 0. Images a crash left mounted
 * without overlays go as well. Idempotent.
 */
export async function unmountSharedOverlay(imagesDir: string, merged: string, lingerMs = 0): Promise<void> {
  const lower = await overlayLower(merged);
  if (lower) await imageLock(lower, () => unmountUnder(merged));
  await releaseUnusedImages(imagesDir, { keep: lingerMs > 0 ? lower : undefined });
  if (lower && lingerMs > 0 && path.dirname(lower) === path.resolve(imagesDir)) {
    clearTimeout(lingering.get(lower));
    const timer = setTimeout(() => {
      lingering.delete(lower);
      void releaseImage(lower).catch(() => undefined);
    }, lingerMs);
    timer.unref();
    lingering.set(lower, timer);
  }
}

/** Shared images kept mounted after their last overlay, until their timer releases them. */
const lingering = new Map<string, NodeJS.Timeout>();

/** Unmounts every lingering shared image no overlay uses now (metald stopping). */
export async function releaseLingeringImages(): Promise<void> {
  const lowers = [...lingering.keys()];
  for (const lower of lowers) clearTimeout(lingering.get(lower));
  lingering.clear();
  for (const lower of lowers) await releaseImage(lower).catch(() => undefined);
}

/** Unmounts the shared images no overlay uses, except lingering ones and `keep`. */
export async function releaseUnusedImages(imagesDir: string, opts: { keep?: string } = {}): Promise<void> {
  const names = await fs.readdir(imagesDir).catch(() => [] as string[]);
  for (const name of names) {
    const lower = path.join(path.resolve(imagesDir), name);
    if (lower === opts.keep || lingering.has(lower)) continue;
    await releaseImage(lower);
  }
}

async function releaseImage(lower: string): Promise<void> {
  await imageLock(lower, async () => {
    if ((await overlaysOver(lower)).length > 0) return;
    await unmountUnder(lower);
    await fs.rmdir(lower).catch(() => undefined);
  });
}

/** The lower directory of the overlay mounted at `merged`, if one is. */
export async function overlayLower(merged: string): Promise<string | undefined> {
  const target = path.resolve(merged);
  for (const m of await overlayMounts()) if (m.mountPoint === target) return m.lower;
  return undefined;
}

/** Mount points of the overlays whose lower directory is `lower`. */
async function overlaysOver(lower: string): Promise<string[]> {
  const want = path.resolve(lower);
  return (await overlayMounts()).filter((m) => m.lower === want).map((m) => m.mountPoint);
}

async function overlayMounts(): Promise<Array<{ mountPoint: string; lower: string }>> {
  const text = await fs.readFile("/proc/self/mountinfo", "utf8");
  const found: Array<{ mountPoint: string; lower: string }> = [];
  for (const line of text.split("\n")) {
    // <id> <parent> <maj:min> <root> <mount point> <options> [optional…] - <fstype> <source> <super options>
    const [before, after] = line.split(" - ");
    const [fstype, , superOptions] = after?.split(" ") ?? [];
    if (fstype !== "overlay" || !before || !superOptions) continue;
    const lower = /(?:^|,)lowerdir=([^,]*)/.exec(superOptions)?.[1];
    const mountPoint = before.split(" ")[4];
    if (lower && mountPoint)
      found.push({ mountPoint: decodeMountPath(mountPoint), lower: decodeMountPath(lower) });
  }
  return found;
}

/** One mount or unmount of a shared image at a time in this process. */
const imageLocks = new Map<string, Promise<unknown>>();

function imageLock<T>(key: string, fn: () => Promise<T>): Promise<T> {
  const prev = imageLocks.get(key) ?? Promise.resolve();
  const next = prev.then(fn, fn);
  const tail = next.catch(() => undefined);
  imageLocks.set(key, tail);
  void tail.then(() => {
    if (imageLocks.get(key) === tail) imageLocks.delete(key);
  });
  return next;
}
