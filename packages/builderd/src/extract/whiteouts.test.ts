import fs from "node:fs";
import path from "node:path";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { UnsafeLayerEntryError } from "./errors.js";
import { classifyWhiteout, removeLower } from "./whiteouts.js";

describe("classifyWhiteout", () => {
  it("recognises opaque markers and named whiteouts", () => {
    expect(classifyWhiteout(".wh..wh..opq", "d/.wh..wh..opq")).toEqual({ kind: "opaque" });
    expect(classifyWhiteout(".wh.passwd", "etc/.wh.passwd")).toEqual({ kind: "remove", name: "passwd" });
    expect(classifyWhiteout(".wh..hidden", ".wh..hidden")).toEqual({ kind: "remove", name: ".hidden" });
  });

  it("leaves ordinary names alone", () => {
    expect(classifyWhiteout("passwd", "etc/passwd")).toBeNull();
    expect(classifyWhiteout("wh.x", "wh.x")).toBeNull();
    expect(classifyWhiteout(".whx", ".whx")).toBeNull();
  });

  it.each([".wh.", ".wh..", ".wh..."])("refuses %j, which would name the directory or its parent", (base) => {
    expect(() => classifyWhiteout(base, `d/${base}`)).toThrow(UnsafeLayerEntryError);
    expect(() => classifyWhiteout(base, `d/${base}`)).toThrow(`"d/${base}"`);
  });
});

describe("removeLower", () => {
  let tmp: { path: string; remove(): void };
  let root: string;
  beforeEach(() => {
    tmp = tempDir("kiln-whiteouts-");
    root = path.join(tmp.path, "rootfs");
    for (const d of ["d/sub", "d/keep/inner", "other"]) fs.mkdirSync(path.join(root, d), { recursive: true });
    for (const f of ["d/f", "d/sub/g", "d/keep/lower", "d/keep/inner/upper", "other/o"]) {
      fs.writeFileSync(path.join(root, f), f);
    }
    fs.writeFileSync(path.join(tmp.path, "outside"), "outside");
    fs.symlinkSync(path.join(tmp.path, "outside"), path.join(root, "d/link-out"));
    fs.symlinkSync("/", path.join(root, "d/link-root"));
  });
  afterEach(() => tmp.remove());

  const exists = (rel: string) => fs.existsSync(path.join(root, rel)) || isLink(path.join(root, rel));
  const isLink = (p: string) => fs.lstatSync(p, { throwIfNoEntry: false })?.isSymbolicLink() ?? false;

  it("removes a whole lower tree and reports it", () => {
    const removed: string[] = [];
    removeLower(root, "d", new Set(), false, (rel) => removed.push(rel));
    expect(exists("d")).toBe(false);
    expect(exists("other/o")).toBe(true);
    expect(removed).toEqual(["d"]);
    expect(fs.readFileSync(path.join(tmp.path, "outside"), "utf8")).toBe("outside");
  });

  it("spares what this layer created (and their ancestors), removing the rest below", () => {
    const upper = new Set(["d", "d/keep", "d/keep/inner", "d/keep/inner/upper"]);
    removeLower(root, "d", upper, false, () => {});
    expect(["d/keep/inner/upper", "d/keep", "d"].map(exists)).toEqual([true, true, true]);
    expect(["d/f", "d/sub", "d/keep/lower", "d/link-out"].map(exists)).toEqual([false, false, false, false]);
  });

  it("keeps the top of an opaque directory even when this layer did not create it", () => {
    const removed: string[] = [];
    removeLower(root, "d", new Set(), true, (rel) => removed.push(rel));
    expect(exists("d")).toBe(true);
    expect(fs.readdirSync(path.join(root, "d"))).toEqual([]);
    expect(removed.sort()).toEqual(["d/f", "d/keep", "d/link-out", "d/link-root", "d/sub"]);
  });

  it("removes symlinks themselves, never what they point to", () => {
    removeLower(root, "d/link-out", new Set(), false, () => {});
    removeLower(root, "d/link-root", new Set(), false, () => {});
    expect(isLink(path.join(root, "d/link-out"))).toBe(false);
    expect(fs.readFileSync(path.join(tmp.path, "outside"), "utf8")).toBe("outside");
    expect(fs.existsSync("/etc/passwd")).toBe(true);
  });

  it("does nothing for a path that does not exist", () => {
    const removed: string[] = [];
    removeLower(root, "nope/deeper", new Set(), false, (rel) => removed.push(rel));
    removeLower(root, "d/f/not-a-dir", new Set(), false, (rel) => removed.push(rel));
    expect(removed).toEqual([]);
  });
});
