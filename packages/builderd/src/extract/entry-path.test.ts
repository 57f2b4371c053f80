import { describe, expect, it } from "vitest";
import { entryComponents } from "./entry-path.js";
import { UnsafeLayerEntryError } from "./errors.js";

describe("entryComponents", () => {
  it("drops a leading ./, empty and . components", () => {
    expect(entryComponents("./usr/bin/env")).toEqual(["usr", "bin", "env"]);
    expect(entryComponents("././a//b/./c/")).toEqual(["a", "b", "c"]);
    expect(entryComponents("etc/")).toEqual(["etc"]);
  });

  it("gives no components for the root itself", () => {
    expect(entryComponents("./")).toEqual([]);
    expect(entryComponents(".")).toEqual([]);
    expect(entryComponents("")).toEqual([]);
  });

  it("keeps names that merely contain dots", () => {
    expect(entryComponents("a/..b/.c/...")).toEqual(["a", "..b", ".c", "..."]);
  });

  it.each([
    ["../escape", '".." component'],
    ["a/../../escape", '".." component'],
    ["a/b/..", '".." component'],
    ["./../x", '".." component'],
    ["/abs/path", "is absolute"],
    ["//x", "is absolute"],
    ["a\0b", "NUL byte"],
  ])("refuses %j", (name, reason) => {
    const err = (() => {
      try {
        entryComponents(name);
      } catch (e) {
        return e;
      }
    })();
    expect(err).toBeInstanceOf(UnsafeLayerEntryError);
    expect((err as UnsafeLayerEntryError).entry).toBe(name);
    expect((err as UnsafeLayerEntryError).message).toContain(reason);
  });

  it("names the entry when checking a hardlink target", () => {
    expect(() => entryComponents("/etc/passwd", "h", "hardlink target")).toThrow(
      /refusing layer entry "h": the hardlink target "\/etc\/passwd" is absolute/,
    );
  });
});
