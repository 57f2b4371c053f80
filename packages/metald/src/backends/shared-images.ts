import fs from "node:fs/promises";
import path from "node:path";
import { createKeyedLock } from "@kiln/kit";
import { decodeMountPath, mountImage, mountOverlay, type OverlayPaths, unmountUnder } from "./mounts.js";

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
const imageLock = createKeyedLock();
