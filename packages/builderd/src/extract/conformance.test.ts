/**
 * Conformance with umoci: for each benign fixture image, applying its layers with
 * decompressLayer + applyLayer must give the same tree as `umoci raw unpack` of the same OCI
 * layout — types, modes (with setuid/setgid/sticky), owners, symlink targets, content hashes,
 * hardlink groups and non-directory mtimes. The one documented difference: device nodes and
 * fifos, which umoci (as root) creates and Kiln skips and reports.
 */
import fs from "node:fs";
import path from "node:path";
import { tempDir } from "@kiln/kit/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type ImageSpec, writeOciLayout } from "../testing/oci-layout.js";
import { applyImage, umociUnpack } from "./fixtures/apply-image.js";
import { busyboxImage, conformanceImages, devicesImage } from "./fixtures/conformance-images.js";
import { expectSameTree, snapshotTree, withoutPaths } from "./fixtures/tree-snapshot.js";

let tmp: { path: string; remove(): void };
beforeAll(() => {
  tmp = tempDir("kiln-extract-conformance-");
});
afterAll(() => tmp.remove());

async function both(name: string, image: ImageSpec) {
  const layout = path.join(tmp.path, name, "layout");
  await writeOciLayout(layout, [{ tag: "t", image }]);
  const theirsDir = path.join(tmp.path, name, "umoci");
  await umociUnpack(layout, "t", theirsDir);
  const oursDir = path.join(tmp.path, name, "kiln");
  const results = await applyImage(layout, "t", oursDir);
  return { theirs: snapshotTree(theirsDir), ours: snapshotTree(oursDir), results, oursDir, theirsDir };
}

describe("applyLayer matches umoci raw unpack", () => {
  for (const [name, image] of Object.entries(conformanceImages)) {
    it(`${name}`, async () => {
      const { ours, theirs, results } = await both(name, image);
      expectSameTree(ours, theirs);
      expect(results.flatMap((r) => r.skipped)).toEqual([]);
    });

    // umoci 0.4.7 cannot read zstd layers: its side is the same layers gzip-compressed.
    it(`${name}, as zstd layers`, async () => {
      const { theirs } = await both(`${name}-gzip`, image);
      const layout = path.join(tmp.path, `${name}-zstd`, "layout");
      await writeOciLayout(layout, [{ tag: "t", image: { ...image, compression: "zstd" } }]);
      const oursDir = path.join(tmp.path, `${name}-zstd`, "kiln");
      await applyImage(layout, "t", oursDir);
      expectSameTree(snapshotTree(oursDir), theirs);
    });
  }

  it("whiteouts: removes lower entries, spares the layer's own, in either order", async () => {
    const { ours } = await both("whiteouts-detail", conformanceImages["whiteouts"]!);
    const paths = Object.keys(ours.nodes);
    expect(paths).toEqual(
      expect.arrayContaining(["etc/a", "etc/b", "opt/new", "opt/old/g", "var/lib/three", "data/d1", "srv"]),
    );
    for (const gone of [
      "etc/sub",
      "opt/keep-lower",
      "opt/old/f",
      "var/lib/one",
      "var/lib/two",
      "srv/link",
      "home",
    ]) {
      expect(paths).not.toContain(gone);
    }
  });

  it("hardlinks: groups within and across layers; a replaced name leaves its old inode to the others", async () => {
    const { ours } = await both("hardlinks-detail", conformanceImages["hardlinks"]!);
    expect(ours.hardlinkGroups).toEqual([
      ["bin/tool2", "bin/tool3", "usr/bin/tool-link"],
      ["lnk", "lnk-hard"],
      ["shared", "shared-again"],
    ]);
    expect(ours.nodes["lnk-hard"]?.type).toBe("symlink");
  });

  it("symlinks: writes through in-rootfs symlinked directories land in their targets", async () => {
    const { ours } = await both("symlinks-detail", conformanceImages["symlinks"]!);
    expect(ours.nodes["b/through-same-layer"]?.type).toBe("file");
    expect(ours.nodes["b/through-next-layer"]?.type).toBe("file");
    expect(ours.nodes["usr/lib/libfoo.so.1"]?.type).toBe("file");
    expect(ours.nodes["usr/lib/libfoo.so"]).toBeUndefined();
    expect(ours.nodes["run/app.pid"]?.type).toBe("file");
    expect(ours.nodes["lib"]).toMatchObject({ type: "symlink", target: "usr/lib" });
    expect(ours.nodes["a/dangling"]).toMatchObject({ type: "symlink", target: "/nowhere/at/all" });
  });

  it("modes: setuid, setgid and sticky bits survive chown", async () => {
    const { ours } = await both("modes-detail", conformanceImages["modes"]!);
    expect(ours.nodes["usr/bin/sudo"]?.mode).toBe("4711");
    expect(ours.nodes["usr/bin/mine"]).toMatchObject({ mode: "4750", uid: 1000, gid: 1000 });
    expect(ours.nodes["tmp"]?.mode).toBe("1777");
    expect(ours.nodes["home/alice"]).toMatchObject({ mode: "0750", uid: 1000, gid: 100 });
  });

  it("device nodes and fifos: umoci creates them, Kiln skips and reports them (documented difference)", async () => {
    const { ours, theirs, results } = await both("devices", devicesImage);
    const special = ["dev/initctl", "dev/loop9", "dev/null", "newdir/tty"];
    expect(special.map((p) => theirs.nodes[p]?.type)).toEqual([
      "fifo",
      "block-device",
      "char-device",
      "char-device",
    ]);
    for (const p of special) expect(ours.nodes[p]).toBeUndefined();
    expect(
      results
        .flatMap((r) => r.skipped)
        .map((s) => s.path)
        .sort(),
    ).toEqual(special);
    expectSameTree(ours, withoutPaths(theirs, special));
  });

  it.skipIf(!fs.existsSync("/bin/busybox"))("a realistic busybox-static image", async () => {
    const { ours, theirs, oursDir } = await both("busybox", busyboxImage());
    expectSameTree(ours, theirs);
    expect(fs.readFileSync(path.join(oursDir, "bin/busybox")).equals(fs.readFileSync("/bin/busybox"))).toBe(
      true,
    );
    expect(fs.readlinkSync(path.join(oursDir, "bin/sh"))).toBe("/bin/busybox");
    expect(Object.keys(ours.nodes).length).toBeGreaterThan(200);
  });
});
