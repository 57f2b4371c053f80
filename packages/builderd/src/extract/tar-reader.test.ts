import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { Readable } from "node:stream";
import { tempDir } from "@kiln/kit/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { InvalidLayerError } from "./errors.js";
import { fileHeader } from "./fixtures/layer-streams.js";
import { readXattrs } from "./fixtures/tree-snapshot.js";
import { MAX_META_BYTES, readTar, type TarHeader } from "./tar-reader.js";

let tmp: { path: string; remove(): void };
beforeAll(() => {
  tmp = tempDir("kiln-tar-reader-");
});
afterAll(() => tmp.remove());

const isRoot = process.getuid?.() === 0;

/** Every entry's header and content hash; `chunk` cuts the archive into pieces of that size. */
async function readAll(archive: Buffer, chunk = 7919) {
  const pieces: Buffer[] = [];
  for (let at = 0; at < archive.length; at += chunk) pieces.push(archive.subarray(at, at + chunk));
  const out: Array<{ header: TarHeader; sha256: string }> = [];
  for await (const entry of readTar(Readable.from(pieces))) {
    const hash = createHash("sha256");
    for await (const c of entry) hash.update(c);
    out.push({ header: entry.header, sha256: hash.digest("hex") });
  }
  return out;
}

/** What lstat says of each path below `dir`, as the reader should report it. */
function expected(dir: string, rel: string) {
  const p = path.join(dir, rel);
  const st = fs.lstatSync(p);
  return {
    mode: st.mode & 0o7777,
    uid: st.uid,
    gid: st.gid,
    mtime: Math.floor(st.mtimeMs / 1000),
    ...(st.isFile() ? { sha256: createHash("sha256").update(fs.readFileSync(p)).digest("hex") } : {}),
    ...(st.isSymbolicLink() ? { linkname: fs.readlinkSync(p) } : {}),
  };
}

function makeTree(dir: string, longNames: boolean) {
  const p = (rel: string) => path.join(dir, rel);
  const deep = longNames ? `${"directory-".repeat(12)}deep` : "sub";
  fs.mkdirSync(p(deep), { recursive: true });
  fs.writeFileSync(p(`${deep}/file.txt`), "hello tar\n".repeat(300));
  fs.writeFileSync(p("empty"), "");
  fs.writeFileSync(p("setuid"), "#!/bin/sh\n");
  fs.chmodSync(p("setuid"), 0o4755);
  if (isRoot) fs.chownSync(p("setuid"), 1234, 5678);
  fs.linkSync(p("setuid"), p("hardlink"));
  fs.symlinkSync(longNames ? `/${"target/".repeat(20)}end` : "sub/file.txt", p("symlink"));
  return [".", deep, `${deep}/file.txt`, "empty", "hardlink", "setuid", "symlink"];
}

describe("readTar", () => {
  it.each([
    ["gnu", true],
    ["pax", true],
    ["ustar", false],
    ["v7", false],
  ] as const)(
    "reads GNU tar's %s format: names, types, modes, owners, times, links and content",
    async (format, longNames) => {
      const dir = path.join(tmp.path, `tree-${format}`);
      fs.mkdirSync(dir);
      makeTree(dir, longNames);
      const archive = execFileSync(
        "tar",
        [`--format=${format}`, "--numeric-owner", "--sort=name", "-C", dir, "-cf", "-", "."],
        {
          maxBuffer: 64 << 20,
        },
      );
      const entries = await readAll(archive);
      const byName = new Map(
        entries.map((e) => [e.header.name.replace(/^\.\//, "").replace(/\/$/, "") || ".", e]),
      );
      for (const [rel, e] of byName) {
        const want = expected(dir, rel);
        const h = e.header;
        expect({ rel, mode: h.mode, uid: h.uid, gid: h.gid, mtime: Math.floor(h.mtime) }).toEqual({
          rel,
          mode: want.mode,
          uid: want.uid,
          gid: want.gid,
          mtime: want.mtime,
        });
        if (h.type === "file") expect(e.sha256, rel).toBe(want.sha256);
        if (h.type === "symlink") expect(h.linkname).toBe(want.linkname);
      }
      // tar writes the second name of an inode as a hard link to the first.
      const types = Object.fromEntries([...byName].map(([rel, e]) => [rel, e.header.type]));
      expect(Object.values(types).sort()).toEqual([
        "directory",
        "directory",
        "file",
        "file",
        "file",
        "link",
        "symlink",
      ]);
      const link = [...byName.values()].find((e) => e.header.type === "link")!;
      expect(link.header.size).toBe(0);
      expect(["./setuid", "./hardlink", "setuid", "hardlink"]).toContain(link.header.linkname);
    },
  );

  it.skipIf(!isRoot)(
    "keeps PAX extended attributes byte for byte (a capability with a 0x80 byte)",
    async () => {
      const dir = path.join(tmp.path, "xattrs");
      fs.mkdirSync(dir);
      fs.writeFileSync(path.join(dir, "tool"), "tool");
      execFileSync("setcap", ["cap_setuid,cap_net_bind_service=ep", path.join(dir, "tool")]);
      execFileSync("setfattr", ["-n", "user.note", "-v", "0x00ff80", path.join(dir, "tool")]);
      const archive = execFileSync("tar", [
        "--format=pax",
        "--xattrs",
        "--xattrs-include=*",
        "-C",
        dir,
        "-cf",
        "-",
        "tool",
      ]);
      const [entry] = await readAll(archive);
      const want = readXattrs(dir).get("tool")!;
      expect(Object.fromEntries([...entry!.header.xattrs].map(([k, v]) => [k, v.toString("hex")]))).toEqual(
        want,
      );
      expect(want["security.capability"]).toMatch(/80/);
    },
  );

  it("applies PAX records and GNU long names to the next entry only", async () => {
    const pax = (records: Record<string, string>) => {
      let body = "";
      for (const [k, v] of Object.entries(records)) {
        const rest = ` ${k}=${v}\n`;
        let len = rest.length + 1;
        while (String(len).length + rest.length !== len) len = String(len).length + rest.length;
        body += `${len}${rest}`;
      }
      return body;
    };
    const records = pax({
      path: "from/pax",
      uid: "3000000",
      size: "3",
      mtime: "1700000000.25",
      "SCHILY.xattr.user.k": "v",
    });
    const h = fileHeader("PaxHeaders/x", Buffer.byteLength(records));
    h.write("x", 156);
    const block = (s: string) =>
      Buffer.concat([Buffer.from(s), Buffer.alloc(512 - (Buffer.byteLength(s) % 512 || 512))]);
    const archive = Buffer.concat([
      resum(h),
      block(records),
      fileHeader("plain-name", 3),
      block("abc"),
      fileHeader("second", 0),
      Buffer.alloc(1024),
    ]);
    const [first, second] = await readAll(archive, 100);
    expect(first!.header).toMatchObject({ name: "from/pax", uid: 3000000, size: 3, mtime: 1700000000.25 });
    expect(first!.header.xattrs.get("user.k")).toEqual(Buffer.from("v"));
    expect(first!.sha256).toBe(createHash("sha256").update("abc").digest("hex"));
    expect(second!.header).toMatchObject({ name: "second", uid: 0, pax: {} });
  });

  it("skips what a consumer leaves of a body, and stops at the first zero block", async () => {
    const archive = Buffer.concat([
      fileHeader("a", 1000),
      Buffer.alloc(1024, 1),
      fileHeader("b", 0),
      Buffer.alloc(512),
      Buffer.from("garbage after the end of the archive"),
    ]);
    const names: string[] = [];
    for await (const entry of readTar(Readable.from([archive]))) names.push(entry.header.name);
    expect(names).toEqual(["a", "b"]);
  });

  it("lets go of its source when the archive ends, when it fails, and when the consumer stops", async () => {
    const ended = Readable.from([
      Buffer.concat([fileHeader("a", 0), Buffer.alloc(1024), Buffer.alloc(4096, 9)]),
    ]);
    for await (const _ of readTar(ended)) {
    }
    expect(ended.destroyed).toBe(true);
    const bad = Readable.from([Buffer.alloc(512, 7), Buffer.alloc(512)]);
    await expect(drain(bad)).rejects.toThrow(InvalidLayerError);
    expect(bad.destroyed).toBe(true);
    const stopped = Readable.from([
      Buffer.concat([fileHeader("a", 0), fileHeader("b", 0), Buffer.alloc(1024)]),
    ]);
    for await (const _ of readTar(stopped)) break;
    expect(stopped.destroyed).toBe(true);
  });

  it.each([
    [
      "a bad checksum",
      () => Buffer.concat([corrupt(fileHeader("f", 0)), Buffer.alloc(1024)]),
      /not a valid tar stream \(a header's checksum does not match\)/,
    ],
    ["a header cut short", () => fileHeader("f", 0).subarray(0, 300), /ends unexpectedly/],
    [
      "a body cut short",
      () => Buffer.concat([fileHeader("f", 2000), Buffer.alloc(1000)]),
      /ends in the middle of entry "f" \(declared 2000 bytes\)/,
    ],
    [
      "a missing padding",
      () => Buffer.concat([fileHeader("f", 10), Buffer.alloc(10)]),
      /ends unexpectedly after entry "f"/,
    ],
    [
      "a PAX header cut short",
      () => {
        const h = fileHeader("p", 100);
        h.write("x", 156);
        return resum(h);
      },
      /ends unexpectedly/,
    ],
    [
      "a malformed PAX record",
      () => {
        const h = fileHeader("p", 12);
        h.write("x", 156);
        return Buffer.concat([resum(h), Buffer.from("99 path=xy\n\n"), Buffer.alloc(500)]);
      },
      /malformed PAX record/,
    ],
    [
      "an oversized PAX header",
      () => {
        const h = fileHeader("p", MAX_META_BYTES + 1);
        h.write("x", 156);
        return resum(h);
      },
      /PAX header of \d+ bytes, over/,
    ],
    [
      "a non-numeric PAX size",
      () => {
        const r = "14 size=12abc\n";
        const h = fileHeader("p", r.length);
        h.write("x", 156);
        return Buffer.concat([resum(h), Buffer.from(r), Buffer.alloc(512 - r.length), fileHeader("f", 0)]);
      },
      /PAX size="12abc" is not a number/,
    ],
  ])("refuses %s with an error naming what is wrong", async (_name, make, message) => {
    const err = await readAll(make()).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(InvalidLayerError);
    expect((err as Error).message).toMatch(message);
  });
});

async function drain(source: Readable) {
  for await (const _ of readTar(source)) {
  }
}

/** Recomputes a hand-edited header's checksum. */
function resum(h: Buffer): Buffer {
  h.fill(" ", 148, 156);
  let sum = 0;
  for (const x of h) sum += x;
  h.write(`${sum.toString(8).padStart(6, "0")}\0 `, 148);
  return h;
}

function corrupt(h: Buffer): Buffer {
  h[0] = h[0]! ^ 1;
  return h;
}
