import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { InvalidArgumentError } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, describe, expect, it } from "vitest";
import { type OptimizeSettings, optimizeRootfs } from "./optimize.js";

const dirs: Array<{ remove(): void }> = [];
afterEach(() => {
  for (const d of dirs.splice(0)) d.remove();
});

const none: OptimizeSettings = {
  removeDocs: false,
  removeCache: false,
  excludePatterns: [],
  preservePaths: [],
};

/** Builds a tree from { "path": content | null (directory) } and returns its root. */
function tree(entries: Record<string, string | null>): string {
  const d = tempDir("kiln-optimize-");
  dirs.push(d);
  const root = path.join(d.path, "rootfs");
  fs.mkdirSync(root);
  for (const [p, content] of Object.entries(entries)) {
    const abs = path.join(root, p);
    if (content === null) fs.mkdirSync(abs, { recursive: true });
    else {
      fs.mkdirSync(path.dirname(abs), { recursive: true });
      fs.writeFileSync(abs, content);
    }
  }
  return root;
}

/** Every path below root, sorted ("dir/" for directories). */
function listing(root: string): string[] {
  const out: string[] = [];
  const walk = (dir: string, rel: string) => {
    for (const name of fs.readdirSync(dir)) {
      const r = rel ? `${rel}/${name}` : name;
      const st = fs.lstatSync(path.join(dir, name));
      out.push(st.isDirectory() ? `${r}/` : r);
      if (st.isDirectory()) walk(path.join(dir, name), r);
    }
  };
  walk(root, "");
  return out.sort();
}

describe("optimizeRootfs", () => {
  it("removes docs but keeps copyright files and the C/English locales", async () => {
    const root = tree({
      "usr/share/doc/bash/README": "x".repeat(100),
      "usr/share/doc/bash/copyright": "GPL",
      "usr/share/man/man1/ls.1.gz": "m",
      "usr/share/info/dir": "i",
      "usr/share/locale/de/LC_MESSAGES/x.mo": "de",
      "usr/share/locale/en_GB/LC_MESSAGES/x.mo": "en",
      "usr/share/locale/C.UTF-8/x": "c",
      "usr/share/locale/locale.alias": "a",
      "usr/bin/ls": "elf",
    });
    const r = await optimizeRootfs(root, { ...none, removeDocs: true });
    expect(listing(root)).toEqual([
      "usr/",
      "usr/bin/",
      "usr/bin/ls",
      "usr/share/",
      "usr/share/doc/",
      "usr/share/doc/bash/",
      "usr/share/doc/bash/copyright",
      "usr/share/info/",
      "usr/share/locale/",
      "usr/share/locale/C.UTF-8/",
      "usr/share/locale/C.UTF-8/x",
      "usr/share/locale/en_GB/",
      "usr/share/locale/en_GB/LC_MESSAGES/",
      "usr/share/locale/en_GB/LC_MESSAGES/x.mo",
      "usr/share/locale/locale.alias",
      "usr/share/man/",
    ]);
    // README, man1 + ls.1.gz, info/dir, de + LC_MESSAGES + x.mo
    expect(r.removedEntries).toBe(7);
    expect(r.removedBytes).toBe(100 + 1 + 1 + 2);
  });

  it("removes package manager and language caches, keeping debconf's database", async () => {
    const root = tree({
      "var/cache/apt/archives/x.deb": "deb",
      "var/cache/debconf/config.dat": "cfg",
      "var/lib/apt/lists/deb.debian.org_dists": "lists",
      "var/lib/dpkg/status": "keep",
      "root/.cache/pip/x": "p",
      "home/alice/.cache/y": "y",
      "home/alice/notes": "keep",
      "tmp/scratch": "t",
      "usr/lib/python3/pkg/__pycache__/m.cpython.pyc": "pyc",
      "usr/lib/python3/pkg/m.py": "py",
    });
    await optimizeRootfs(root, { ...none, removeCache: true });
    expect(listing(root).filter((p) => !p.endsWith("/"))).toEqual([
      "home/alice/notes",
      "usr/lib/python3/pkg/m.py",
      "var/cache/debconf/config.dat",
      "var/lib/dpkg/status",
    ]);
    expect(fs.existsSync(path.join(root, "tmp"))).toBe(true);
    expect(fs.existsSync(path.join(root, "usr/lib/python3/pkg/__pycache__"))).toBe(false);
  });

  it("applies exclude patterns (absolute or relative), and preserve paths win over every rule", async () => {
    const root = tree({
      "opt/app/test/a.js": "a",
      "opt/app/test/fixtures/keep.json": "k",
      "opt/app/src/index.js": "i",
      "srv/x.log": "l",
      "usr/share/doc/pkg/README": "r",
      ".kiln/init": "init",
    });
    await optimizeRootfs(root, {
      removeDocs: true,
      removeCache: false,
      excludePatterns: ["/opt/app/test", "**/*.log", "**"],
      preservePaths: ["/opt/app/test/fixtures/", "opt/app/src", "usr/share/doc/pkg/README"],
    });
    expect(listing(root).filter((p) => !p.endsWith("/"))).toEqual([
      ".kiln/init",
      "opt/app/src/index.js",
      "opt/app/test/fixtures/keep.json",
      "usr/share/doc/pkg/README",
    ]);
  });

  it.each([
    ["../etc", /must not contain "\.\."/],
    ["usr/../../etc", /must not contain "\.\."/],
    ["", /empty/],
    ["/", /empty/],
    ["lib/[abc", /unterminated "\["/],
  ])("refuses exclude pattern %j before removing anything", async (pattern, message) => {
    const root = tree({ "usr/share/doc/x/README": "r" });
    const err = await optimizeRootfs(root, { ...none, removeDocs: true, excludePatterns: [pattern] }).catch(
      (e) => e,
    );
    expect(err).toBeInstanceOf(InvalidArgumentError);
    expect(err.message).toMatch(message);
    expect(err.field).toBe("config.target.microvm_rootfs.optimization.exclude_patterns[0]");
    expect(fs.existsSync(path.join(root, "usr/share/doc/x/README"))).toBe(true);
  });

  it("refuses a preserve path with ..", async () => {
    const root = tree({});
    await expect(optimizeRootfs(root, { ...none, preservePaths: ["a/../../b"] })).rejects.toThrow(
      /must not contain/,
    );
  });

  it("never follows a symlink out of the rootfs", async () => {
    const outside = tempDir("kiln-outside-");
    dirs.push(outside);
    fs.mkdirSync(path.join(outside.path, "cache"));
    fs.writeFileSync(path.join(outside.path, "cache/precious"), "host data");
    fs.writeFileSync(path.join(outside.path, "file.log"), "host log");
    const root = tree({ "var/lib/apt/lists/x": "l", "srv/": null });
    // var/cache → host dir; tmp → host dir (both matched by cache rules); a matched link to a file.
    fs.symlinkSync(path.join(outside.path, "cache"), path.join(root, "var/cache"));
    fs.mkdirSync(path.join(root, "tmp"));
    fs.symlinkSync(outside.path, path.join(root, "tmp/outside"));
    fs.symlinkSync(path.join(outside.path, "file.log"), path.join(root, "srv/link.log"));
    fs.symlinkSync(outside.path, path.join(root, "srv/dir"));
    await optimizeRootfs(root, { ...none, removeCache: true, excludePatterns: ["**/*.log", "srv/dir/**"] });
    expect(fs.readFileSync(path.join(outside.path, "cache/precious"), "utf8")).toBe("host data");
    expect(fs.readFileSync(path.join(outside.path, "file.log"), "utf8")).toBe("host log");
    // The links themselves were in matched places and are gone (or, srv/dir, left as a link).
    expect(fs.existsSync(path.join(root, "tmp/outside"))).toBe(false);
    expect(fs.existsSync(path.join(root, "srv/link.log"))).toBe(false);
    expect(fs.lstatSync(path.join(root, "srv/dir")).isSymbolicLink()).toBe(true);
    expect(fs.lstatSync(path.join(root, "var/cache")).isSymbolicLink()).toBe(true);
  });

  it("counts a hard-linked file's bytes only when its last link goes", async () => {
    const root = tree({ "keep/data": "0123456789", "tmp/": null });
    fs.linkSync(path.join(root, "keep/data"), path.join(root, "tmp/link"));
    fs.writeFileSync(path.join(root, "tmp/own"), "abc");
    const r = await optimizeRootfs(root, { ...none, removeCache: true });
    expect(r).toMatchObject({ removedEntries: 2, removedBytes: 3 });
    expect(fs.readFileSync(path.join(root, "keep/data"), "utf8")).toBe("0123456789");
  });

  it("does nothing without rules", async () => {
    const root = tree({ "usr/share/doc/a": "a", "tmp/b": "b" });
    expect(await optimizeRootfs(root, none)).toMatchObject({ removedEntries: 0, removedBytes: 0 });
    expect(listing(root)).toHaveLength(6);
  });

  it("strips debug symbols from ELF files and keeps owner, mode and other files", async () => {
    const root = tree({ "bin/": null, "etc/conf": "not elf" });
    // A copy of a host binary with debug info would be ideal; busybox is already stripped, so
    // add a debug section to a copy of it.
    const bin = path.join(root, "bin/busybox");
    fs.copyFileSync("/bin/busybox", bin);
    const note = path.join(path.dirname(root), "note");
    fs.writeFileSync(note, "x".repeat(8192));
    execFileSync("objcopy", ["--add-section", `.debug_kiln=${note}`, bin]);
    fs.chownSync(bin, 1234, 5678);
    fs.chmodSync(bin, 0o750);
    const before = fs.statSync(bin).size;
    const r = await optimizeRootfs(root, { ...none, stripDebugSymbols: true });
    const st = fs.statSync(bin);
    expect(r.strippedFiles).toBe(1);
    expect(st.size).toBeLessThan(before);
    expect(r.strippedBytes).toBe(before - st.size);
    expect([st.uid, st.gid, st.mode & 0o7777]).toEqual([1234, 5678, 0o750]);
    expect(execFileSync(bin, ["echo", "still runs"], { encoding: "utf8" })).toBe("still runs\n");
    expect(fs.readFileSync(path.join(root, "etc/conf"), "utf8")).toBe("not elf");
  });
});
