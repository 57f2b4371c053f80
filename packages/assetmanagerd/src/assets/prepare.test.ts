import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { Readable } from "node:stream";
import { InvalidArgumentError } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { sha256 } from "../store/blob-store.suite.js";
import { type PlacementItem, placeFiles, resolveVmTarget, stableFileName } from "./prepare.js";

let dir: ReturnType<typeof tempDir>;
let vmRoot: string;
beforeEach(() => {
  dir = tempDir("kiln-prepare-");
  vmRoot = path.join(dir.path, "vms");
});
afterEach(() => {
  dir.remove();
});

function blob(content: Buffer, name = "blob"): { file: string; digest: string } {
  const file = path.join(dir.path, name);
  fs.writeFileSync(file, content, { mode: 0o444 });
  return { file, digest: sha256(content) };
}

function item(assetId: string, fileName: string, b: { file: string; digest: string }): PlacementItem {
  return {
    assetId,
    fileName,
    digest: b.digest,
    localPath: b.file,
    open: async () => fs.createReadStream(b.file),
  };
}

/** A tmpfs mounted for the test: a second filesystem, so hard links across it fail with EXDEV. */
function mountTmpfs(at: string): () => void {
  fs.mkdirSync(at, { recursive: true });
  execFileSync("mount", ["-t", "tmpfs", "-o", "size=64m", "tmpfs", at]);
  return () => execFileSync("umount", [at]);
}

describe("resolveVmTarget", () => {
  it("creates the target under the VM root", async () => {
    const target = await resolveVmTarget(vmRoot, "vm_1/root/assets");
    expect(target).toBe(path.join(fs.realpathSync(vmRoot), "vm_1/root/assets"));
    expect(fs.statSync(target).isDirectory()).toBe(true);
  });

  it("creates the VM root again when it was removed after first use", async () => {
    await resolveVmTarget(vmRoot, "vm_1");
    fs.rmSync(vmRoot, { recursive: true });
    const target = await resolveVmTarget(vmRoot, "vm_2/root");
    expect(fs.statSync(target).isDirectory()).toBe(true);
  });

  it("refuses '..', '.', absolute and empty segments", async () => {
    for (const bad of ["../escape", "a/../../b", "/etc", "a//b", "./a", "a/.", ""]) {
      await expect(resolveVmTarget(vmRoot, bad), bad).rejects.toBeInstanceOf(InvalidArgumentError);
    }
    expect(fs.existsSync(path.join(dir.path, "escape"))).toBe(false);
  });

  it("refuses a path through a symlink, even one pointing inside the root", async () => {
    fs.mkdirSync(path.join(vmRoot, "inside"), { recursive: true });
    fs.symlinkSync(dir.path, path.join(vmRoot, "out"));
    fs.symlinkSync(path.join(vmRoot, "inside"), path.join(vmRoot, "in"));
    for (const target of ["out/x", "out", "in/x"]) {
      const err = await resolveVmTarget(vmRoot, target).catch((e: unknown) => e);
      expect(err, target).toBeInstanceOf(InvalidArgumentError);
      expect(String(err)).toMatch(/symlink/);
    }
    expect(fs.existsSync(path.join(dir.path, "x"))).toBe(false);
  });

  it("refuses a path through a file", async () => {
    fs.mkdirSync(vmRoot, { recursive: true });
    fs.writeFileSync(path.join(vmRoot, "file"), "");
    await expect(resolveVmTarget(vmRoot, "file/x")).rejects.toThrow(/not a directory/);
  });
});

describe("placeFiles", () => {
  it("hard-links blobs under stable names", async () => {
    const kernel = blob(Buffer.from("kernel"), "k");
    const rootfs = blob(Buffer.from("rootfs"), "r");
    const target = await resolveVmTarget(vmRoot, "vm_1");
    const placed = await placeFiles(target, [
      item("ast_k", stableFileName("KERNEL", "vmlinuz-6.1"), kernel),
      item("ast_r", stableFileName("ROOTFS", "x"), rootfs),
    ]);
    expect(placed).toEqual([
      { assetId: "ast_k", path: path.join(target, "vmlinux"), method: "hardlink" },
      { assetId: "ast_r", path: path.join(target, "rootfs.ext4"), method: "hardlink" },
    ]);
    expect(fs.statSync(path.join(target, "vmlinux")).ino).toBe(fs.statSync(kernel.file).ino);
    expect(fs.readdirSync(target).sort()).toEqual(["rootfs.ext4", "vmlinux"]);
    // Preparing again is fine and leaves no temporaries behind.
    await placeFiles(target, [item("ast_k", "vmlinux", kernel)]);
    expect(fs.readdirSync(target).sort()).toEqual(["rootfs.ext4", "vmlinux"]);
  });

  it("copies when the target is on another filesystem (tmpfs)", async () => {
    const content = randomBytes(1024 * 1024);
    const rootfs = blob(content);
    const mnt = path.join(vmRoot, "mnt");
    const unmount = mountTmpfs(mnt);
    try {
      const target = await resolveVmTarget(vmRoot, "mnt/vm_2");
      const placed = await placeFiles(target, [item("ast_r", "rootfs.ext4", rootfs)]);
      expect(placed[0]!.method).toBe("copy");
      const file = path.join(target, "rootfs.ext4");
      expect(fs.readFileSync(file).equals(content)).toBe(true);
      expect(fs.statSync(file).dev).not.toBe(fs.statSync(rootfs.file).dev);
    } finally {
      unmount();
    }
  });

  it("downloads blobs without a local file, verifying the digest", async () => {
    const content = randomBytes(300_000);
    const target = await resolveVmTarget(vmRoot, "vm_3");
    const remote = (bytes: Buffer, digest: string): PlacementItem => ({
      assetId: "ast_d",
      fileName: "disk.img",
      digest,
      localPath: undefined,
      open: async () => Readable.from([bytes.subarray(0, 1000), bytes.subarray(1000)]),
    });
    const placed = await placeFiles(target, [remote(content, sha256(content))]);
    expect(placed[0]!.method).toBe("download");
    expect(fs.readFileSync(path.join(target, "disk.img")).equals(content)).toBe(true);

    const corrupt = Buffer.from(content);
    corrupt[5] = (corrupt[5]! + 1) % 256;
    const other = await resolveVmTarget(vmRoot, "vm_4");
    await expect(placeFiles(other, [remote(corrupt, sha256(content))])).rejects.toThrow(/corrupt/);
    expect(fs.readdirSync(other)).toEqual([]);
  });

  it("places all or nothing", async () => {
    const kernel = blob(Buffer.from("kernel"), "k");
    const target = await resolveVmTarget(vmRoot, "vm_5");
    const missing = { file: path.join(dir.path, "gone"), digest: sha256(Buffer.from("gone")) };
    await expect(
      placeFiles(target, [item("ast_k", "vmlinux", kernel), item("ast_gone", "rootfs.ext4", missing)]),
    ).rejects.toThrow(/ast_gone/);
    expect(fs.readdirSync(target)).toEqual([]);
  });

  it("undoes the placement when recording it fails, keeping a file that was there before", async () => {
    const kernel = blob(Buffer.from("kernel"), "k");
    const rootfs = blob(Buffer.from("rootfs"), "r");
    const target = await resolveVmTarget(vmRoot, "vm_7");
    await placeFiles(target, [item("ast_k", "vmlinux", kernel)]);
    await expect(
      placeFiles(
        target,
        [item("ast_k", "vmlinux", kernel), item("ast_r", "rootfs.ext4", rootfs)],
        async () => {
          throw new Error("database is locked");
        },
      ),
    ).rejects.toThrow(/database is locked/);
    expect(fs.readdirSync(target)).toEqual(["vmlinux"]);
  });

  it("refuses two assets that would get the same name", async () => {
    const a = blob(Buffer.from("a"), "a");
    const b = blob(Buffer.from("b"), "b");
    const target = await resolveVmTarget(vmRoot, "vm_6");
    await expect(
      placeFiles(target, [item("ast_a", "rootfs.ext4", a), item("ast_b", "rootfs.ext4", b)]),
    ).rejects.toThrow(/ast_a and ast_b would both be placed as rootfs.ext4/);
    expect(fs.readdirSync(target)).toEqual([]);
  });
});
