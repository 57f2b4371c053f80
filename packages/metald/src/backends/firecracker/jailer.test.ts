import fs from "node:fs";
import path from "node:path";
import { InvalidArgumentError } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, describe, expect, it } from "vitest";
import {
  chrootDir,
  JAILED,
  type JailerOptions,
  jailerArgs,
  jailerId,
  linkIntoChroot,
  ownedFileInChroot,
} from "./jailer.js";

const dirs: Array<{ remove(): void }> = [];
afterEach(() => {
  for (const d of dirs.splice(0)) d.remove();
});

const base: JailerOptions = {
  id: "vm-0f3a9c2b71d4e5a6",
  execFile: "/usr/local/bin/firecracker",
  uid: 931047,
  gid: 931047,
  chrootBaseDir: "/var/lib/kiln/vms/vm_01/firecracker/jail",
  netns: "/var/run/netns/kiln-0f3a9c2b71d4",
  parentCgroup: "kiln/acme/vm_01",
  cgroups: [
    { file: "cpu.cfs_period_us", value: "100000" },
    { file: "cpu.cfs_quota_us", value: "200000" },
    { file: "cpuacct.usage", value: "0" },
    { file: "memory.limit_in_bytes", value: "603979776" },
    { file: "pids.max", value: "max" },
  ],
  firecrackerArgs: ["--api-sock", "/api.sock"],
};

describe("jailerArgs", () => {
  it("builds the jailer command line (golden)", () => {
    expect(jailerArgs(base)).toEqual([
      "--id",
      "vm-0f3a9c2b71d4e5a6",
      "--exec-file",
      "/usr/local/bin/firecracker",
      "--uid",
      "931047",
      "--gid",
      "931047",
      "--chroot-base-dir",
      "/var/lib/kiln/vms/vm_01/firecracker/jail",
      "--netns",
      "/var/run/netns/kiln-0f3a9c2b71d4",
      "--cgroup-version",
      "1",
      "--parent-cgroup",
      "kiln/acme/vm_01",
      "--cgroup",
      "cpu.cfs_period_us=100000",
      "--cgroup",
      "cpu.cfs_quota_us=200000",
      "--cgroup",
      "cpuacct.usage=0",
      "--cgroup",
      "memory.limit_in_bytes=603979776",
      "--cgroup",
      "pids.max=max",
      "--daemonize",
      "--",
      "--api-sock",
      "/api.sock",
    ]);
  });

  it("leaves out the network namespace and cgroups when there are none", () => {
    const { netns: _n, parentCgroup: _p, ...rest } = base;
    expect(jailerArgs({ ...rest, cgroups: [] })).toEqual([
      "--id",
      "vm-0f3a9c2b71d4e5a6",
      "--exec-file",
      "/usr/local/bin/firecracker",
      "--uid",
      "931047",
      "--gid",
      "931047",
      "--chroot-base-dir",
      "/var/lib/kiln/vms/vm_01/firecracker/jail",
      "--daemonize",
      "--",
      "--api-sock",
      "/api.sock",
    ]);
  });

  it.each([
    [{ id: "vm_01" }, "vmId"],
    [{ id: "x".repeat(65) }, "vmId"],
    [{ execFile: "/usr/bin/qemu" }, "firecrackerBinary"],
    [{ uid: 0 }, "uid"],
    [{ gid: -1 }, "gid"],
    [{ cgroups: [{ file: "cpu.shares", value: "1 2" }] }, "cgroups"],
    [{ cgroups: [{ file: "../../etc/passwd", value: "x" }] }, "cgroups"],
  ] as Array<[Partial<JailerOptions>, string]>)("refuses %j naming %s", (over, field) => {
    let err: unknown;
    try {
      jailerArgs({ ...base, ...over });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(InvalidArgumentError);
    expect((err as InvalidArgumentError).field).toBe(field);
  });
});

describe("jailerId", () => {
  it("keeps valid ids and maps Kiln ids to distinct valid ones", () => {
    expect(jailerId("vm-1")).toBe("vm-1");
    const a = jailerId("vm_01jd3x");
    const b = jailerId("vm-01jd3x");
    expect(a).toMatch(/^vm-01jd3x-[0-9a-f]{8}$/);
    expect(b).toBe("vm-01jd3x");
    expect(a).not.toBe(b);
    expect(jailerId(`vm_${"a".repeat(70)}`)).toMatch(/^[A-Za-z0-9-]{1,64}$/);
  });
});

describe("chroot layout", () => {
  it("is <base>/<exec file name>/<id>/root", () => {
    expect(chrootDir("/jail", "/usr/local/bin/firecracker-v1.17", "vm-1")).toBe(
      "/jail/firecracker-v1.17/vm-1/root",
    );
  });

  it("hard-links assets in unchanged and hands the VM's own files to the jail user", () => {
    const d = tempDir("kiln-jail-");
    dirs.push(d);
    const kernel = path.join(d.path, "vmlinux");
    const disk = path.join(d.path, "rootfs.ext4");
    fs.writeFileSync(kernel, "kernel", { mode: 0o644 });
    fs.writeFileSync(disk, "disk", { mode: 0o600 });
    const chroot = path.join(d.path, "jail/firecracker/vm-1/root");
    return (async () => {
      const k = await linkIntoChroot(chroot, kernel, JAILED.kernel);
      const r = await linkIntoChroot(chroot, disk, JAILED.rootfs, { uid: 931047, gid: 931048, mode: 0o600 });
      const log = await ownedFileInChroot(chroot, JAILED.log, { uid: 931047, gid: 931048 });
      expect(fs.statSync(k).ino).toBe(fs.statSync(kernel).ino);
      expect(fs.statSync(kernel).uid).toBe(0);
      expect(fs.statSync(r).ino).toBe(fs.statSync(disk).ino);
      expect([fs.statSync(r).uid, fs.statSync(r).gid]).toEqual([931047, 931048]);
      expect([fs.statSync(log).uid, fs.statSync(log).size]).toEqual([931047, 0]);
      expect(k).toBe(path.join(chroot, "vmlinux"));
    })();
  });

  it("copies an asset the jail user could not read instead of linking it", async () => {
    const d = tempDir("kiln-jail-");
    dirs.push(d);
    const secret = path.join(d.path, "initrd.img");
    fs.writeFileSync(secret, "initrd", { mode: 0o600 });
    const chroot = path.join(d.path, "root");
    const t = await linkIntoChroot(chroot, secret, JAILED.initrd);
    expect(fs.statSync(t).ino).not.toBe(fs.statSync(secret).ino);
    expect(fs.statSync(t).mode & 0o777).toBe(0o444);
    expect(fs.statSync(secret).mode & 0o777).toBe(0o600);
  });
});
