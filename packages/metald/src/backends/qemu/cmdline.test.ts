import fs from "node:fs";
import path from "node:path";
import { InvalidArgumentError } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, describe, expect, it } from "vitest";
import { hostTscKhz, kvmUsable, type QemuSpec, qemuArgs } from "./cmdline.js";

const dirs: Array<{ remove(): void }> = [];
afterEach(() => {
  for (const d of dirs.splice(0)) d.remove();
});

const spec: QemuSpec = {
  kernel: "/var/lib/kiln/vms/vm_1/vmlinuz",
  initrd: "/var/lib/kiln/vms/vm_1/initrd.img",
  rootfs: "/var/lib/kiln/vms/vm_1/rootfs.ext4",
  memoryMiB: 256,
  vcpus: 1,
  kvm: false,
  tscKhz: 2445430,
  qmpSocket: "/var/lib/kiln/vms/vm_1/qmp.sock",
  serial: "stdio",
  hostfwd: [{ hostAddr: "127.0.0.1", hostPort: 40080, guestPort: 80, protocol: "tcp" }],
  hostname: "web-1",
};

describe("qemuArgs", () => {
  it("builds the microvm command line from HOST-FACTS (TCG)", () => {
    expect(qemuArgs(spec)).toEqual([
      "-M",
      "microvm,x-option-roms=off,isa-serial=on",
      "-accel",
      "tcg",
      "-cpu",
      "max",
      "-m",
      "256",
      "-smp",
      "1",
      "-nodefaults",
      "-no-user-config",
      "-display",
      "none",
      "-no-reboot",
      "-serial",
      "stdio",
      "-kernel",
      "/var/lib/kiln/vms/vm_1/vmlinuz",
      "-initrd",
      "/var/lib/kiln/vms/vm_1/initrd.img",
      "-append",
      "console=ttyS0 root=/dev/vda rw panic=-1 quiet tsc_early_khz=2445430 kiln.ip=10.0.2.15/24 kiln.gw=10.0.2.2 kiln.hostname=web-1",
      "-drive",
      "id=root,file=/var/lib/kiln/vms/vm_1/rootfs.ext4,format=raw,if=none",
      "-device",
      "virtio-blk-device,drive=root",
      "-netdev",
      "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:40080-:80",
      "-device",
      "virtio-net-device,netdev=n0",
      "-qmp",
      "unix:/var/lib/kiln/vms/vm_1/qmp.sock,server=on,wait=off",
    ]);
  });

  it("uses KVM with the host CPU when asked", () => {
    const args = qemuArgs({ ...spec, kvm: true, vcpus: 2, memoryMiB: 1024 });
    expect(args.slice(2, 10)).toEqual(["-accel", "kvm", "-cpu", "host", "-m", "1024", "-smp", "2"]);
  });

  it("leaves out what is not given, and appends extra kernel args last", () => {
    const { tscKhz: _t, hostname: _h, ...rest } = spec;
    const args = qemuArgs({
      ...rest,
      hostfwd: [],
      serial: { file: "/logs/vm,1.log" },
      kernelArgs: ["kiln.dns=10.0.2.3"],
    });
    const at = (flag: string) => args[args.indexOf(flag) + 1];
    expect(at("-append")).toBe(
      "console=ttyS0 root=/dev/vda rw panic=-1 quiet kiln.ip=10.0.2.15/24 kiln.gw=10.0.2.2 kiln.dns=10.0.2.3",
    );
    expect(at("-netdev")).toBe("user,id=n0,restrict=on");
    expect(at("-serial")).toBe("file:/logs/vm,1.log");
  });

  it("forwards several ports and escapes commas in option values", () => {
    const args = qemuArgs({
      ...spec,
      rootfs: "/data/a,b/rootfs.ext4",
      qmpSocket: "/run/a,b.sock",
      hostfwd: [
        { hostAddr: "127.0.0.1", hostPort: 8080, guestPort: 80, protocol: "tcp" },
        { hostAddr: "0.0.0.0", hostPort: 5353, guestPort: 53, protocol: "udp" },
      ],
    });
    const at = (flag: string) => args[args.indexOf(flag) + 1];
    expect(at("-netdev")).toBe(
      "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp:0.0.0.0:5353-:53",
    );
    expect(at("-drive")).toBe("id=root,file=/data/a,,b/rootfs.ext4,format=raw,if=none");
    expect(at("-qmp")).toBe("unix:/run/a,,b.sock,server=on,wait=off");
  });

  it("attaches a qcow2 overlay and a tap device, with the guest address on the kernel command line", () => {
    const args = qemuArgs({
      ...spec,
      rootfs: "/var/lib/kiln/vms/vm_1/qemu/overlay.qcow2",
      rootfsFormat: "qcow2",
      hostfwd: [],
      tap: {
        ifname: "tap0",
        mac: "02:6b:00:11:22:33",
        address: "10.213.0.5/24",
        gateway: "10.213.0.1",
        dns: "10.213.0.1,1.1.1.1",
      },
    });
    const at = (flag: string) => args[args.indexOf(flag) + 1];
    expect(at("-drive")).toBe("id=root,file=/var/lib/kiln/vms/vm_1/qemu/overlay.qcow2,format=qcow2,if=none");
    expect(at("-netdev")).toBe("tap,id=n0,ifname=tap0,script=no,downscript=no");
    expect(args[args.indexOf("-netdev") + 3]).toBe("virtio-net-device,netdev=n0,mac=02:6b:00:11:22:33");
    expect(at("-append")).toBe(
      "console=ttyS0 root=/dev/vda rw panic=-1 quiet tsc_early_khz=2445430 kiln.ip=10.213.0.5/24 kiln.gw=10.213.0.1 kiln.dns=10.213.0.1,1.1.1.1 kiln.hostname=web-1",
    );
  });

  it.each([
    [{ memoryMiB: 0 }, "memoryMiB"],
    [{ vcpus: 0 }, "vcpus"],
    [{ vcpus: 1.5 }, "vcpus"],
    [{ tscKhz: -1 }, "tscKhz"],
    [{ hostname: "bad name" }, "hostname"],
    [{ hostname: "-x" }, "hostname"],
    [{ kernelArgs: ["a b"] }, "kernelArgs[0]"],
    [{ kernelArgs: ['x="y"'] }, "kernelArgs[0]"],
    [{ initrd: "/a,b" }, "initrd"],
    [{ kernel: "" }, "kernel"],
    [{ qmpSocket: `/${"s".repeat(120)}` }, "qmpSocket"],
    [{ hostfwd: [], tap: { ifname: "a-very-long-tap-name", address: "10.0.0.2/24" } }, "tap.ifname"],
    [{ hostfwd: [], tap: { ifname: "tap0", address: "10.0.0.2" } }, "tap.address"],
    [{ hostfwd: [], tap: { ifname: "tap0", address: "10.0.0.2/24", mac: "02:00" } }, "tap.mac"],
    [{ tap: { ifname: "tap0", address: "10.0.0.2/24" } }, "hostfwd"],

    [
      { hostfwd: [{ hostAddr: "localhost", hostPort: 1, guestPort: 1, protocol: "tcp" as const }] },
      "hostfwd[0].hostAddr",
    ],
    [
      { hostfwd: [{ hostAddr: "127.0.0.1", hostPort: 70000, guestPort: 1, protocol: "tcp" as const }] },
      "hostfwd[0].hostPort",
    ],
  ] as Array<[Partial<QemuSpec>, string]>)("refuses %j naming %s", (over, field) => {
    const err = (() => {
      try {
        qemuArgs({ ...spec, ...over });
      } catch (e) {
        return e;
      }
    })();
    expect(err).toBeInstanceOf(InvalidArgumentError);
    expect((err as InvalidArgumentError).field).toBe(field);
  });
});

describe("host probes", () => {
  function file(content: string): string {
    const d = tempDir("kiln-cpuinfo-");
    dirs.push(d);
    const p = path.join(d.path, "cpuinfo");
    fs.writeFileSync(p, content);
    return p;
  }

  it("reads the TSC frequency from cpu MHz", async () => {
    expect(await hostTscKhz(file("processor\t: 0\ncpu MHz\t\t: 2445.430\nflags\t\t: fpu\n"))).toBe(2445430);
    expect(await hostTscKhz(file("processor\t: 0\n"))).toBeUndefined();
    expect(await hostTscKhz("/nonexistent/cpuinfo")).toBeUndefined();
    expect(await hostTscKhz()).toEqual(expect.any(Number));
  });

  it("calls KVM usable only with an openable device and VMX/SVM", async () => {
    const dev = file("");
    expect(await kvmUsable({ device: dev, cpuinfoPath: file("flags\t\t: fpu vmx sse\n") })).toBe(true);
    expect(await kvmUsable({ device: dev, cpuinfoPath: file("flags\t\t: fpu svm\n") })).toBe(true);
    expect(await kvmUsable({ device: dev, cpuinfoPath: file("flags\t\t: fpu sse hypervisor\n") })).toBe(
      false,
    );
    expect(await kvmUsable({ device: "/nonexistent/kvm", cpuinfoPath: file("flags\t\t: vmx\n") })).toBe(
      false,
    );
  });
});
