import fs from "node:fs";
import path from "node:path";
import { PassThrough, Readable } from "node:stream";
import zlib from "node:zlib";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { compress as zstd } from "zstd-napi";
import { type EntrySpec, layerTar } from "../testing/oci-layout.js";
import { type ApplyLayerOptions, applyLayer } from "./apply-layer.js";
import { decompressLayer } from "./decompress.js";
import { InvalidLayerError, LayerTooLargeError, TooManyEntriesError } from "./errors.js";
import { fileHeader, layerStream } from "./fixtures/layer-streams.js";

let tmp: { path: string; remove(): void };
let rootfs: string;
beforeEach(() => {
  tmp = tempDir("kiln-apply-layer-");
  rootfs = path.join(tmp.path, "rootfs");
  fs.mkdirSync(rootfs, { mode: 0o755 });
});
afterEach(() => tmp.remove());

const T = new Date("2023-05-06T07:08:09Z");
const apply = async (entries: EntrySpec[], opts: Partial<ApplyLayerOptions> = {}) =>
  applyLayer(rootfs, await layerStream(entries), { maxBytes: 0, ...opts });
const at = (rel: string) => path.join(rootfs, rel);
const ls = (rel: string) => fs.readdirSync(at(rel)).sort();
const mode = (rel: string) => fs.lstatSync(at(rel)).mode & 0o7777;

describe("applyLayer", () => {
  it("writes files with content, mode, owner and mtime, and counts entries and bytes", async () => {
    const r = await apply([
      { type: "dir", path: "etc" },
      { type: "file", path: "etc/motd", content: "hello\n", mode: 0o640, uid: 12, gid: 34, mtime: T },
      { type: "file", path: "usr/bin/su", content: "x", mode: 0o4755 },
    ]);
    expect(fs.readFileSync(at("etc/motd"), "utf8")).toBe("hello\n");
    const st = fs.statSync(at("etc/motd"));
    expect([st.mode & 0o7777, st.uid, st.gid, st.mtime.toISOString()]).toEqual([
      0o640,
      12,
      34,
      T.toISOString(),
    ]);
    expect(mode("usr/bin/su")).toBe(0o4755);
    expect(mode("usr")).toBe(0o755); // created implicitly, like umoci's MkdirAll
    expect(r).toEqual({ entries: 3, bytesWritten: 7, skipped: [] });
  });

  it("keeps an existing directory's children but updates its mode, owner and mtime", async () => {
    await apply([
      { type: "dir", path: "d", mode: 0o755 },
      { type: "file", path: "d/lower" },
    ]);
    await apply([
      { type: "dir", path: "d", mode: 0o2770, uid: 5, gid: 6, mtime: T },
      { type: "file", path: "d/upper" },
    ]);
    expect(ls("d")).toEqual(["lower", "upper"]);
    const st = fs.statSync(at("d"));
    expect([st.mode & 0o7777, st.uid, st.gid]).toEqual([0o2770, 5, 6]);
    expect(st.mtime.toISOString()).toBe(T.toISOString()); // set after its children were added
  });

  it("leaves the mtime of a lower directory alone when a layer adds to it", async () => {
    await apply([{ type: "dir", path: "d", mtime: T }]);
    await apply([{ type: "file", path: "d/new" }]);
    expect(fs.statSync(at("d")).mtime.toISOString()).toBe(T.toISOString());
  });

  it("stores symlink targets verbatim and sets the link's own owner and mtime", async () => {
    await apply([
      { type: "symlink", path: "abs", target: "/usr/bin/env", uid: 3, gid: 4, mtime: T },
      { type: "symlink", path: "rel", target: "../../x/y" },
    ]);
    expect(fs.readlinkSync(at("abs"))).toBe("/usr/bin/env");
    expect(fs.readlinkSync(at("rel"))).toBe("../../x/y");
    const st = fs.lstatSync(at("abs"));
    expect([st.uid, st.gid, st.mtime.toISOString()]).toEqual([3, 4, T.toISOString()]);
  });

  it("hardlinks to entries of the same and of earlier layers", async () => {
    await apply([{ type: "file", path: "a", content: "A" }]);
    await apply([
      { type: "hardlink", path: "b", target: "a" },
      { type: "file", path: "c", content: "C" },
      { type: "hardlink", path: "sub/d", target: "./c" },
    ]);
    expect(fs.statSync(at("b")).ino).toBe(fs.statSync(at("a")).ino);
    expect(fs.statSync(at("sub/d")).ino).toBe(fs.statSync(at("c")).ino);
  });

  it("replaces a path of another type: file over directory tree, directory over file, symlink over directory", async () => {
    await apply([
      { type: "file", path: "x/deep/f" },
      { type: "file", path: "y" },
      { type: "file", path: "z/f" },
    ]);
    await apply([
      { type: "file", path: "x", content: "now a file" },
      { type: "dir", path: "y" },
      { type: "symlink", path: "z", target: "x" },
    ]);
    expect(fs.readFileSync(at("x"), "utf8")).toBe("now a file");
    expect(fs.lstatSync(at("y")).isDirectory()).toBe(true);
    expect(fs.readlinkSync(at("z"))).toBe("x");
  });

  it("applies whiteouts and opaque directories to lower layers only, in any order within the layer", async () => {
    await apply([
      { type: "file", path: "gone" },
      { type: "file", path: "tree/a/b" },
      { type: "file", path: "op1/lower" },
      { type: "file", path: "op2/lower" },
    ]);
    const r = await apply([
      { type: "file", path: ".wh.gone", content: "" },
      { type: "file", path: ".wh.tree", content: "" },
      { type: "file", path: "op1/.wh..wh..opq", content: "" },
      { type: "file", path: "op1/mine" },
      { type: "file", path: "op2/mine" },
      { type: "file", path: "op2/.wh..wh..opq", content: "" },
      { type: "file", path: "missing/.wh.whatever", content: "" },
    ]);
    expect(ls("")).toEqual(["op1", "op2"]);
    expect(ls("op1")).toEqual(["mine"]);
    expect(ls("op2")).toEqual(["mine"]);
    expect(r.entries).toBe(7);
  });

  it("sets the rootfs root's mode from a ./ entry", async () => {
    await apply([{ type: "dir", path: "./", mode: 0o750 }]);
    expect(mode("")).toBe(0o750);
  });

  it("skips device nodes and fifos and says so", async () => {
    const r = await apply([
      { type: "char-device", path: "dev/null", major: 1, minor: 3 },
      { type: "block-device", path: "dev/sda", major: 8, minor: 0 },
      { type: "fifo", path: "run/fifo" },
    ]);
    expect(r.skipped.map((s) => s.path)).toEqual(["dev/null", "dev/sda", "run/fifo"]);
    expect(r.skipped[0]!.reason).toMatch(/character-device entries are not created/);
    expect(ls("dev")).toEqual([]);
  });

  it("reports, once per layer, extended attributes a tree without an image cannot keep", async () => {
    const x = (name: string, pax: Record<string, string>): EntrySpec => ({
      type: "raw",
      header: { name, type: "file", size: 1, pax },
      content: Buffer.from("x"),
    });
    const r = await apply([
      x("a", { "SCHILY.xattr.user.test": "v" }),
      x("b", { "SCHILY.xattr.user.test": "v", "SCHILY.xattr.system.posix_acl_access": "acl" }),
    ]);
    expect(r.skipped).toEqual([
      {
        path: "a",
        reason:
          "3 extended attributes not kept in this layer; the first, user.test: only Kiln's ext4 writer keeps them (ext4Writer=kiln)",
      },
    ]);
    expect(fs.readFileSync(at("b"), "utf8")).toBe("x");
  });

  it("applies PAX uid, gid and sub-second mtime", async () => {
    await apply([
      {
        type: "raw",
        header: {
          name: "p",
          type: "file",
          size: 0,
          pax: { uid: "3000000", gid: "3000001", mtime: "1700000000.25" },
        },
        content: Buffer.alloc(0),
      },
    ]);
    const st = fs.statSync(at("p"));
    expect([st.uid, st.gid, st.mtimeMs]).toEqual([3000000, 3000001, 1700000000250]);
  });

  it("refuses an owner that does not fit a uid", async () => {
    const err = await apply([
      {
        type: "raw",
        header: { name: "p", type: "file", size: 0, pax: { uid: "99999999999" } },
        content: Buffer.alloc(0),
      },
    ]).catch((e) => e);
    expect(err).toBeInstanceOf(InvalidLayerError);
    expect(err.message).toBe('layer entry "p" has an invalid uid or gid');
  });

  it("does not chown when told not to", async () => {
    await apply([{ type: "file", path: "f", uid: 1234, gid: 1234, mode: 0o4755 }], { chown: false });
    const st = fs.statSync(at("f"));
    expect([st.uid, st.gid, st.mode & 0o7777]).toEqual([process.getuid!(), process.getgid!(), 0o4755]);
  });

  it("reports progress in bytes written, a few times per large file and once at the end", async () => {
    const tarBytes = await layerTar([{ type: "file", path: "big", content: Buffer.alloc(9 * 1024 * 1024) }]);
    const chunks = Array.from({ length: Math.ceil(tarBytes.length / 65536) }, (_, i) =>
      tarBytes.subarray(i * 65536, (i + 1) * 65536),
    );
    const seen: number[] = [];
    await applyLayer(rootfs, Readable.from(chunks), { maxBytes: 0, onProgress: (n) => seen.push(n) });
    expect(seen).toHaveLength(3); // every 4 MiB, then the total
    expect(seen[0]).toBeGreaterThanOrEqual(4 * 1024 * 1024);
    expect(seen[1]! - seen[0]!).toBeGreaterThanOrEqual(4 * 1024 * 1024);
    expect(seen[2]).toBe(9 * 1024 * 1024);
  });

  it("refuses to create something below a file", async () => {
    await expect(
      apply([
        { type: "file", path: "f" },
        { type: "file", path: "f/x" },
      ]),
    ).rejects.toThrow(InvalidLayerError);
  });

  it("refuses a tar entry type it does not know", async () => {
    const h = fileHeader("sparse", 0);
    h.write("S", 156); // GNU sparse
    h.fill(" ", 148, 156);
    let sum = 0;
    for (const x of h) sum += x;
    h.write(`${sum.toString(8).padStart(6, "0")}\0 `, 148);
    const err = await applyLayer(rootfs, Readable.from([h, Buffer.alloc(1024)]), { maxBytes: 0 }).catch(
      (e) => e,
    );
    expect(err).toBeInstanceOf(InvalidLayerError);
    expect(err.message).toMatch(/"sparse" has an unsupported tar entry type/);
  });

  it("says a stream that is not a tar is not a tar", async () => {
    const err = await applyLayer(rootfs, Readable.from([Buffer.alloc(512, 7)]), { maxBytes: 0 }).catch(
      (e) => e,
    );
    expect(err).toBeInstanceOf(InvalidLayerError);
    expect(err.message).toMatch(/not a valid tar stream/);
  });

  it("requires the rootfs to exist", async () => {
    await expect(
      applyLayer(path.join(tmp.path, "nope"), await layerStream([]), { maxBytes: 0 }),
    ).rejects.toThrow(/rootfs .*nope does not exist/);
  });
});

describe("applyLayer limits", () => {
  it("counts the budget across layers: usedBytes plus this layer's bytes", async () => {
    const err = await apply([{ type: "file", path: "f", content: Buffer.alloc(200) }], {
      maxBytes: 1000,
      usedBytes: 900,
    }).catch((e) => e);
    expect(err).toBeInstanceOf(LayerTooLargeError);
    expect(err.limitBytes).toBe(1000);
    expect(err.message).toBe(
      `image exceeds the tenant's MaxDiskBytes (1000 bytes) while extracting "f"; use a smaller image or a tier with more disk`,
    );
    await expect(
      apply([{ type: "file", path: "g", content: Buffer.alloc(100) }], { maxBytes: 1000, usedBytes: 900 }),
    ).resolves.toMatchObject({ bytesWritten: 100 });
  });

  it.each([
    ["gzip", (b: Buffer) => zlib.gzipSync(b, { level: 9 })],
    ["zstd", (b: Buffer) => zstd(b, { compressionLevel: 19 })],
  ] as const)("stops a %s bomb of a few KB as soon as it would pass maxBytes", async (compression, pack) => {
    const tarBytes = await layerTar([
      { type: "file", path: "zeros", content: Buffer.alloc(64 * 1024 * 1024) },
    ]);
    const bomb = pack(tarBytes);
    expect(bomb.length).toBeLessThan(100 * 1024);
    const source = Readable.from([bomb]);
    const err = await applyLayer(rootfs, decompressLayer(source, compression), {
      maxBytes: 8 * 1024 * 1024,
    }).catch((e) => e);
    expect(err).toBeInstanceOf(LayerTooLargeError);
    expect(err.message).toContain('while extracting "zeros"');
    expect(fs.existsSync(at("zeros"))).toBe(false); // refused from the declared size, before writing
    expect(source.destroyed).toBe(true);
  });

  it("stops many small files once their sum passes maxBytes, without writing past it", async () => {
    const files: EntrySpec[] = Array.from({ length: 50 }, (_, i) => ({
      type: "file",
      path: `f${String(i).padStart(2, "0")}`,
      content: Buffer.alloc(100 * 1024),
    }));
    const err = await apply(files, { maxBytes: 1024 * 1024 }).catch((e) => e);
    expect(err).toBeInstanceOf(LayerTooLargeError);
    expect(err.message).toContain('"f10"');
    const written = ls("").reduce((n, f) => n + fs.statSync(at(f)).size, 0);
    expect(written).toBeLessThanOrEqual(1024 * 1024);
  });

  it("caps the number of entries", async () => {
    const files: EntrySpec[] = Array.from({ length: 11 }, (_, i) => ({ type: "dir", path: `d${i}` }));
    const err = await apply(files, { maxEntries: 10 }).catch((e) => e);
    expect(err).toBeInstanceOf(TooManyEntriesError);
    expect(err.message).toMatch(/more than 10 entries \(stopped at "d10"\)/);
  });

  it("fails clearly on a truncated stream with an enormous declared size", async () => {
    const declared = 64 * 1024 ** 3;
    const stream = () => Readable.from([fileHeader("huge", declared), Buffer.alloc(4096, 1)]);
    const err = await applyLayer(rootfs, stream(), { maxBytes: 0 }).catch((e) => e);
    expect(err).toBeInstanceOf(InvalidLayerError);
    expect(err.message).toBe(
      `layer tar ends in the middle of entry "huge" (declared ${declared} bytes); it is truncated or corrupt`,
    );
    // With a budget, the declared size alone is refused before anything is written.
    const err2 = await applyLayer(rootfs, stream(), { maxBytes: 1024 ** 3 }).catch((e) => e);
    expect(err2).toBeInstanceOf(LayerTooLargeError);
  });

  it("stops promptly on abort, rejecting with the abort reason and releasing the stream", async () => {
    const source = new PassThrough();
    source.write(fileHeader("slow", 1024 * 1024));
    source.write(Buffer.alloc(64 * 1024));
    const ac = new AbortController();
    const reason = new Error("build cancelled");
    const started = Date.now();
    setTimeout(() => ac.abort(reason), 50);
    const err = await applyLayer(rootfs, source, { maxBytes: 0, signal: ac.signal }).catch((e) => e);
    expect(err).toBe(reason);
    expect(Date.now() - started).toBeLessThan(2000);
    expect(source.destroyed).toBe(true);
  });

  it("rejects at once when the signal is already aborted", async () => {
    const ac = new AbortController();
    ac.abort(new Error("already"));
    await expect(apply([{ type: "file", path: "f" }], { signal: ac.signal })).rejects.toThrow("already");
    expect(ls("")).toEqual([]);
  });
});
