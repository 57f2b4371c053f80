import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { InvalidArgumentError } from "./errors.js";
import { resolveImageUser } from "./image-user.js";
import { tempDir } from "./testing/index.js";

let root: { path: string; remove(): void };
beforeAll(() => {
  root = tempDir("kiln-user-");
  fs.mkdirSync(path.join(root.path, "usr/etc"), { recursive: true });
  // The image's /etc is a symlink with an absolute target: it must resolve inside the image.
  fs.symlinkSync("/usr/etc", path.join(root.path, "etc"));
  fs.writeFileSync(
    path.join(root.path, "usr/etc/passwd"),
    "root:x:0:0:root:/root:/bin/sh\n# comment\nwww:x:1000:1001:www:/www:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
  );
  fs.writeFileSync(
    path.join(root.path, "usr/etc/group"),
    "root:x:0:\nwww:x:1001:\nwheel:x:10:www,ops\ndocker:x:999:www\nops:x:2000:\n",
  );
});
afterAll(() => root.remove());

describe("resolveImageUser", () => {
  it.each([
    ["", { uid: 0, gid: 0, additionalGids: [] }],
    ["root", { uid: 0, gid: 0, additionalGids: [] }],
    ["www", { uid: 1000, gid: 1001, additionalGids: [10, 999] }],
    ["1000", { uid: 1000, gid: 1001, additionalGids: [10, 999] }],
    ["www:ops", { uid: 1000, gid: 2000, additionalGids: [10, 999] }],
    ["www:5", { uid: 1000, gid: 5, additionalGids: [10, 999] }],
    ["4242", { uid: 4242, gid: 0, additionalGids: [] }],
    ["4242:4242", { uid: 4242, gid: 4242, additionalGids: [] }],
  ])("resolves %j through the image's passwd and group files", async (user, want) => {
    expect(await resolveImageUser(root.path, user, "workload.user")).toEqual(want);
  });

  it.each(["ghost", "www:ghosts", "www:", ":1"])("refuses %j naming the field", async (user) => {
    const err = await resolveImageUser(root.path, user, "workload.user").catch((e: unknown) => e);
    expect(err).toBeInstanceOf(InvalidArgumentError);
    expect((err as InvalidArgumentError).field).toBe("workload.user");
  });

  it("never reads the host's files through a symlink", async () => {
    const other = tempDir("kiln-user-");
    try {
      fs.mkdirSync(path.join(other.path, "etc"));
      // On the host this would be /etc/group, whose "daemon:x:1:" line reads as a passwd entry;
      // inside the image it is the image's own (missing) /etc/group, so "daemon" is unknown.
      fs.symlinkSync("../../../../../../etc/group", path.join(other.path, "etc/passwd"));
      await expect(resolveImageUser(other.path, "daemon")).rejects.toBeInstanceOf(InvalidArgumentError);
      fs.symlinkSync("passwd", path.join(other.path, "etc/group"));
      fs.rmSync(path.join(other.path, "etc/passwd"));
      fs.symlinkSync("group", path.join(other.path, "etc/passwd"));
      await expect(resolveImageUser(other.path, "daemon")).rejects.toThrow(/too many symbolic links/);
    } finally {
      other.remove();
    }
  });
});
