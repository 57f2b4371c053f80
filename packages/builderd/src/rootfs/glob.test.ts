import { describe, expect, it } from "vitest";
import { compileGlob, GlobSyntaxError } from "./glob.js";

describe("compileGlob", () => {
  it.each([
    ["usr/share/doc/*", "usr/share/doc/bash", true],
    ["usr/share/doc/*", "usr/share/doc/bash/README", false],
    ["usr/share/doc/*", "usr/share/doc", false],
    ["usr/share/locale/**", "usr/share/locale/de/LC_MESSAGES/x.mo", true],
    ["usr/share/locale/**", "usr/share/locale", false],
    ["**/__pycache__", "__pycache__", true],
    ["**/__pycache__", "usr/lib/python3/x/__pycache__", true],
    ["**/__pycache__", "usr/lib/__pycache__x", false],
    ["**/*.pyc", "a/b/.hidden/c.pyc", true],
    ["*.log", "var/x.log", false],
    ["var/log/*.log", "var/log/.x.log", true],
    ["file?.txt", "file1.txt", true],
    ["file?.txt", "file/.txt", false],
    ["lib/[a-c]*.so", "lib/b.so", true],
    ["lib/[!a-c]*.so", "lib/b.so", false],
    ["lib/[!a-c]*.so", "lib/d.so", true],
    ["{root,home/*}/.cache", "home/alice/.cache", true],
    ["{root,home/*}/.cache", "root/.cache", true],
    ["{root,home/*}/.cache", "srv/.cache", false],
    ["a.b", "axb", false],
    ["a+(b)", "a+(b)", true],
    ["**", "anything/at/all", true],
  ])("%s against %s → %s", (pattern, p, expected) => {
    expect(compileGlob(pattern).test(p)).toBe(expected);
  });

  it.each(["a/**b", "a**/b", "lib/[abc", "x/{a,b", "[]"])("refuses malformed %s", (pattern) => {
    expect(() => compileGlob(pattern)).toThrow(GlobSyntaxError);
  });
});
