import fs from "node:fs";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { InvalidArgumentError } from "./errors.js";
import { resolveImageUser, resolveInRoot } from "./image-user.js";
import { tempDir } from "./testing/index.js";

/** uid and gid only (supplementary groups are covered in image-user.test.ts). */
const resolveUser = async (root: string, user: string) => {
  const { uid, gid } = await resolveImageUser(root, user, "config.user");
  return { uid, gid };
};

const dirs: Array<{ remove(): void }> = [];
afterEach(() => {
  for (const d of dirs.splice(0)) d.remove();
});

function rootfs(files: Record<string, string> = {}): string {
  const d = tempDir("kiln-user-");
  dirs.push(d);
  fs.mkdirSync(path.join(d.path, "etc"));
  for (const [p, content] of Object.entries(files)) fs.writeFileSync(path.join(d.path, p), content);
  return d.path;
}

const PASSWD =
  "root:x:0:0:root:/root:/bin/sh\n# comment\nwww:x:1000:1001::/www:/bin/false\nbad:x:notanumber:1::/:/bin/sh\n";
const GROUP = "root:x:0:\nweb:x:1001:www\nstaff:x:50:\n";

describe("resolveImageUser: Docker's USER rules", () => {
  it.each([
    ["", { uid: 0, gid: 0 }],
    ["root", { uid: 0, gid: 0 }],
    ["www", { uid: 1000, gid: 1001 }],
    ["1000", { uid: 1000, gid: 1001 }],
    ["4242", { uid: 4242, gid: 0 }],
    ["www:staff", { uid: 1000, gid: 50 }],
    ["www:77", { uid: 1000, gid: 77 }],
    ["4242:staff", { uid: 4242, gid: 50 }],
    ["4242:4243", { uid: 4242, gid: 4243 }],
  ])("resolves %j with Docker's rules", async (user, ids) => {
    expect(await resolveUser(rootfs({ "etc/passwd": PASSWD, "etc/group": GROUP }), user)).toEqual(ids);
  });

  it("accepts root and numeric ids in an image without /etc/passwd", async () => {
    const r = rootfs();
    expect(await resolveUser(r, "root")).toEqual({ uid: 0, gid: 0 });
    expect(await resolveUser(r, "65534:65534")).toEqual({ uid: 65534, gid: 65534 });
  });

  it.each([
    ["nobody", /"nobody" is not in the image's \/etc\/passwd/],
    ["www:nogroup", /group "nogroup".*not in the image's \/etc\/group/],
    ["bad", /"bad" is not in the image's \/etc\/passwd/],
    [":50", /USER\[:GROUP\]/],
    ["www:", /USER\[:GROUP\]/],
  ])("refuses %j with an error naming it", async (user, message) => {
    const err = await resolveUser(rootfs({ "etc/passwd": PASSWD, "etc/group": GROUP }), user).catch((e) => e);
    expect(err).toBeInstanceOf(InvalidArgumentError);
    expect(err.message).toMatch(message);
  });

  it("reads /etc/passwd through the image's own symlinks, never the host's", async () => {
    const r = rootfs({ "etc/passwd.real": "app:x:777:778::/:/bin/sh\n" });
    // An absolute link means the image's /etc/passwd.real, not the host's file of that name.
    fs.symlinkSync("/etc/passwd.real", path.join(r, "etc/passwd"));
    expect(await resolveUser(r, "app")).toEqual({ uid: 777, gid: 778 });
    // A link that climbs out stops at the image's root: /../../etc/passwd is the image's /etc/passwd.
    fs.rmSync(path.join(r, "etc/passwd"));
    fs.writeFileSync(path.join(r, "etc/passwd"), "svc:x:5:6::/:/bin/sh\n");
    fs.mkdirSync(path.join(r, "x"));
    fs.symlinkSync("../../../../../../etc/passwd", path.join(r, "x/p"));
    expect(await resolveInRoot(r, "x/p")).toBe(path.join(r, "etc/passwd"));
  });
});

describe("resolveInRoot", () => {
  it("keeps symlinks and .. inside the root and gives up on loops", async () => {
    const r = rootfs();
    fs.symlinkSync("/", path.join(r, "up"));
    fs.symlinkSync("..", path.join(r, "etc/parent"));
    fs.symlinkSync("loop", path.join(r, "loop"));
    expect(await resolveInRoot(r, "up/etc")).toBe(path.join(r, "etc"));
    expect(await resolveInRoot(r, "etc/parent/../../..")).toBe(r);
    expect(await resolveInRoot(r, "/missing/file")).toBe(path.join(r, "missing/file"));
    await expect(resolveInRoot(r, "loop")).rejects.toThrow(/too many symbolic links/);
  });
});
