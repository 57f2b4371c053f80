import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { tempDir } from "@kiln/kit/testing";
import { describe, expect, it } from "vitest";
import { parseCpio, writeCpio } from "./cpio.js";

const hasCpio = spawnSync("cpio", ["--version"]).status === 0;

describe("writeCpio", () => {
  const entries = () =>
    writeCpio([
      { type: "dir", path: "bin" },
      { type: "file", path: "bin/tool", data: Buffer.from("#!/bin/sh\necho hi\n"), mode: 0o755 },
      { type: "file", path: "/odd", data: Buffer.from("12345") }, // 5 bytes: data padding
      { type: "symlink", path: "bin/sh", target: "tool" },
      { type: "char-device", path: "console", major: 5, minor: 1 },
    ]);

  it("round-trips through its own parser", () => {
    const parsed = parseCpio(entries());
    expect(parsed.map((e) => [e.path, e.type, e.mode.toString(8)])).toEqual([
      ["bin", "dir", "755"],
      ["bin/tool", "file", "755"],
      ["odd", "file", "644"],
      ["bin/sh", "symlink", "777"],
      ["console", "char-device", "600"],
    ]);
    expect(parsed[2]!.data.toString()).toBe("12345");
    expect(parsed[3]!.data.toString()).toBe("tool");
    expect([parsed[4]!.rdevMajor, parsed[4]!.rdevMinor]).toEqual([5, 1]);
  });

  it.skipIf(!hasCpio)("is read by GNU cpio (newc), contents and modes intact", () => {
    const dir = tempDir("kiln-cpio-");
    try {
      const archive = path.join(dir.path, "a.cpio");
      fs.writeFileSync(archive, entries());
      const listing = execFileSync("cpio", ["-t", "-v", "--quiet", "-F", archive], { encoding: "utf8" });
      expect(listing).toMatch(/^-rwxr-xr-x .* bin\/tool$/m);
      expect(listing).toMatch(/^lrwxrwxrwx .* bin\/sh -> tool$/m);
      expect(listing).toMatch(/^crw------- .* 5,\s+1 .* console$/m);
      const out = path.join(dir.path, "x");
      fs.mkdirSync(out);
      execFileSync("cpio", ["-i", "-d", "--quiet", "--no-absolute-filenames", "-F", archive], {
        cwd: out,
        stdio: "ignore",
      });
      expect(fs.readFileSync(path.join(out, "odd"), "utf8")).toBe("12345");
      expect(fs.readFileSync(path.join(out, "bin/tool"), "utf8")).toBe("#!/bin/sh\necho hi\n");
    } finally {
      dir.remove();
    }
  });

  it("refuses paths that are not plain relative names", () => {
    expect(() => writeCpio([{ type: "dir", path: "../x" }])).toThrow(/normal relative path/);
    expect(() => writeCpio([{ type: "dir", path: "" }])).toThrow(/normal relative path/);
  });

  it("rejects a damaged archive instead of misreading it", () => {
    expect(() =>
      parseCpio(Buffer.from("not a cpio archive at all, but long enough to have a header".repeat(3))),
    ).toThrow(/bad cpio magic/);
    expect(() => parseCpio(entries().subarray(0, 50))).toThrow(/truncated/);
  });
});
