import { execFileSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { FailedPreconditionError } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, describe, expect, it } from "vitest";
import { buildExt4, MkfsError } from "./ext4.js";

const dirs: Array<{ remove(): void }> = [];
afterEach(() => {
  for (const d of dirs.splice(0)) d.remove();
});

function workdir(): string {
  const d = tempDir("kiln-ext4-");
  dirs.push(d);
  return d.path;
}

function debugfs(image: string, request: string): string {
  return execFileSync("debugfs", ["-R", request, image], {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "ignore"],
  });
}

/** Type, mode, uid, gid and (fast) symlink target of one path inside the image. */
function statInImage(image: string, p: string) {
  const out = debugfs(image, `stat "${p}"`);
  const m = /Type: (\S+)\s+Mode:\s+(\d+)[\s\S]*?User:\s+(\d+)\s+Group:\s+(\d+)[\s\S]*?Size: (\d+)/.exec(out);
  if (!m) throw new Error(`debugfs could not stat ${p}: ${out}`);
  return {
    type: m[1],
    mode: Number.parseInt(m[2]!, 8),
    uid: Number(m[3]),
    gid: Number(m[4]),
    size: Number(m[5]),
    links: Number(/Links: (\d+)/.exec(out)?.[1]),
    target: /Fast link dest: "(.*)"/.exec(out)?.[1],
  };
}

function superblock(image: string): Record<string, string> {
  const out = execFileSync("dumpe2fs", ["-h", image], {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "ignore"],
  });
  return Object.fromEntries(out.split("\n").map((l) => l.split(/:\s+/, 2) as [string, string]));
}

describe("buildExt4", () => {
  it("makes a valid ext4 image that keeps owners, modes, setuid, symlinks and hard links", async () => {
    const dir = workdir();
    const root = path.join(dir, "rootfs");
    fs.mkdirSync(path.join(root, "bin"), { recursive: true });
    fs.mkdirSync(path.join(root, "home/app"), { recursive: true });
    const payload = randomBytes(300_000);
    fs.writeFileSync(path.join(root, "bin/tool"), payload);
    fs.chmodSync(path.join(root, "bin/tool"), 0o4755);
    fs.writeFileSync(path.join(root, "home/app/secret"), "s");
    fs.chownSync(path.join(root, "home/app/secret"), 1000, 1001);
    fs.chmodSync(path.join(root, "home/app/secret"), 0o640);
    fs.chownSync(path.join(root, "home/app"), 1000, 1001);
    fs.chmodSync(path.join(root, "home/app"), 0o700);
    fs.symlinkSync("tool", path.join(root, "bin/short"));
    const longTarget = `/${"x".repeat(100)}/target`;
    fs.symlinkSync(longTarget, path.join(root, "bin/long"));
    fs.linkSync(path.join(root, "bin/tool"), path.join(root, "bin/tool-hardlink"));

    const image = path.join(dir, "out/rootfs.ext4");
    const r = await buildExt4(root, image, { label: "kiln-test" });

    execFileSync("e2fsck", ["-f", "-n", image], { stdio: "ignore" }); // throws unless clean
    expect(superblock(image)["Filesystem volume name"]).toBe("kiln-test");
    expect(statInImage(image, "/bin/tool")).toMatchObject({
      type: "regular",
      mode: 0o4755,
      uid: 0,
      size: 300_000,
      links: 2,
    });
    expect(statInImage(image, "/home/app/secret")).toMatchObject({
      type: "regular",
      mode: 0o640,
      uid: 1000,
      gid: 1001,
    });
    expect(statInImage(image, "/home/app")).toMatchObject({
      type: "directory",
      mode: 0o700,
      uid: 1000,
      gid: 1001,
    });
    expect(statInImage(image, "/bin/short")).toMatchObject({ type: "symlink", target: "tool" });
    expect(statInImage(image, "/bin/long")).toMatchObject({ type: "symlink", size: longTarget.length });
    const inode = (p: string) => /Inode: (\d+)/.exec(debugfs(image, `stat "${p}"`))?.[1];
    expect(inode("/bin/tool-hardlink")).toBe(inode("/bin/tool"));
    const dumped = path.join(dir, "dumped");
    debugfs(image, `dump /bin/tool ${dumped}`);
    expect(fs.readFileSync(dumped).equals(payload)).toBe(true);

    const bytes = fs.readFileSync(image);
    expect(r.sizeBytes).toBe(bytes.length);
    expect(r.sha256).toBe(`sha256:${createHash("sha256").update(bytes).digest("hex")}`);
  });

  it("sizes the image from the content plus headroom", async () => {
    const dir = workdir();
    const root = path.join(dir, "rootfs");
    fs.mkdirSync(root);
    fs.writeFileSync(path.join(root, "big"), randomBytes(20 << 20));
    const headroom = 16 << 20;
    const image = path.join(dir, "rootfs.ext4");
    const r = await buildExt4(root, image, { headroomBytes: headroom, headroomRatio: 0 });
    const sb = superblock(image);
    const free = Number(sb["Free blocks"]) * Number(sb["Block size"]);
    expect(free).toBeGreaterThanOrEqual(headroom);
    // …without being wildly larger than content + headroom + ext4's own overhead.
    expect(r.sizeBytes).toBeLessThan((20 << 20) + headroom + (24 << 20));

    const ratio = await buildExt4(root, path.join(dir, "ratio.ext4"), { headroomBytes: 0, headroomRatio: 1 });
    const sb2 = superblock(path.join(dir, "ratio.ext4"));
    expect(Number(sb2["Free blocks"]) * Number(sb2["Block size"])).toBeGreaterThanOrEqual(20 << 20);
    expect(ratio.sizeBytes).toBeGreaterThan(r.sizeBytes);
  });

  it("counts hard-linked content once, also across directories measured together", async () => {
    const dir = workdir();
    const sized = async (links: number) => {
      const root = path.join(dir, `rootfs-${links}`);
      fs.mkdirSync(path.join(root, "a"), { recursive: true });
      fs.writeFileSync(path.join(root, "a", "big"), randomBytes(16 << 20));
      for (let i = 1; i < links; i++) {
        const sub = path.join(root, `d${i % 5}`);
        fs.mkdirSync(sub, { recursive: true });
        fs.linkSync(path.join(root, "a", "big"), path.join(sub, `link${i}`));
      }
      return (await buildExt4(root, path.join(dir, `${links}.ext4`), { headroomBytes: 0, headroomRatio: 0 }))
        .sizeBytes;
    };
    // 200 names of one 16 MiB file: the directories add a little, the content nothing.
    expect(await sized(200)).toBeLessThanOrEqual((await sized(1)) + (2 << 20));
  });

  it("fits many small files with no headroom (enough inodes and blocks)", async () => {
    const dir = workdir();
    const root = path.join(dir, "rootfs");
    for (let d = 0; d < 30; d++) {
      fs.mkdirSync(path.join(root, `d${d}`), { recursive: true });
      for (let f = 0; f < 100; f++)
        fs.writeFileSync(path.join(root, `d${d}`, `file-with-a-long-name-${f}`), "x");
    }
    const image = path.join(dir, "rootfs.ext4");
    await buildExt4(root, image, { headroomBytes: 0, headroomRatio: 0 });
    expect(debugfs(image, "ls /d29")).toContain("file-with-a-long-name-99");
  });

  it("refuses a missing rootfs directory", async () => {
    const dir = workdir();
    await expect(buildExt4(path.join(dir, "nope"), path.join(dir, "x.ext4"))).rejects.toBeInstanceOf(
      FailedPreconditionError,
    );
  });

  it("reports mkfs's stderr when it fails, and leaves no image behind", async () => {
    const dir = workdir();
    fs.mkdirSync(path.join(dir, "rootfs"));
    const fake = path.join(dir, "mkfs.ext4");
    fs.writeFileSync(
      fake,
      "#!/bin/sh\necho 'mkfs.ext4: Invalid argument while setting up superblock' >&2\nexit 1\n",
    );
    fs.chmodSync(fake, 0o755);
    const image = path.join(dir, "x.ext4");
    const err = await buildExt4(path.join(dir, "rootfs"), image, { mkfsPath: fake }).catch((e) => e);
    expect(err).toBeInstanceOf(MkfsError);
    expect(err.message).toContain(
      "mkfs.ext4 failed: mkfs.ext4: Invalid argument while setting up superblock",
    );
    expect(fs.existsSync(image)).toBe(false);
  });

  it("stops when aborted", async () => {
    const dir = workdir();
    fs.mkdirSync(path.join(dir, "rootfs"));
    const ac = new AbortController();
    ac.abort(new Error("build cancelled"));
    await expect(
      buildExt4(path.join(dir, "rootfs"), path.join(dir, "x.ext4"), { signal: ac.signal }),
    ).rejects.toThrow("build cancelled");
  });
});
