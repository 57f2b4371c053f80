/**
 * Kiln's reader of layer tars: POSIX ustar with PAX records, GNU long names, and old V7 headers,
 * read as Go's archive/tar reads them (what Docker writes layers with, and umoci unpacks them with)
 * wherever tar dialects differ.
 *
 * It is Kiln's own rather than tar-stream because PAX values must arrive as bytes: the
 * `SCHILY.xattr.NAME` records of a layer hold binary extended attributes (a file capability with
 * cap_setuid has a 0x80 byte), which tar libraries for Node decode as UTF-8, replacing whatever is
 * not valid UTF-8.
 *
 * - Every header's checksum is checked (unsigned, or signed as some old tars wrote it); numbers
 *   are octal or GNU base-256.
 * - PAX `x` records apply to the next entry: path, linkpath, size, uid, gid, uname, gname, mtime,
 *   atime, and `SCHILY.xattr.*` (bytes). Global `g` headers are skipped (Go returns them as entries
 *   of their own, which umoci skips). GNU `L` and `K` carry a long name and link name.
 * - Links, symlinks, devices, fifos and directories have no body whatever their size field says.
 * - The archive ends at its first all-zero block; what follows is padding. A stream that ends
 *   between two entries ends the archive too; one that ends inside a header or a body is truncated.
 *
 * Entries are read one at a time: the body of an entry must be read (or left) before the next
 * entry is asked for, and what is left of it is skipped.
 */
import { InvalidLayerError } from "./errors.js";

export type TarEntryType =
  | "file"
  | "contiguous-file"
  | "link"
  | "symlink"
  | "character-device"
  | "block-device"
  | "directory"
  | "fifo"
  | "unknown";

export interface TarHeader {
  name: string;
  type: TarEntryType;
  /** The header's type flag, as a character: what an "unknown" type was. */
  typeflag: string;
  /** Bytes of content (0 for the types that have none). */
  size: number;
  mode: number;
  uid: number;
  gid: number;
  /** Seconds since the epoch, fractional when a PAX record gave the time. */
  mtime: number;
  /** From a PAX record only (ustar headers have no atime). */
  atime?: number;
  linkname: string;
  uname: string;
  gname: string;
  devmajor: number;
  devminor: number;
  /** The PAX records that applied to this entry, values decoded as UTF-8. */
  pax: Readonly<Record<string, string>>;
  /** `SCHILY.xattr.NAME` records: NAME → the value's bytes. */
  xattrs: ReadonlyMap<string, Buffer>;
}

const NO_PAX: Readonly<Record<string, string>> = Object.freeze({});
const NO_XATTRS: ReadonlyMap<string, Buffer> = new Map();

/** One entry: its header, and its content as it streams (iterate it once, before the next entry). */
export interface TarEntry extends AsyncIterable<Buffer> {
  readonly header: TarHeader;
}

const BLOCK = 512;
/** Largest PAX or GNU long-name body: far above real ones (a few hundred bytes), bounded. */
export const MAX_META_BYTES = 1024 * 1024;
const HEADER_ONLY = new Set<TarEntryType>([
  "link",
  "symlink",
  "character-device",
  "block-device",
  "directory",
  "fifo",
]);
const TYPES: Record<string, TarEntryType> = {
  "0": "file",
  "7": "contiguous-file",
  "1": "link",
  "2": "symlink",
  "3": "character-device",
  "4": "block-device",
  "5": "directory",
  "6": "fifo",
};

/** Buffered reads of exact sizes over a stream of chunks. */
class Bytes {
  private chunks: Buffer[] = [];
  private buffered = 0;

  constructor(private readonly source: AsyncIterator<Buffer | Uint8Array>) {}

  /** Lets go of the source (a stream's iterator destroys the stream). */
  async close(): Promise<void> {
    await this.source.return?.();
  }

  get available(): number {
    return this.buffered;
  }

  /**
   * Buffers at least `n` bytes; false when the stream ends first. Callers check `available`
   * first: most headers and small bodies are buffered already, and an await costs a tick.
   */
  async want(n: number): Promise<boolean> {
    while (this.buffered < n) {
      const r = await this.source.next();
      if (r.done) return false;
      const c = Buffer.isBuffer(r.value)
        ? r.value
        : Buffer.from(r.value.buffer, r.value.byteOffset, r.value.length);
      if (c.length === 0) continue;
      this.chunks.push(c);
      this.buffered += c.length;
    }
    return true;
  }

  /** Takes `n` buffered bytes (copied only when they span chunks). */
  take(n: number): Buffer {
    this.buffered -= n;
    const first = this.chunks[0]!;
    if (first.length > n) {
      this.chunks[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    if (first.length === n) return this.chunks.shift()!;
    const out = Buffer.allocUnsafe(n);
    for (let at = 0; at < n; ) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - at);
      c.copy(out, at, 0, k);
      at += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    return out;
  }

  /** Up to `n` bytes of what is buffered (one chunk's worth at most); call with something buffered. */
  takeSome(n: number): Buffer {
    return this.take(Math.min(n, this.chunks[0]!.length));
  }

  /** Drops up to `n` buffered bytes; returns how many. */
  drop(n: number): number {
    let dropped = 0;
    while (dropped < n && this.chunks.length > 0) {
      const first = this.chunks[0]!;
      const k = Math.min(first.length, n - dropped);
      if (k === first.length) this.chunks.shift();
      else this.chunks[0] = first.subarray(k);
      dropped += k;
    }
    this.buffered -= dropped;
    return dropped;
  }
}

/**
 * The entries of the tar `source`. `what` names the tar in errors: a layer's ("layer tar", the
 * default), or an image archive's.
 */
export async function* readTar(
  source: AsyncIterable<Buffer | Uint8Array>,
  what = "layer tar",
): AsyncGenerator<TarEntry, void, undefined> {
  const bytes = new Bytes(source[Symbol.asyncIterator]());
  let previous: string | undefined;
  const after = () => (previous === undefined ? "" : ` after entry ${JSON.stringify(previous)}`);
  const truncated = () =>
    new InvalidLayerError(`${what} ends unexpectedly${after()}; it is truncated or corrupt`, previous);
  const notTar = (why: string) =>
    new InvalidLayerError(`${what} is not a valid tar stream (${why})${after()}`, previous);

  /** Reads a whole metadata body (PAX records, a GNU long name) and its padding. */
  const metaBody = async (size: number, kind: string) => {
    if (size > MAX_META_BYTES) throw notTar(`a ${kind} of ${size} bytes, over ${MAX_META_BYTES}`);
    const padded = size + padding(size);
    if (bytes.available < padded && !(await bytes.want(padded))) throw truncated();
    return Buffer.from(bytes.take(padded).subarray(0, size));
  };
  /** Skips `n` bytes; false when the stream ends first. */
  const skip = async (n: number) => {
    let left = n - bytes.drop(n);
    while (left > 0) {
      if (!(await bytes.want(1))) return false;
      left -= bytes.drop(left);
    }
    return true;
  };

  try {
    yield* entries();
  } finally {
    // Done, failed, or the consumer stopped: what is left of the source (padding, the rest of a
    // bad stream) is not read.
    await bytes.close().catch(() => {});
  }

  async function* entries(): AsyncGenerator<TarEntry, void, undefined> {
    let pax: Map<string, Buffer> | undefined;
    let longName: string | undefined;
    let longLink: string | undefined;
    for (;;) {
      if (bytes.available < BLOCK && !(await bytes.want(BLOCK))) {
        if (bytes.available === 0 && !pax && longName === undefined && longLink === undefined) return;
        throw truncated();
      }
      const block = bytes.take(BLOCK);
      if (isZero(block)) return;
      const header = decodeHeader(block, notTar);
      switch (header.typeflag) {
        case "x":
          pax = parsePax(await metaBody(header.size, "PAX header"), notTar);
          continue;
        case "g":
          await metaBody(header.size, "PAX global header");
          continue;
        case "L":
          longName = cString(await metaBody(header.size, "GNU long name"), 0, header.size);
          continue;
        case "K":
          longLink = cString(await metaBody(header.size, "GNU long link name"), 0, header.size);
          continue;
      }
      if (longName !== undefined) header.name = longName;
      if (longLink !== undefined) header.linkname = longLink;
      if (pax) applyPax(header, pax, notTar);
      pax = undefined;
      longName = undefined;
      longLink = undefined;
      if (HEADER_ONLY.has(header.type)) header.size = 0;

      let left = header.size;
      const cutShort = () =>
        new InvalidLayerError(
          `${what} ends in the middle of entry ${JSON.stringify(header.name)} (declared ${header.size} bytes); ` +
            "it is truncated or corrupt",
          header.name,
        );
      // A plain iterator, not an async generator: most bodies are buffered whole already, and a
      // generator's machinery per entry was most of the cost of reading images of small files.
      const done = { done: true, value: undefined } as const;
      const entry: TarEntry = {
        header,
        [Symbol.asyncIterator]: () => ({
          next: async (): Promise<IteratorResult<Buffer>> => {
            if (left === 0) return done;
            if (bytes.available === 0 && !(await bytes.want(1))) throw cutShort();
            const c = bytes.takeSome(left);
            left -= c.length;
            return { done: false, value: c };
          },
        }),
      };
      yield entry;
      previous = header.name;
      // What the consumer did not read of the body, then the body's padding (most often buffered).
      if (left > 0 && !(await skip(left))) throw cutShort();
      left = 0;
      const pad = padding(header.size);
      const dropped = bytes.drop(pad);
      if (dropped < pad && !(await skip(pad - dropped))) throw truncated();
    }
  }
}

function padding(size: number): number {
  return (BLOCK - (size % BLOCK)) % BLOCK;
}

function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

/** Bytes from `start` up to the first NUL (or `len`), decoded as UTF-8. */
function cString(b: Buffer, start: number, len: number): string {
  const nul = b.indexOf(0, start);
  const end = nul >= 0 && nul < start + len ? nul : start + len;
  return b.toString("utf8", start, end);
}

type NotTar = (why: string) => InvalidLayerError;

/** A ustar numeric field: octal text, or GNU base-256 when the first byte's top bit is set. */
function numeric(b: Buffer, start: number, len: number, field: string, notTar: NotTar): number {
  if (b[start]! & 0x80) {
    if (b[start] === 0xff) throw notTar(`a negative ${field}`);
    let n = b[start]! & 0x7f;
    for (let i = start + 1; i < start + len; i++) n = n * 256 + b[i]!;
    if (!Number.isSafeInteger(n)) throw notTar(`a ${field} too large to read`);
    return n;
  }
  // Octal digits, with spaces and NULs around them.
  const end = start + len;
  let i = start;
  while (i < end && (b[i] === 0x20 || b[i] === 0)) i++;
  let n = 0;
  for (; i < end; i++) {
    const c = b[i]!;
    if (c < 0x30 || c > 0x37) break;
    n = n * 8 + (c - 0x30);
  }
  while (i < end && (b[i] === 0x20 || b[i] === 0)) i++;
  if (i < end)
    throw notTar(`${field} ${JSON.stringify(b.toString("latin1", start, end))} is not an octal number`);
  return n;
}

function decodeHeader(b: Buffer, notTar: NotTar): TarHeader {
  let unsigned = 0;
  let signed = 0;
  for (let i = 0; i < BLOCK; i++) {
    const c = i >= 148 && i < 156 ? 0x20 : b[i]!;
    unsigned += c;
    signed += (c << 24) >> 24;
  }
  let stored: number;
  try {
    stored = numeric(b, 148, 8, "header checksum", notTar);
  } catch {
    stored = -1;
  }
  if (stored !== unsigned && stored !== signed) throw notTar("a header's checksum does not match");
  const magic = b.toString("latin1", 257, 263);
  // POSIX ustar splits long names into prefix + name; GNU tars use those bytes for other fields.
  const ustar = magic === "ustar\0";
  let name = cString(b, 0, 100);
  if (ustar && b[345] !== 0) name = `${cString(b, 345, 155)}/${name}`;
  // Before ustar (type NUL), a directory was a file entry whose name ends in "/".
  const flag = b[156] === 0 ? (name.endsWith("/") ? "5" : "0") : String.fromCharCode(b[156]!);
  return {
    name,
    type: TYPES[flag] ?? "unknown",
    typeflag: flag,
    size: numeric(b, 124, 12, "size", notTar),
    mode: numeric(b, 100, 8, "mode", notTar),
    uid: numeric(b, 108, 8, "uid", notTar),
    gid: numeric(b, 116, 8, "gid", notTar),
    mtime: numeric(b, 136, 12, "mtime", notTar),
    linkname: cString(b, 157, 100),
    uname: cString(b, 265, 32),
    gname: cString(b, 297, 32),
    devmajor: numeric(b, 329, 8, "device major", notTar),
    devminor: numeric(b, 337, 8, "device minor", notTar),
    pax: NO_PAX,
    xattrs: NO_XATTRS,
  };
}

/** PAX records `"%d %s=%s\n"` (trailing NUL padding tolerated), values as bytes. */
function parsePax(buf: Buffer, notTar: NotTar): Map<string, Buffer> {
  const records = new Map<string, Buffer>();
  let at = 0;
  while (at < buf.length) {
    if (buf[at] === 0 && isZero(buf.subarray(at))) break;
    const space = buf.indexOf(0x20, at);
    const digits = space < 0 ? "" : buf.toString("latin1", at, space);
    const len = /^[0-9]{1,7}$/.test(digits) ? Number(digits) : Number.NaN;
    const end = at + len;
    if (!(len > digits.length + 1) || end > buf.length || buf[end - 1] !== 0x0a) {
      throw notTar(`a malformed PAX record at byte ${at} of its header`);
    }
    const eq = buf.indexOf(0x3d, space + 1);
    if (eq < 0 || eq >= end - 1) throw notTar(`a PAX record without "=" at byte ${at} of its header`);
    records.set(buf.toString("utf8", space + 1, eq), buf.subarray(eq + 1, end - 1));
    at = end;
  }
  return records;
}

const XATTR_PREFIX = "SCHILY.xattr.";

/** Applies an entry's PAX records to its header, as Go's archive/tar merges them. */
function applyPax(header: TarHeader, records: Map<string, Buffer>, notTar: NotTar): void {
  const pax: Record<string, string> = {};
  const xattrs = new Map<string, Buffer>();
  header.pax = pax;
  header.xattrs = xattrs;
  for (const [key, value] of records) {
    const text = value.toString("utf8");
    pax[key] = text;
    if (key.startsWith(XATTR_PREFIX)) {
      xattrs.set(key.slice(XATTR_PREFIX.length), value);
      continue;
    }
    const integer = () => {
      if (!/^[0-9]{1,15}$/.test(text)) throw notTar(`PAX ${key}=${JSON.stringify(text)} is not a number`);
      return Number(text);
    };
    switch (key) {
      case "path":
        header.name = text;
        break;
      case "linkpath":
        header.linkname = text;
        break;
      case "size":
        header.size = integer();
        break;
      case "uid":
        header.uid = integer();
        break;
      case "gid":
        header.gid = integer();
        break;
      case "uname":
        header.uname = text;
        break;
      case "gname":
        header.gname = text;
        break;
      case "mtime":
      case "atime": {
        // Seconds with an optional fraction; anything else keeps the header's time, as before.
        if (/^-?[0-9]{1,15}(\.[0-9]+)?$/.test(text)) header[key] = Number(text);
        break;
      }
    }
  }
}
