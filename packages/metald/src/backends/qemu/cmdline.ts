import fs from "node:fs/promises";
import { isIPv4 } from "node:net";
import { InvalidArgumentError } from "@kiln/kit";

/**
 * Everything that varies between QEMU microVMs. The rest of the command line is fixed: the
 * microvm machine with virtio-mmio devices, the serial console on ttyS0, no default devices,
 * QMP on a unix socket, user-mode networking restricted to the forwarded ports.
 */
export interface QemuSpec {
  kernel: string;
  initrd: string;
  /** The ext4 root filesystem image, attached as /dev/vda. */
  rootfs: string;
  /** The image's format (default raw); a per-VM qcow2 overlay over the shared raw image is "qcow2". */
  rootfsFormat?: "raw" | "qcow2";
  memoryMiB: number;
  vcpus: number;
  /** Hardware acceleration; TCG (software emulation) otherwise. */
  kvm: boolean;
  /** The host TSC frequency (hostTscKhz()); without it about 1 TCG boot in 5 hangs calibrating. */
  tscKhz?: number;
  qmpSocket: string;
  serial: "stdio" | { file: string };
  hostfwd: Array<{ hostAddr: string; hostPort: number; guestPort: number; protocol: "tcp" | "udp" }>;
  /**
   * Attach the NIC to an existing tap device (QEMU runs inside the VM's network namespace)
   * instead of user networking; hostfwd must then be empty. The guest's address goes on the
   * kernel command line for the VM init.
   */
  tap?: { ifname: string; mac?: string; address: string; gateway?: string; dns?: string };
  /** Appended after Kiln's own kernel parameters. */
  kernelArgs?: string[];
  hostname?: string;
}

export const QEMU_BINARY = "qemu-system-x86_64";

/** QEMU user networking always gives the guest this address, gateway and resolver. */
export const USER_NET = { address: "10.0.2.15/24", gateway: "10.0.2.2", dns: "10.0.2.3" } as const;

/**
 * The arguments (after the binary) that boot `spec` as a microVM. The kernel command line tells
 * the initramfs where the root is and tells Kiln's VM init (/.kiln/init) the hostname and network.
 * Throws InvalidArgumentError naming the field for values QEMU or the kernel would misparse.
 */
export function qemuArgs(spec: QemuSpec): string[] {
  validate(spec);
  const append = [
    "console=ttyS0",
    "root=/dev/vda",
    "rw",
    "panic=-1",
    "quiet",
    ...(spec.tscKhz !== undefined ? [`tsc_early_khz=${spec.tscKhz}`] : []),
    ...(spec.tap
      ? [
          `kiln.ip=${spec.tap.address}`,
          ...(spec.tap.gateway ? [`kiln.gw=${spec.tap.gateway}`] : []),
          ...(spec.tap.dns ? [`kiln.dns=${spec.tap.dns}`] : []),
        ]
      : [`kiln.ip=${USER_NET.address}`, `kiln.gw=${USER_NET.gateway}`]),
    ...(spec.hostname !== undefined ? [`kiln.hostname=${spec.hostname}`] : []),
    ...(spec.kernelArgs ?? []),
  ];
  const netdev = spec.tap
    ? ["tap", "id=n0", `ifname=${spec.tap.ifname}`, "script=no", "downscript=no"].join(",")
    : [
        "user",
        "id=n0",
        "restrict=on",
        ...spec.hostfwd.map((f) => `hostfwd=${f.protocol}:${f.hostAddr}:${f.hostPort}-:${f.guestPort}`),
      ].join(",");
  return [
    "-M",
    "microvm,x-option-roms=off,isa-serial=on",
    "-accel",
    spec.kvm ? "kvm" : "tcg",
    "-cpu",
    spec.kvm ? "host" : "max",
    "-m",
    String(spec.memoryMiB),
    "-smp",
    String(spec.vcpus),
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-no-reboot",
    "-serial",
    spec.serial === "stdio" ? "stdio" : `file:${spec.serial.file}`,
    "-kernel",
    spec.kernel,
    "-initrd",
    spec.initrd,
    "-append",
    append.join(" "),
    "-drive",
    `id=root,file=${optValue(spec.rootfs)},format=${spec.rootfsFormat ?? "raw"},if=none`,
    "-device",
    "virtio-blk-device,drive=root",
    "-netdev",
    netdev,
    "-device",
    `virtio-net-device,netdev=n0${spec.tap?.mac ? `,mac=${spec.tap.mac}` : ""}`,
    "-qmp",
    `unix:${optValue(spec.qmpSocket)},server=on,wait=off`,
  ];
}

/** QEMU option values escape a comma by doubling it. */
function optValue(v: string): string {
  return v.replaceAll(",", ",,");
}

function validate(spec: QemuSpec): void {
  const bad = (field: string, why: string): never => {
    throw new InvalidArgumentError(`qemu ${field} ${why}`, { field });
  };
  for (const field of ["kernel", "initrd", "rootfs", "qmpSocket"] as const) {
    if (!spec[field] || spec[field].includes("\0")) bad(field, "must be a non-empty path");
  }
  // -kernel and -initrd are plain paths, but -initrd splits several images on commas.
  if (spec.initrd.includes(","))
    bad("initrd", `path ${JSON.stringify(spec.initrd)} must not contain a comma`);
  // sun_path holds 108 bytes including the NUL.
  if (Buffer.byteLength(spec.qmpSocket) > 107) {
    bad(
      "qmpSocket",
      `path is ${Buffer.byteLength(spec.qmpSocket)} bytes; unix socket paths are limited to 107`,
    );
  }
  if (spec.serial !== "stdio") {
    // The legacy `file:` form takes the rest of the string verbatim, so commas are fine; NUL is not.
    if (!spec.serial.file || spec.serial.file.includes("\0")) bad("serial.file", "must be a non-empty path");
  }
  if (!Number.isInteger(spec.memoryMiB) || spec.memoryMiB < 16) bad("memoryMiB", "must be an integer ≥ 16");
  if (!Number.isInteger(spec.vcpus) || spec.vcpus < 1 || spec.vcpus > 255)
    bad("vcpus", "must be an integer 1–255");
  if (spec.tscKhz !== undefined && (!Number.isInteger(spec.tscKhz) || spec.tscKhz <= 0)) {
    bad("tscKhz", "must be a positive integer");
  }
  spec.hostfwd.forEach((f, i) => {
    if (!isIPv4(f.hostAddr))
      bad(`hostfwd[${i}].hostAddr`, `${JSON.stringify(f.hostAddr)} must be an IPv4 address`);
    for (const k of ["hostPort", "guestPort"] as const) {
      if (!Number.isInteger(f[k]) || f[k] < 1 || f[k] > 65535)
        bad(`hostfwd[${i}].${k}`, "must be a port 1–65535");
    }
    if (f.protocol !== "tcp" && f.protocol !== "udp") bad(`hostfwd[${i}].protocol`, "must be tcp or udp");
  });
  if (spec.rootfsFormat !== undefined && spec.rootfsFormat !== "raw" && spec.rootfsFormat !== "qcow2") {
    bad("rootfsFormat", "must be raw or qcow2");
  }
  if (spec.tap) {
    const t = spec.tap;
    if (!/^[A-Za-z0-9_.-]{1,15}$/.test(t.ifname))
      bad("tap.ifname", `${JSON.stringify(t.ifname)} must be an interface name (≤ 15 chars)`);
    if (t.mac !== undefined && !/^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/.test(t.mac))
      bad("tap.mac", `${JSON.stringify(t.mac)} must be a MAC address`);
    const [addr, prefix, ...rest] = t.address.split("/");
    if (!addr || !isIPv4(addr) || rest.length > 0 || !/^\d{1,2}$/.test(prefix ?? "") || Number(prefix) > 32) {
      bad("tap.address", `${JSON.stringify(t.address)} must be ADDR/PREFIX (IPv4)`);
    }
    if (t.gateway !== undefined && !isIPv4(t.gateway))
      bad("tap.gateway", `${JSON.stringify(t.gateway)} must be an IPv4 address`);
    if (t.dns !== undefined && !t.dns.split(",").every((d) => isIPv4(d)))
      bad("tap.dns", `${JSON.stringify(t.dns)} must be IPv4 addresses separated by commas`);
    if (spec.hostfwd.length > 0)
      bad("hostfwd", "must be empty with a tap device: ports are forwarded to the guest address on the host");
  }
  if (spec.hostname !== undefined && !/^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$/.test(spec.hostname)) {
    bad("hostname", `${JSON.stringify(spec.hostname)} must be a DNS label (letters, digits, dashes; ≤ 63)`);
  }
  (spec.kernelArgs ?? []).forEach((a, i) => {
    if (a === "" || /[\s"\0]/.test(a)) {
      bad(`kernelArgs[${i}]`, `${JSON.stringify(a)} must be one word without whitespace or quotes`);
    }
  });
}

/**
 * The host's TSC frequency in kHz, from /proc/cpuinfo's "cpu MHz" (a guest on TCG calibrates
 * against it; see QemuSpec.tscKhz). Undefined when the line is missing.
 */
export async function hostTscKhz(cpuinfoPath = "/proc/cpuinfo"): Promise<number | undefined> {
  const text = await fs.readFile(cpuinfoPath, "utf8").catch(() => "");
  const m = /^cpu MHz\s*:\s*([0-9]+(?:\.[0-9]+)?)\s*$/m.exec(text);
  if (!m) return undefined;
  const khz = Math.round(Number(m[1]) * 1000);
  return khz > 0 ? khz : undefined;
}

/**
 * Whether `-accel kvm` can work: /dev/kvm opens read-write and the CPU advertises VMX or SVM.
 * A /dev/kvm node alone is not enough: nested guests can have one whose vCPUs QEMU cannot
 * configure (QEMU aborts with "failed to set MSR").
 */
export async function kvmUsable(opts: { device?: string; cpuinfoPath?: string } = {}): Promise<boolean> {
  try {
    const fh = await fs.open(opts.device ?? "/dev/kvm", "r+");
    await fh.close();
  } catch {
    return false;
  }
  const text = await fs.readFile(opts.cpuinfoPath ?? "/proc/cpuinfo", "utf8").catch(() => "");
  return /^flags\s*:.*\b(vmx|svm)\b/m.test(text);
}
