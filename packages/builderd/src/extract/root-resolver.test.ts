import fs from "node:fs";
import path from "node:path";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { InvalidLayerError, UnsafeLayerEntryError } from "./errors.js";
import { createRootResolver } from "./root-resolver.js";

describe("createRootResolver", () => {
  let tmp: { path: string; remove(): void };
  let root: string;
  beforeEach(() => {
    tmp = tempDir("kiln-resolver-");
    root = path.join(tmp.path, "x", "y", "rootfs");
    fs.mkdirSync(path.join(root, "usr/lib"), { recursive: true });
    fs.mkdirSync(path.join(root, "run"));
    fs.mkdirSync(path.join(root, "var"));
    fs.writeFileSync(path.join(root, "afile"), "");
    fs.symlinkSync("usr/lib", path.join(root, "lib"));
    fs.symlinkSync("/run", path.join(root, "var/run"));
    fs.symlinkSync("../lib", path.join(root, "usr/lib2")); // chains through another symlink
    fs.symlinkSync("usr/../run", path.join(root, "dotdot-inside"));
    fs.symlinkSync("/", path.join(root, "slash"));
    fs.symlinkSync("../../..", path.join(root, "evil"));
    fs.symlinkSync("../x", path.join(root, "above-by-one"));
    fs.symlinkSync("b", path.join(root, "a"));
    fs.symlinkSync("a", path.join(root, "b"));
    fs.symlinkSync("missing/dir", path.join(root, "to-missing"));
  });
  afterEach(() => tmp.remove());

  const split = (p: string) => (p === "" ? [] : p.split("/"));

  it.each([
    ["", ""],
    ["usr/lib", "usr/lib"],
    ["lib", "usr/lib"],
    ["var/run", "run"],
    ["usr/lib2", "usr/lib"],
    ["dotdot-inside", "run"],
    ["slash", ""],
    ["slash/usr/./lib", "usr/lib"],
  ])("resolves %j to %j inside the rootfs", (dir, want) => {
    expect(createRootResolver(root).resolveDir(split(dir), `${dir}/entry`, false)).toBe(want);
  });

  it("creates missing directories, also behind a symlink, only when asked", () => {
    const created: string[] = [];
    const r = createRootResolver(root, { onCreatedDir: (rel) => created.push(rel) });
    expect(r.resolveDir(["new", "deep"], "new/deep/f", false)).toBeNull();
    expect(fs.existsSync(path.join(root, "new"))).toBe(false);
    expect(r.resolveDir(["new", "deep"], "new/deep/f", true)).toBe("new/deep");
    expect(r.resolveDir(["to-missing", "x"], "to-missing/x/f", true)).toBe("missing/dir/x");
    expect(created).toEqual(["new", "new/deep", "missing", "missing/dir", "missing/dir/x"]);
    expect(fs.statSync(path.join(root, "missing/dir/x")).isDirectory()).toBe(true);
    expect(fs.lstatSync(path.join(root, "to-missing")).isSymbolicLink()).toBe(true);
  });

  it.each([["evil"], ["evil/x"], ["above-by-one"], ["lib/../../evil"]])(
    "refuses %j, which leads above the root, naming the entry",
    (dir) => {
      const r = createRootResolver(root);
      expect(() => r.resolveDir(split(dir), "the-entry", true)).toThrow(UnsafeLayerEntryError);
      expect(() => r.resolveDir(split(dir), "the-entry", true)).toThrow(/"the-entry".*above the rootfs root/);
    },
  );

  it("refuses a symlink loop", () => {
    expect(() => createRootResolver(root).resolveDir(["a"], "a/x", true)).toThrow(/"a\/x".*symlink loop/);
  });

  it("refuses to create below a regular file, and finds nothing there on lookup", () => {
    const r = createRootResolver(root);
    expect(() => r.resolveDir(["afile", "x"], "afile/x/y", true)).toThrow(InvalidLayerError);
    expect(r.resolveDir(["afile", "x"], "afile/x/y", false)).toBeNull();
  });

  it("reports each pre-existing directory once, and caches until invalidated", () => {
    const seen: string[] = [];
    const r = createRootResolver(root, { onExistingDir: (rel) => seen.push(rel) });
    expect(r.resolveDir(["lib"], "lib/a", true)).toBe("usr/lib");
    expect(r.resolveDir(["lib"], "lib/b", true)).toBe("usr/lib");
    expect(seen).toEqual(["usr", "usr/lib"]);
    // The layer replaces the symlink with a directory and says so.
    fs.unlinkSync(path.join(root, "lib"));
    fs.mkdirSync(path.join(root, "lib"));
    expect(r.resolveDir(["lib"], "lib/c", true)).toBe("usr/lib"); // stale until told
    r.invalidate();
    expect(r.resolveDir(["lib"], "lib/c", true)).toBe("lib");
  });

  it("uses what the applier told it about new nodes", () => {
    const r = createRootResolver(root);
    fs.symlinkSync("usr", path.join(root, "u"));
    r.setSymlink("u", "usr");
    expect(r.resolveDir(["u", "lib"], "u/lib/x", true)).toBe("usr/lib");
  });
});
