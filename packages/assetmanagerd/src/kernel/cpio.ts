/**
 * The "newc" cpio format (SVR4 without CRC), which is what the Linux kernel unpacks as an
 * initramfs (Documentation/driver-api/early-userspace/buffer-format.rst). Written here so building
 * an initramfs needs no cpio binary.
 *
 * Each entry: a 110-byte ASCII header ("070701" and 13 eight-digit hex fields), the name with a
 * NUL, padding to 4 bytes, the data, padding to 4 bytes. The archive ends with "TRAILER!!!".
 */

export type CpioEntry =
  | { type: "dir"; path: string; mode?: number }
  | { type: "file"; path: string; data: Buffer; mode?: number }
  | { type: "symlink"; path: string; target: string }
  | { type: "char-device"; path: string; major: number; minor: number; mode?: number };

const MAGIC = "070701";
const TRAILER = "TRAILER!!!";
const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;

/** Serialises entries in the given order (parents must come before their children). */
export function writeCpio(entries: CpioEntry[], opts: { mtime?: number } = {}): Buffer {
  const mtime = opts.mtime ?? 0;
  const parts: Buffer[] = [];
  let ino = 1;
  for (const e of entries) {
    const name = e.path.replace(/^\/+/, "");
    if (name === "" || name.split("/").some((s) => s === ".." || s === "")) {
      throw new Error(`cpio entry path ${JSON.stringify(e.path)} must be a normal relative path`);
    }
    let mode: number;
    let data: Buffer = Buffer.alloc(0);
    let rdev = { major: 0, minor: 0 };
    switch (e.type) {
      case "dir":
        mode = S_IFDIR | (e.mode ?? 0o755);
        break;
      case "file":
        mode = S_IFREG | (e.mode ?? 0o644);
        data = e.data;
        break;
      case "symlink":
        mode = S_IFLNK | 0o777;
        data = Buffer.from(e.target);
        break;
      case "char-device":
        mode = S_IFCHR | (e.mode ?? 0o600);
        rdev = { major: e.major, minor: e.minor };
        break;
    }
    parts.push(
      header(name, { ino: ino++, mode, nlink: e.type === "dir" ? 2 : 1, mtime, size: data.length, rdev }),
    );
    parts.push(data, pad(data.length));
  }
  parts.push(header(TRAILER, { ino: 0, mode: 0, nlink: 1, mtime: 0, size: 0, rdev: { major: 0, minor: 0 } }));
  return Buffer.concat(parts);
}

function header(
  name: string,
  h: {
    ino: number;
    mode: number;
    nlink: number;
    mtime: number;
    size: number;
    rdev: { major: number; minor: number };
  },
): Buffer {
  const nameBytes = Buffer.from(`${name}\0`);
  const fields = [
    h.ino,
    h.mode,
    0,
    0,
    h.nlink,
    h.mtime,
    h.size,
    0,
    0,
    h.rdev.major,
    h.rdev.minor,
    nameBytes.length,
    0,
  ];
  const text = MAGIC + fields.map((n) => n.toString(16).padStart(8, "0")).join("");
  const head = Buffer.concat([Buffer.from(text, "ascii"), nameBytes]);
  return Buffer.concat([head, pad(head.length)]);
}

function pad(n: number): Buffer {
  return Buffer.alloc((4 - (n % 4)) % 4);
}

export interface ParsedCpioEntry {
  path: string;
  mode: number;
  type: "dir" | "file" | "symlink" | "char-device" | "other";
  data: Buffer;
  rdevMajor: number;
  rdevMinor: number;
}

/** Reads a newc archive back (for tests and for inspecting an initramfs asset). */
export function parseCpio(buf: Buffer): ParsedCpioEntry[] {
  const out: ParsedCpioEntry[] = [];
  let off = 0;
  for (;;) {
    if (off + 110 > buf.length) throw new Error(`cpio archive truncated at offset ${off}`);
    const magic = buf.toString("ascii", off, off + 6);
    if (magic !== MAGIC) throw new Error(`bad cpio magic ${JSON.stringify(magic)} at offset ${off}`);
    const field = (i: number) =>
      Number.parseInt(buf.toString("ascii", off + 6 + i * 8, off + 14 + i * 8), 16);
    const mode = field(1);
    const size = field(6);
    const namesize = field(11);
    const nameStart = off + 110;
    const name = buf.toString("utf8", nameStart, nameStart + namesize - 1);
    const dataStart = align4(nameStart + namesize);
    if (name === TRAILER) return out;
    const data = buf.subarray(dataStart, dataStart + size);
    const fmt = mode & 0o170000;
    out.push({
      path: name,
      mode: mode & 0o7777,
      type:
        fmt === S_IFDIR
          ? "dir"
          : fmt === S_IFREG
            ? "file"
            : fmt === S_IFLNK
              ? "symlink"
              : fmt === S_IFCHR
                ? "char-device"
                : "other",
      data,
      rdevMajor: field(9),
      rdevMinor: field(10),
    });
    off = align4(dataStart + size);
  }
}

function align4(n: number): number {
  return (n + 3) & ~3;
}
