/**
 * Hostile layers: each must fail with UnsafeLayerEntryError naming the entry (or, for the benign
 * look-alikes, land inside the rootfs), and nothing outside the rootfs may change — checked on a
 * sentinel directory beside the rootfs and a file outside it, reachable by `../../..`.
 */
import fs from "node:fs";
import path from "node:path";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import type { EntrySpec } from "../testing/oci-layout.js";
import { applyLayer } from "./apply-layer.js";
import { UnsafeLayerEntryError } from "./errors.js";
import { escapeArena, layerStream } from "./fixtures/layer-streams.js";
import type { TreeSnapshot } from "./fixtures/tree-snapshot.js";

let tmp: { path: string; remove(): void };
let arena: ReturnType<typeof escapeArena>;
let before: TreeSnapshot;
let passwdLinks: number;
beforeEach(() => {
  tmp = tempDir("kiln-hostile-");
  arena = escapeArena(tmp.path);
  before = arena.outside();
  passwdLinks = fs.statSync("/etc/passwd").nlink;
});
afterEach(() => {
  try {
    // Whatever the layer did, nothing outside the rootfs changed.
    expect(arena.outside()).toEqual(before);
    expect(fs.statSync("/etc/passwd").nlink).toBe(passwdLinks);
  } finally {
    tmp.remove();
  }
});

const apply = async (...layers: EntrySpec[][]) => {
  for (const entries of layers) await applyLayer(arena.rootfs, await layerStream(entries), { maxBytes: 0 });
};
const file = (p: string, content = "pwned\n"): EntrySpec => ({ type: "file", path: p, content });
const symlink = (p: string, target: string): EntrySpec => ({ type: "symlink", path: p, target });
const hardlink = (p: string, target: string): EntrySpec => ({ type: "hardlink", path: p, target });
const raw = (name: string, type: "file" | "symlink" | "directory", linkname?: string): EntrySpec => ({
  type: "raw",
  header: { name, type, size: 0, ...(linkname ? { linkname } : {}) },
  ...(type === "file" ? { content: Buffer.alloc(0) } : {}),
});

async function expectRefused(entry: string, reason: RegExp, ...layers: EntrySpec[][]) {
  const err = await apply(...layers).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(UnsafeLayerEntryError);
  expect((err as UnsafeLayerEntryError).entry).toBe(entry);
  expect((err as UnsafeLayerEntryError).reason).toMatch(reason);
  expect((err as Error).message).toContain(JSON.stringify(entry));
}

describe("applyLayer refuses hostile layers", () => {
  it("../escape", async () => {
    await expectRefused("../escape", /"\.\." component/, [raw("../escape", "file")]);
  });

  it("/abs/path", async () => {
    await expectRefused("/abs/path", /is absolute/, [raw("/abs/path", "file")]);
  });

  it("a/../../escape", async () => {
    await expectRefused("a/../../escape", /"\.\." component/, [
      file("a/keep"),
      raw("a/../../escape", "file"),
    ]);
  });

  it("symlink evil -> ../../.. then evil/pwned", async () => {
    await expectRefused("evil/pwned", /above the rootfs root/, [
      symlink("evil", "../../.."),
      file("evil/pwned"),
    ]);
  });

  it("the same across layers, through a nested path", async () => {
    await expectRefused(
      "x/evil/sentinel/keep",
      /above the rootfs root/,
      [symlink("x/evil", "../../../..")],
      [file("x/evil/sentinel/keep")],
    );
  });

  it("hardlink to /etc/passwd", async () => {
    await expectRefused("h", /hardlink target "\/etc\/passwd" is absolute/, [hardlink("h", "/etc/passwd")]);
  });

  it("hardlink to ../outside", async () => {
    await expectRefused("h", /hardlink target "\.\.\/outside" has a "\.\." component/, [
      hardlink("h", "../outside"),
    ]);
  });

  it("hardlink through a symlink pointing outside", async () => {
    await expectRefused("h", /above the rootfs root/, [
      symlink("esc", "../.."),
      hardlink("h", "esc/sentinel/keep"),
    ]);
  });

  it("hardlink through an absolute symlink: resolved inside the rootfs, where the target does not exist", async () => {
    await expectRefused("h", /hardlink target "hostetc\/passwd" does not exist in the rootfs/, [
      symlink("hostetc", "/etc"),
      hardlink("h", "hostetc/passwd"),
    ]);
  });

  it("symlink loop a -> b, b -> a, then a/x", async () => {
    await expectRefused("a/x", /symlink loop/, [symlink("a", "b"), symlink("b", "a"), file("a/x")]);
  });

  it("whiteout through a symlink pointing outside", async () => {
    await expectRefused("esc/.wh.sentinel", /above the rootfs root/, [
      symlink("esc", "../.."),
      file("esc/.wh.sentinel", ""),
    ]);
  });

  it(".wh.. (a whiteout naming the parent directory)", async () => {
    await expectRefused(".wh..", /names no sibling entry/, [file("keep"), file(".wh..", "")]);
    expect(fs.existsSync(path.join(arena.rootfs, "keep"))).toBe(true);
  });

  it("an entry replacing the rootfs root with a symlink", async () => {
    await expectRefused("./", /replace the rootfs root itself/, [raw("./", "symlink", "/")]);
    expect(fs.lstatSync(arena.rootfs).isDirectory()).toBe(true);
  });

  it("an entry replacing the rootfs root with a file", async () => {
    await expectRefused(".", /replace the rootfs root itself/, [raw(".", "file")]);
  });

  it("a NUL byte in a PAX path", async () => {
    const entry: EntrySpec = {
      type: "raw",
      header: { name: "x", type: "file", size: 0, pax: { path: "ok\0/../../x" } },
      content: Buffer.alloc(0),
    };
    const err = await apply([entry]).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(UnsafeLayerEntryError);
    expect((err as Error).message).toMatch(/NUL byte/);
  });
});

describe("applyLayer keeps look-alikes inside the rootfs", () => {
  it("symlink evil -> / is not an escape: evil/file lands in the rootfs root", async () => {
    await apply([symlink("evil", "/"), file("evil/inside", "inside\n")]);
    expect(fs.readFileSync(path.join(arena.rootfs, "inside"), "utf8")).toBe("inside\n");
  });

  it("a planted symlink x -> outside file, then regular file x: the link is replaced, not written through", async () => {
    await apply([symlink("x", arena.outsideTarget)], [file("x", "new content\n")]);
    const st = fs.lstatSync(path.join(arena.rootfs, "x"));
    expect(st.isFile()).toBe(true);
    expect(fs.readFileSync(path.join(arena.rootfs, "x"), "utf8")).toBe("new content\n");
    expect(fs.readFileSync(arena.outsideTarget, "utf8")).toBe("outside\n");
  });

  it("the same within one layer", async () => {
    await apply([symlink("x", arena.outsideTarget), file("x", "new content\n")]);
    expect(fs.lstatSync(path.join(arena.rootfs, "x")).isFile()).toBe(true);
  });

  it("a planted symlink to an outside directory, then a directory and files of the same name", async () => {
    await apply([symlink("d", arena.sentinel)], [{ type: "dir", path: "d", mode: 0o777 }, file("d/keep")]);
    expect(fs.lstatSync(path.join(arena.rootfs, "d")).isDirectory()).toBe(true);
    expect(fs.readFileSync(path.join(arena.rootfs, "d/keep"), "utf8")).toBe("pwned\n");
  });

  it("a planted absolute symlink to an outside directory is followed inside the rootfs", async () => {
    await apply([symlink("d", arena.sentinel), file("d/keep")]);
    const inside = path.join(arena.rootfs, path.relative("/", arena.sentinel), "keep");
    expect(fs.readFileSync(inside, "utf8")).toBe("pwned\n");
  });

  it("a planted symlink, then a hardlink and a symlink of the same name replace it", async () => {
    await apply(
      [file("real"), symlink("l1", arena.outsideTarget), symlink("l2", arena.outsideTarget)],
      [hardlink("l1", "real"), symlink("l2", "real")],
    );
    expect(fs.lstatSync(path.join(arena.rootfs, "l1")).isFile()).toBe(true);
    expect(fs.readlinkSync(path.join(arena.rootfs, "l2"))).toBe("real");
  });

  it("a hardlink to a symlink pointing outside links the symlink, not its target", async () => {
    await apply([symlink("out", arena.outsideTarget), hardlink("h", "out")]);
    expect(fs.lstatSync(path.join(arena.rootfs, "h")).isSymbolicLink()).toBe(true);
    expect(fs.statSync(arena.outsideTarget).nlink).toBe(1);
  });

  it("whiteouts of a symlink pointing outside remove only the link", async () => {
    await apply([symlink("s", arena.sentinel), symlink("t", "/")], [file(".wh.s", ""), file(".wh.t", "")]);
    expect(fs.readdirSync(arena.rootfs)).toEqual([]);
  });

  it("an opaque whiteout in a directory reached through evil -> / empties the rootfs root, not the host's", async () => {
    await apply([file("etc/passwd"), symlink("evil", "/")], [file("evil/.wh..wh..opq", ""), file("new")]);
    expect(fs.readdirSync(arena.rootfs)).toEqual(["new"]);
  });
});
