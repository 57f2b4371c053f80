import fs from "node:fs";
import path from "node:path";
import { createLogger } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, describe, expect, it } from "vitest";
import {
  DEFAULT_TMPFS,
  isTmpfs,
  prepareTreeRoot,
  removeTreeRoot,
  roomFor,
  treeRootPath,
} from "./tree-root.js";

const log = createLogger({ service: "builderd", level: "silent" });
const haveTmpfs = await isTmpfs(DEFAULT_TMPFS);
const asRoot = process.getuid?.() === 0;

describe("prepareTreeRoot", () => {
  const cleanup: Array<() => void> = [];
  afterEach(() => {
    for (const c of cleanup.splice(0)) c();
  });
  const fresh = () => {
    const d = tempDir("kiln-tree-root-");
    cleanup.push(() => d.remove());
    return d.path;
  };
  /** A data dir whose tree root on the tmpfs is removed after the test. */
  const dataDir = () => {
    const d = fresh();
    cleanup.push(() => fs.rmSync(treeRootPath(DEFAULT_TMPFS, d), { recursive: true, force: true }));
    return d;
  };

  it("puts trees in the build dirs when told so", async () => {
    expect(await prepareTreeRoot({ setting: "build", dataDir: fresh(), log })).toBeUndefined();
  });

  it.skipIf(!haveTmpfs)("auto: a private directory on the tmpfs, one per data dir", async () => {
    const a = dataDir();
    const b = dataDir();
    const rootA = await prepareTreeRoot({ setting: "auto", dataDir: a, log });
    const rootB = await prepareTreeRoot({ setting: "auto", dataDir: b, log });
    expect(rootA).toBe(treeRootPath(DEFAULT_TMPFS, a));
    expect(path.dirname(rootA!)).toBe(DEFAULT_TMPFS);
    expect(rootB).not.toBe(rootA);
    expect(fs.lstatSync(rootA!).mode & 0o777).toBe(0o700);
    expect(await isTmpfs(rootA!)).toBe(true);
  });

  it.skipIf(!haveTmpfs)(
    "deletes what an earlier process left, and makes the directory private again",
    async () => {
      const d = dataDir();
      const root = treeRootPath(DEFAULT_TMPFS, d);
      fs.mkdirSync(path.join(root, "bld_old", "etc"), { recursive: true });
      fs.writeFileSync(path.join(root, "bld_old", "etc", "passwd"), "root:x:0:0::/:/bin/sh\n");
      fs.mkdirSync(path.join(root, ".trash", "bld_older-0123456789ab"), { recursive: true });
      fs.chmodSync(root, 0o755);
      expect(await prepareTreeRoot({ setting: "auto", dataDir: d, log })).toBe(root);
      expect(fs.readdirSync(root)).toEqual([]);
      expect(fs.statSync(root).mode & 0o777).toBe(0o700);
      // A graceful stop removes it, with anything a deletion left behind.
      fs.mkdirSync(path.join(root, ".trash", "bld_done-0123456789ab"), { recursive: true });
      await removeTreeRoot(root);
      expect(fs.existsSync(root)).toBe(false);
    },
  );

  it.skipIf(!haveTmpfs)("auto: a tmpfs without MIN_FREE_BYTES free is not taken", async () => {
    const d = dataDir();
    const huge = 2 ** 60;
    expect(await prepareTreeRoot({ setting: "auto", dataDir: d, log, minFreeBytes: huge })).toBeUndefined();
    expect(fs.existsSync(treeRootPath(DEFAULT_TMPFS, d))).toBe(false);
  });

  it("tells whether a directory has room for another tree", async () => {
    const d = fresh();
    expect(await roomFor(d, 1)).toBe(true);
    expect(await roomFor(d, 2 ** 60)).toBe(false);
    expect(await roomFor(path.join(d, "gone"), 1)).toBe(false);
  });

  it("auto: no tmpfs there, so trees stay in the build dirs", async () => {
    const notTmpfs = fresh();
    if (await isTmpfs(notTmpfs)) return; // the temp dir itself is a tmpfs on this machine
    expect(
      await prepareTreeRoot({ setting: "auto", dataDir: fresh(), log, tmpfs: notTmpfs }),
    ).toBeUndefined();
    expect(fs.readdirSync(notTmpfs)).toEqual([]);
    expect(
      await prepareTreeRoot({ setting: "auto", dataDir: fresh(), log, tmpfs: "/no/such/dir" }),
    ).toBeUndefined();
  });

  it("uses an explicit directory, tmpfs or not", async () => {
    const base = fresh();
    const d = fresh();
    expect(await prepareTreeRoot({ setting: base, dataDir: d, log })).toBe(treeRootPath(base, d));
  });

  it("refuses a relative directory", async () => {
    await expect(prepareTreeRoot({ setting: "trees", dataDir: fresh(), log })).rejects.toThrow(
      /UNKEY_BUILDERD_TREE_DIR must be "auto", "build" or an absolute directory, not trees/,
    );
  });

  it("will not follow a symlink planted at its name (another user could point it anywhere)", async () => {
    const base = fresh();
    const d = fresh();
    const victim = fresh();
    fs.writeFileSync(path.join(victim, "keep"), "precious");
    fs.symlinkSync(victim, treeRootPath(base, d));
    await expect(prepareTreeRoot({ setting: base, dataDir: d, log })).rejects.toThrow(/is not a directory/);
    expect(fs.readFileSync(path.join(victim, "keep"), "utf8")).toBe("precious");
  });

  it.skipIf(!haveTmpfs)(
    "auto: falls back to the build dirs when its name on the tmpfs is taken",
    async () => {
      const d = dataDir();
      const victim = fresh();
      fs.writeFileSync(path.join(victim, "keep"), "precious");
      fs.symlinkSync(victim, treeRootPath(DEFAULT_TMPFS, d));
      expect(await prepareTreeRoot({ setting: "auto", dataDir: d, log })).toBeUndefined();
      expect(fs.readdirSync(victim)).toEqual(["keep"]);
    },
  );

  it.skipIf(!asRoot)("will not use a directory another user owns", async () => {
    const base = fresh();
    const d = fresh();
    const root = treeRootPath(base, d);
    fs.mkdirSync(path.join(root, "theirs"), { recursive: true });
    fs.chownSync(root, 12345, 12345);
    await expect(prepareTreeRoot({ setting: base, dataDir: d, log })).rejects.toThrow(
      /belongs to uid 12345, not to this process \(uid 0\)/,
    );
    expect(fs.readdirSync(root)).toEqual(["theirs"]);
  });
});
