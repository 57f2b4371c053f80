import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { createLogger } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, describe, expect, it } from "vitest";
import { createTrash } from "./trash.js";
import { DEFAULT_TMPFS, isTmpfs } from "./tree-root.js";

const log = createLogger({ service: "builderd", level: "silent" });
// /dev/shm and the temp dir are two filesystems where /dev/shm is a tmpfs and the temp dir is not.
const haveTmpfs = (await isTmpfs(DEFAULT_TMPFS)) && !(await isTmpfs(os.tmpdir()));

/** A directory tree of `files` files in nested directories. */
function tree(root: string, files: number): void {
  for (let i = 0; i < files; i++) {
    const dir = path.join(root, `d${i % 7}`, `e${i % 3}`);
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, `f${i}`), "x".repeat(i));
  }
}

describe("trash", () => {
  const dirs: Array<{ remove(): void }> = [];
  const fresh = () => {
    const d = tempDir("kiln-trash-");
    dirs.push(d);
    return { dir: d.path, trashDir: path.join(d.path, ".trash") };
  };
  afterEach(() => {
    for (const d of dirs.splice(0)) d.remove();
  });

  it("frees the directory's path at once, and deletes its content only when purged", async () => {
    const { dir, trashDir } = fresh();
    const target = path.join(dir, "build", "rootfs");
    tree(target, 200);
    const trash = createTrash([trashDir], log);
    await trash.discard(target);
    expect(fs.existsSync(target)).toBe(false);
    // A new tree can take the path while the old one waits to be deleted.
    fs.mkdirSync(target);
    await trash.drain();
    expect(fs.readdirSync(trashDir)).toHaveLength(1);
    trash.purge();
    await trash.drain();
    expect(fs.readdirSync(trashDir)).toEqual([]);
    expect(fs.existsSync(target)).toBe(true);
  });

  it("purges only what was discarded before the purge", async () => {
    const { dir, trashDir } = fresh();
    const trash = createTrash([trashDir], log);
    tree(path.join(dir, "a"), 5);
    await trash.discard(path.join(dir, "a"));
    trash.purge();
    tree(path.join(dir, "b"), 5);
    await trash.discard(path.join(dir, "b"));
    await trash.drain();
    expect(fs.readdirSync(trashDir).map((n) => n.split("-")[0])).toEqual(["b"]);
  });

  it("accepts a directory that does not exist", async () => {
    const { dir, trashDir } = fresh();
    const trash = createTrash([trashDir], log);
    await trash.discard(path.join(dir, "missing"));
    await trash.drain();
    expect(fs.readdirSync(trashDir)).toEqual([]);
  });

  it("keeps two discarded directories of the same name apart", async () => {
    const { dir, trashDir } = fresh();
    const trash = createTrash([trashDir], log);
    for (const b of ["a", "b"]) {
      tree(path.join(dir, b, "rootfs"), 5);
      await trash.discard(path.join(dir, b, "rootfs"));
    }
    expect(fs.readdirSync(trashDir)).toHaveLength(2);
    trash.purge();
    await trash.drain();
    expect(fs.readdirSync(trashDir)).toEqual([]);
    expect(fs.readdirSync(path.join(dir, "a"))).toEqual([]);
  });

  it("deletes at start-up what a crashed process left in the trash", async () => {
    const { trashDir } = fresh();
    tree(path.join(trashDir, "rootfs-0123456789ab"), 20);
    tree(path.join(trashDir, "temp-ba9876543210"), 3);
    await createTrash([trashDir], log).sweep();
    expect(fs.readdirSync(trashDir)).toEqual([]);
  });

  it.skipIf(!haveTmpfs)(
    "keeps a trash per filesystem: a tree goes to the one it can be renamed into",
    async () => {
      const { dir, trashDir } = fresh();
      const shm = fs.mkdtempSync(path.join(DEFAULT_TMPFS, "kiln-trash-"));
      dirs.push({ remove: () => fs.rmSync(shm, { recursive: true, force: true }) });
      const shmTrash = path.join(shm, ".trash");
      const trash = createTrash([trashDir, shmTrash], log);
      tree(path.join(shm, "tree"), 20);
      tree(path.join(dir, "temp"), 3);
      await trash.discard(path.join(shm, "tree"));
      await trash.discard(path.join(dir, "temp"));
      expect(fs.existsSync(path.join(shm, "tree"))).toBe(false);
      expect(fs.readdirSync(shmTrash).map((n) => n.split("-")[0])).toEqual(["tree"]);
      expect(fs.readdirSync(trashDir).map((n) => n.split("-")[0])).toEqual(["temp"]);
      trash.purge();
      await trash.drain();
      expect([...fs.readdirSync(shmTrash), ...fs.readdirSync(trashDir)]).toEqual([]);
    },
  );

  it("sweeps nothing when there is no trash yet", async () => {
    const { trashDir } = fresh();
    await createTrash([trashDir], log).sweep();
    expect(fs.existsSync(trashDir)).toBe(false);
  });
});
