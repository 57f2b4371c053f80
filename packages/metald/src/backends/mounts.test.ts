import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { InvalidArgumentError } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, describe, expect, it } from "vitest";
import { isMountPoint, mountOverlay, mountsUnder, unmountUnder } from "./mounts.js";

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

  it("overlays a writable layer on a read-only image without touching the image", async () => {
    const d = dir();
    const src = path.join(d, "src");
    fs.mkdirSync(path.join(src, "etc"), { recursive: true });
    fs.writeFileSync(path.join(src, "etc/hostname"), "base\n");
    const image = path.join(d, "base.ext4");
    fs.writeFileSync(image, "");
    fs.truncateSync(image, 8 << 20);
    execFileSync("mkfs.ext4", ["-q", "-F", "-d", src, image]);
    const before = fs.readFileSync(image);
    const paths = {
      lower: path.join(d, "vm/lower"),
      upper: path.join(d, "vm/upper"),
      work: path.join(d, "vm/work"),
      merged: path.join(d, "vm/rootfs"),
    };
    await mountOverlay(image, paths);
    await mountOverlay(image, paths); // idempotent
    expect((await mountsUnder(path.join(d, "vm"))).length).toBe(2);
    fs.writeFileSync(path.join(paths.merged, "etc/hostname"), "vm\n");
    expect(fs.readFileSync(path.join(paths.upper, "etc/hostname"), "utf8")).toBe("vm\n");
    expect(fs.readFileSync(path.join(paths.lower, "etc/hostname"), "utf8")).toBe("base\n");
    expect(() => fs.writeFileSync(path.join(paths.lower, "x"), "")).toThrow(/EROFS|read-only/);
    await unmountUnder(path.join(d, "vm"));
    expect(execFileSync("losetup", ["-j", image], { encoding: "utf8" })).toBe("");
    expect(fs.readFileSync(image).equals(before)).toBe(true);
  });

  it("refuses directories overlayfs options cannot express", async () => {
    const d = dir();
    const paths = { lower: `${d}/a,b`, upper: `${d}/u`, work: `${d}/w`, merged: `${d}/m` };
    await expect(mountOverlay(path.join(d, "x.ext4"), paths)).rejects.toBeInstanceOf(InvalidArgumentError);
  });
});
