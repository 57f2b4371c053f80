import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { InvalidArgumentError } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, describe, expect, it } from "vitest";
import { isMountPoint, mountImage, mountOverlay, mountsUnder, unmountUnder } from "./mounts.js";
import { mountOverlayOnSharedImage, releaseLingeringImages, unmountSharedOverlay } from "./shared-images.js";

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function dir(): string {
  const d = tempDir("kiln-mnt-");
  cleanups.push(() => d.remove());
  cleanups.push(() => unmountUnder(d.path));
  return d.path;
}

/** mounts.ts, and the shared image mounts built on it (shared-images.ts). */
describe("mounts", () => {
  it("finds mounts below a directory (names with spaces too) and unmounts them deepest first", async () => {
    const d = dir();
    const outer = path.join(d, "a b");
    const inner = path.join(outer, "c");
    fs.mkdirSync(outer);
    execFileSync("mount", ["-t", "tmpfs", "tmpfs", outer]);
    fs.mkdirSync(inner);
    execFileSync("mount", ["-t", "tmpfs", "tmpfs", inner]);
    expect(await mountsUnder(d)).toEqual([inner, outer]);
    expect(await isMountPoint(outer)).toBe(true);
    expect(await isMountPoint(d)).toBe(false);
    await unmountUnder(d);
    expect(await mountsUnder(d)).toEqual([]);
  });

  function makeImage(d: string): string {
    const src = path.join(d, "src");
    fs.mkdirSync(path.join(src, "etc"), { recursive: true });
    fs.writeFileSync(path.join(src, "etc/hostname"), "base\n");
    const image = path.join(d, "base.ext4");
    fs.writeFileSync(image, "");
    fs.truncateSync(image, 8 << 20);
    execFileSync("mkfs.ext4", ["-q", "-F", "-d", src, image]);
    return image;
  }

  const loopDevices = (image: string) =>
    execFileSync("losetup", ["-j", image], { encoding: "utf8" }).trim().split("\n").filter(Boolean);

  it("overlays a writable layer on a read-only image without touching the image", async () => {
    const d = dir();
    const image = makeImage(d);
    const before = fs.readFileSync(image);
    const paths = {
      lower: path.join(d, "vm/lower"),
      upper: path.join(d, "vm/upper"),
      work: path.join(d, "vm/work"),
      merged: path.join(d, "vm/rootfs"),
    };
    for (let i = 0; i < 2; i++) {
      // idempotent
      await mountImage(image, paths.lower);
      await mountOverlay(paths);
    }
    expect((await mountsUnder(path.join(d, "vm"))).length).toBe(2);
    fs.writeFileSync(path.join(paths.merged, "etc/hostname"), "vm\n");
    expect(fs.readFileSync(path.join(paths.upper, "etc/hostname"), "utf8")).toBe("vm\n");
    expect(fs.readFileSync(path.join(paths.lower, "etc/hostname"), "utf8")).toBe("base\n");
    expect(() => fs.writeFileSync(path.join(paths.lower, "x"), "")).toThrow(/EROFS|read-only/);
    await unmountUnder(path.join(d, "vm"));
    expect(loopDevices(image)).toEqual([]);
    expect(fs.readFileSync(image).equals(before)).toBe(true);
  });

  it("shares one read-only mount of an image between VMs and unmounts it with the last one", async () => {
    const d = dir();
    const image = makeImage(d);
    const images = path.join(d, ".images");
    // Two VMs whose rootfs files are hard links to one blob, as PrepareAssets places them.
    const vms = ["vm1", "vm2"].map((vm) => {
      fs.mkdirSync(path.join(d, vm));
      fs.linkSync(image, path.join(d, vm, "rootfs.ext4"));
      return {
        rootfs: path.join(d, vm, "rootfs.ext4"),
        paths: {
          upper: path.join(d, vm, "upper"),
          work: path.join(d, vm, "work"),
          merged: path.join(d, vm, "rootfs"),
        },
      };
    });
    const lowers = await Promise.all(vms.map((vm) => mountOverlayOnSharedImage(images, vm.rootfs, vm.paths)));
    expect(lowers[0]).toBe(lowers[1]);
    expect(await mountOverlayOnSharedImage(images, vms[0]!.rootfs, vms[0]!.paths)).toBe(lowers[0]); // idempotent
    expect(loopDevices(image)).toHaveLength(1);
    fs.writeFileSync(path.join(vms[0]!.paths.merged, "etc/hostname"), "vm1\n");
    expect(fs.readFileSync(path.join(vms[1]!.paths.merged, "etc/hostname"), "utf8")).toBe("base\n");

    await unmountSharedOverlay(images, vms[0]!.paths.merged);
    expect(await isMountPoint(vms[0]!.paths.merged)).toBe(false);
    expect(await isMountPoint(lowers[0]!)).toBe(true); // vm2 still runs on it
    expect(fs.readFileSync(path.join(vms[1]!.paths.merged, "etc/hostname"), "utf8")).toBe("base\n");

    await unmountSharedOverlay(images, vms[1]!.paths.merged);
    await unmountSharedOverlay(images, vms[1]!.paths.merged); // idempotent
    expect(await mountsUnder(d)).toEqual([]);
    expect(fs.readdirSync(images)).toEqual([]);
    expect(loopDevices(image)).toEqual([]);
  });

  it("keeps a shared image mounted for the linger time after its last overlay, for the next VM", async () => {
    const d = dir();
    const image = makeImage(d);
    const images = path.join(d, ".images");
    const vm = (name: string) => ({
      upper: `${d}/${name}/upper`,
      work: `${d}/${name}/work`,
      merged: `${d}/${name}/rootfs`,
    });
    const lower = await mountOverlayOnSharedImage(images, image, vm("a"));
    await unmountSharedOverlay(images, vm("a").merged, 60_000);
    expect(await isMountPoint(lower)).toBe(true); // lingering, no overlay over it
    expect(await mountOverlayOnSharedImage(images, image, vm("b"))).toBe(lower); // reused
    expect(loopDevices(image)).toHaveLength(1);

    await unmountSharedOverlay(images, vm("b").merged, 100);
    expect(await isMountPoint(lower)).toBe(true);
    for (let i = 0; i < 100 && (await isMountPoint(lower)); i++) await new Promise((r) => setTimeout(r, 50));
    expect(await isMountPoint(lower)).toBe(false); // the timer released it
    expect(loopDevices(image)).toEqual([]);

    await mountOverlayOnSharedImage(images, image, vm("c"));
    await unmountSharedOverlay(images, vm("c").merged, 60_000);
    await releaseLingeringImages(); // metald stopping
    expect(await mountsUnder(d)).toEqual([]);
  });

  it("releases a shared image a crash left mounted without overlays", async () => {
    const d = dir();
    const image = makeImage(d);
    const images = path.join(d, ".images");
    const paths = { upper: `${d}/vm/upper`, work: `${d}/vm/work`, merged: `${d}/vm/rootfs` };
    const lower = await mountOverlayOnSharedImage(images, image, paths);
    await unmountUnder(paths.merged); // as if metald died between the two unmounts
    await unmountSharedOverlay(images, paths.merged);
    expect(await isMountPoint(lower)).toBe(false);
    expect(loopDevices(image)).toEqual([]);
  });

  it("refuses directories overlayfs options cannot express", async () => {
    const d = dir();
    const paths = { lower: `${d}/a,b`, upper: `${d}/u`, work: `${d}/w`, merged: `${d}/m` };
    await expect(mountOverlay(paths)).rejects.toBeInstanceOf(InvalidArgumentError);
  });
});
