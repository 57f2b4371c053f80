import { execFileSync, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, describe, expect, it } from "vitest";
import { snapshotTree } from "../../../extract/fixtures/tree-snapshot.js";
import { buildExt4 } from "../../ext4.js";
import { fsckImage, snapshotImage } from "./image-tree.js";

const dirs: Array<{ remove(): void }> = [];
afterEach(() => {
  for (const d of dirs.splice(0)) d.remove();
});

function workdir(): string {
  const d = tempDir("kiln-image-tree-");
  dirs.push(d);
  return d.path;
}

/**
 * A tree with what an image must keep: empty, multi-block and sparse files, setuid/setgid, sticky
 * and private directories, owners beyond 16 bits and beyond 2^31, fast (< 60 bytes) and slow
 * symlinks around the boundary, hard links across directories, a fifo and a device, sub-second,
 * pre-1970 and post-2106 mtimes, and names with spaces, quotes, unicode and a newline.
 */
function makeTree(root: string): void {
  // mkfs.ext4 -d makes the image's root 0755 root:root whatever the source's (mkdtemp's is 0700).
  fs.mkdirSync(root, { mode: 0o755 });
  fs.chmodSync(root, 0o755);
  const at = (rel: string) => path.join(root, rel);
  const dir = (rel: string, mode: number, uid = 0, gid = 0) => {
    fs.mkdirSync(at(rel), { recursive: true });
    fs.chownSync(at(rel), uid, gid);
    fs.chmodSync(at(rel), mode); // after chown, which clears setgid
  };
  const file = (rel: string, data: string | Buffer, mode = 0o644, uid = 0, gid = 0) => {
    fs.mkdirSync(path.dirname(at(rel)), { recursive: true });
    fs.writeFileSync(at(rel), data);
    fs.chownSync(at(rel), uid, gid);
    fs.chmodSync(at(rel), mode); // after chown, which clears setuid and setgid
  };
  const touch = (rel: string, when: string) => execFileSync("touch", ["-h", "-d", `@${when}`, at(rel)]);

  file("hello.txt", "hello\n");
  file("empty", "", 0o600, 70000, 65534);
  file("big.bin", randomBytes(3 * 4096 * 25 + 17), 0o755);
  fs.writeFileSync(at("sparse.img"), "");
  fs.truncateSync(at("sparse.img"), 1 << 20);
  fs.appendFileSync(at("sparse.img"), "tail after a 1 MiB hole");
  file("bin/su", randomBytes(5000), 0o4755);
  file("bin/wall", "#!/bin/sh\n", 0o2755, 0, 5);
  file("big-ids", "x", 0o640, 3_000_000_000, 4_294_967_294);
  dir("tmp", 0o1777);
  dir("srv", 0o2775, 70000, 65534);
  dir("home/nobody", 0o700, 65534, 65534);
  file("home/nobody/.profile", "export PS1='$ '\n", 0o644, 65534, 65534);
  dir("opt/locked", 0o555);

  fs.mkdirSync(at("links"));
  fs.symlinkSync("../hello.txt", at("links/fast"));
  fs.symlinkSync("t".repeat(59), at("links/fast-59"));
  fs.symlinkSync("t".repeat(60), at("links/slow-60"));
  fs.symlinkSync(`/${"long/".repeat(40)}end`, at("links/slow-long"));
  fs.symlinkSync("nowhere", at("links/owned"));
  fs.lchownSync(at("links/owned"), 70000, 65534);

  file("data/a.txt", "shared by three names\n");
  fs.mkdirSync(at("other/deeper"), { recursive: true });
  fs.linkSync(at("data/a.txt"), at("other/b.txt"));
  fs.linkSync(at("data/a.txt"), at("other/deeper/c.txt"));
  fs.linkSync(at("bin/su"), at("data/su-again"));

  execFileSync("mkfifo", ["-m", "0620", at("fifo")]);
  fs.mkdirSync(at("dev"));
  execFileSync("mknod", ["-m", "0666", at("dev/null"), "c", "1", "3"]);

  file('with space/ü ñ 文件 "quoted" #1.txt', "unicode\n");
  file("with space/back\\slash", "b\n");
  file("with space/new\nline", "n\n");

  touch("hello.txt", "1577934245.123456789");
  touch("big.bin", "1700000000.999999999");
  touch("empty", "0");
  touch("links/fast", "1600000000.5");
  touch("links/slow-long", "1600000001.000000001");
  file("old", "before 1970\n");
  touch("old", "-1000.25");
  file("far-future", "after 2106\n");
  touch("far-future", "4294967301.5");
  touch("with space/new\nline", "1600000002"); // whole seconds: copyMtimes cannot name it
}

/**
 * mkfs.ext4 -d keeps whole seconds only (e2fsprogs' create_inode copies st_mtime, not st_mtim;
 * 1.47.0 also cuts it to 32 bits), so the image gets the source's exact mtimes here, through
 * debugfs with quoted paths (`""` is a quote inside quotes), before the trees are compared.
 */
function copyMtimes(image: string, root: string): void {
  const commands: string[] = [];
  const walk = (rel: string) => {
    for (const name of fs.readdirSync(path.join(root, rel))) {
      const child = rel === "" ? name : `${rel}/${name}`;
      const st = fs.lstatSync(path.join(root, child), { bigint: true });
      if (st.isDirectory()) {
        walk(child);
        continue;
      }
      const sec =
        st.mtimeNs >= 0n ? st.mtimeNs / 1_000_000_000n : -((-st.mtimeNs + 999_999_999n) / 1_000_000_000n);
      const nsec = st.mtimeNs - sec * 1_000_000_000n;
      if (nsec === 0n && sec === BigInt.asIntN(32, sec)) continue;
      if (child.includes("\n")) throw new Error(`cannot name ${JSON.stringify(child)} in a debugfs command`);
      const epoch = ((sec - BigInt.asIntN(32, sec)) >> 32n) & 3n;
      const quoted = `"/${child.replaceAll('"', '""')}"`;
      commands.push(`sif ${quoted} mtime @${sec}`, `sif ${quoted} mtime_extra ${(nsec << 2n) | epoch}`);
    }
  };
  walk("");
  debugfsWrite(image, commands);
}

/** debugfs -w, failing on any error it reports (on stderr, after its version banner). */
function debugfsWrite(image: string, commands: string[]): void {
  const r = spawnSync("debugfs", ["-w", "-f", "-", image], {
    input: `${commands.join("\n")}\n`,
    encoding: "utf8",
  });
  expect(r.status).toBe(0);
  expect(r.stderr.replace(/^debugfs \d[^\n]*\n/, "")).toBe("");
}

async function imageOf(root: string, dir: string): Promise<string> {
  const image = path.join(dir, "rootfs.ext4");
  await buildExt4(root, image, { checksum: false, sync: false });
  return image;
}

/** Overwrites bytes of the image in place. */
function patchBytes(image: string, offset: number, bytes: Buffer): void {
  const fd = fs.openSync(image, "r+");
  try {
    fs.writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    fs.closeSync(fd);
  }
}

function debugfsRead(image: string, request: string): string {
  return execFileSync("debugfs", ["-R", request, image], {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "ignore"],
  });
}

describe("snapshotImage", () => {
  it("reads back from the image exactly what snapshotTree reports for the directory it was made of", async () => {
    const dir = workdir();
    const root = path.join(dir, "rootfs");
    makeTree(root);
    const image = await imageOf(root, dir);
    copyMtimes(image, root);

    const snap = await snapshotImage(image);

    expect(snap).toEqual(snapshotTree(root));
    // The cases above are really in there (not just equal because both sides missed them).
    expect(snap.nodes["bin/su"]).toMatchObject({ type: "file", mode: "4755" });
    expect(snap.nodes["tmp"]).toMatchObject({ type: "dir", mode: "1777" });
    expect(snap.nodes["srv"]).toMatchObject({ mode: "2775", uid: 70000, gid: 65534 });
    expect(snap.nodes["big-ids"]).toMatchObject({ uid: 3_000_000_000, gid: 4_294_967_294 });
    expect(snap.nodes["links/fast-59"]?.target).toBe("t".repeat(59));
    expect(snap.nodes["links/slow-60"]?.target).toBe("t".repeat(60));
    expect(snap.nodes["links/owned"]).toEqual({
      type: "symlink",
      uid: 70000,
      gid: 65534,
      target: "nowhere",
      mtimeMs: expect.any(Number),
    });
    expect(snap.nodes["hello.txt"]?.mtimeMs).toBe(1577934245123);
    expect(snap.nodes["old"]?.mtimeMs).toBe(-1000250);
    expect(snap.nodes["far-future"]?.mtimeMs).toBe(4294967301500);
    expect(snap.nodes["dev/null"]?.type).toBe("char-device");
    expect(snap.nodes["with space/new\nline"]?.sha256).toBeDefined();
    expect(snap.nodes['with space/ü ñ 文件 "quoted" #1.txt']?.type).toBe("file");
    expect(snap.hardlinkGroups).toEqual([
      ["bin/su", "data/su-again"],
      ["data/a.txt", "other/b.txt", "other/deeper/c.txt"],
    ]);
    expect(snap.nodes["lost+found"]).toBeUndefined();

    const fsck = await fsckImage(image);
    expect(fsck.clean, fsck.output).toBe(true);
  });

  it("includes the root's lost+found only when asked", async () => {
    const dir = workdir();
    const root = path.join(dir, "rootfs");
    fs.mkdirSync(root);
    fs.chmodSync(root, 0o755);
    fs.writeFileSync(path.join(root, "f"), "f");
    const image = await imageOf(root, dir);

    expect(Object.keys((await snapshotImage(image)).nodes)).toEqual([".", "f"]);
    const all = await snapshotImage(image, { includeLostFound: true });
    expect(Object.keys(all.nodes)).toEqual([".", "f", "lost+found"]);
    expect(all.nodes["lost+found"]).toEqual({ type: "dir", mode: "0700", uid: 0, gid: 0 });
  });

  it("decodes owners, nanoseconds and epoch bits as Linux does, so it sees any change to them", async () => {
    const dir = workdir();
    const root = path.join(dir, "rootfs");
    fs.mkdirSync(root);
    fs.chmodSync(root, 0o755);
    for (const name of ["a", "b", "c", "d"]) fs.writeFileSync(path.join(root, name), name);
    const image = await imageOf(root, dir);

    debugfsWrite(image, [
      // 2020-01-02T03:04:05.123456789Z: nanoseconds << 2 in the extra field
      "sif /a mtime @1577934245",
      `sif /a mtime_extra ${123_456_789 * 4}`,
      // -1001 s (0xfffffc17, signed), plus 0.75 s: -1000.25 s
      "sif /b mtime @-1001",
      `sif /b mtime_extra ${750_000_000 * 4}`,
      // 2^32 + 5 s (year 2106): 5 in i_mtime, epoch bits 1 in the extra field; plus 1 ns
      "sif /c mtime @4294967301",
      `sif /c mtime_extra ${(1 << 2) | 1}`,
      // uid/gid split over i_uid and i_uid_high; 4000000000 does not fit a signed 32-bit int
      "sif /d uid 4000000000",
      "sif /d gid 70000",
      "sif /d mode 0104711",
    ]);

    const { nodes } = await snapshotImage(image);
    expect(nodes["a"]?.mtimeMs).toBe(1577934245123);
    expect(nodes["b"]?.mtimeMs).toBe(-1000250);
    expect(nodes["c"]?.mtimeMs).toBe(4294967301000);
    expect(nodes["d"]).toMatchObject({ mode: "4711", uid: 4_000_000_000, gid: 70000 });
    expect((await fsckImage(image)).clean).toBe(true);
  });

  it("reads a short symlink target kept in a block from the block, as Linux does", async () => {
    const dir = workdir();
    const root = path.join(dir, "rootfs");
    fs.mkdirSync(root);
    fs.symlinkSync("t".repeat(60), path.join(root, "l"));
    const image = await imageOf(root, dir);
    // Linux: a symlink with data blocks is slow whatever its size; debugfs would show i_block.
    debugfsWrite(image, ["sif /l size 10"]);

    expect((await snapshotImage(image)).nodes["l"]?.target).toBe("t".repeat(10));
    expect((await fsckImage(image)).clean).toBe(false); // e2fsck calls it an invalid symlink
  });

  it("fails on a file that is not an ext4 image instead of returning an empty tree", async () => {
    const dir = workdir();
    const image = path.join(dir, "not-ext4.img");
    fs.writeFileSync(image, Buffer.alloc(1 << 20));
    await expect(snapshotImage(image)).rejects.toThrow(/debugfs on .* failed.*Bad magic number/s);
  });
});

describe("fsckImage", () => {
  async function smallImage(): Promise<string> {
    const dir = workdir();
    const root = path.join(dir, "rootfs");
    fs.mkdirSync(root);
    fs.writeFileSync(path.join(root, "hello.txt"), "hello\n");
    return imageOf(root, dir);
  }

  it("passes an image mkfs.ext4 just made", async () => {
    const r = await fsckImage(await smallImage());
    expect(r, r.output).toMatchObject({ clean: true, exitCode: 0 });
  });

  it("reports a superblock with overwritten bytes (its checksum no longer matches)", async () => {
    const image = await smallImage();
    patchBytes(image, 1024 + 0x0c, Buffer.from([7, 0, 0, 0])); // s_free_blocks_count_lo
    const r = await fsckImage(image);
    expect(r.clean).toBe(false);
    expect(r.output).toMatch(/Superblock checksum does not match/);
  });

  it("reports an inode whose link count was overwritten in the inode table", async () => {
    const image = await smallImage();
    const ino = /\/(\d+)\/100644\/0\/0\/hello\.txt\//.exec(debugfsRead(image, "ls -p /"))![1]!;
    const where = /located at block (\d+), offset 0x([0-9a-f]+)/.exec(debugfsRead(image, `imap <${ino}>`))!;
    const blockSize = 4096;
    patchBytes(
      image,
      Number(where[1]) * blockSize + Number.parseInt(where[2]!, 16) + 0x1a,
      Buffer.from([5, 0]),
    );
    const r = await fsckImage(image);
    expect(r.clean).toBe(false);
    expect(r.exitCode).not.toBe(0); // 12: errors left (4), then aborted reading the inode (8)
    expect(r.output).toMatch(new RegExp(`Inode ${ino} passes checks, but checksum does not match inode`));
  });

  it("reports a wrong free blocks count, which e2fsck declines to fix but exits 0 for", async () => {
    const image = await smallImage();
    debugfsWrite(image, ["ssv free_blocks_count 7"]); // with a valid checksum
    const r = await fsckImage(image);
    expect(r.exitCode).toBe(0);
    expect(r.clean).toBe(false);
    expect(r.output).toMatch(/Free blocks count wrong \(7, counted=\d+\)\.\nFix\? no/);
  });

  it("reports a directory entry without a file type, which e2fsck -n otherwise passes in silence", async () => {
    const dir = workdir();
    const root = path.join(dir, "rootfs");
    fs.mkdirSync(root);
    fs.writeFileSync(path.join(root, "hello.txt"), "hello\n");
    const image = path.join(dir, "plain.ext4");
    fs.writeFileSync(image, "");
    fs.truncateSync(image, 8 << 20);
    // No metadata_csum, so the directory block can be edited without fixing its checksum.
    execFileSync("mkfs.ext4", ["-q", "-F", "-b", "4096", "-O", "^metadata_csum", "-d", root, image]);
    const block = Number(debugfsRead(image, "blocks <2>").trim());
    const fd = fs.openSync(image, "r+");
    try {
      const buf = Buffer.alloc(4096);
      fs.readSync(fd, buf, 0, 4096, block * 4096);
      for (let off = 0; off < 4096; off += buf.readUInt16LE(off + 4)) {
        if (buf.toString("latin1", off + 8, off + 8 + buf[off + 6]!) === "hello.txt") buf[off + 7] = 0;
      }
      fs.writeSync(fd, buf, 0, 4096, block * 4096);
    } finally {
      fs.closeSync(fd);
    }
    const r = await fsckImage(image);
    expect(r.clean).toBe(false);
    expect(r.output).toMatch(/Setting filetype for entry 'hello.txt' in \/ \(2\) to 1\./);
  });
});
