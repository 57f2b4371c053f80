import { type Xattr, xattrIndex, xattrsFitBlock } from "../rootfs/ext4/xattrs.js";
import type { TarHeader } from "./tar-reader.js";

/** The extended attributes of one layer entry: those Kiln keeps, and the others with the reason. */
export interface EntryXattrs {
  kept: Xattr[];
  dropped: Array<{ name: string; reason: string }>;
}

const LIBARCHIVE_PREFIX = "LIBARCHIVE.xattr.";

/**
 * The extended attributes a layer entry carries, from its PAX records:
 * - `SCHILY.xattr.NAME`, the value's bytes as they are (GNU tar, and Go's archive/tar: Docker and
 *   BuildKit write file capabilities this way);
 * - `LIBARCHIVE.xattr.NAME` (bsdtar): NAME percent-encoded, the value base64. bsdtar writes both
 *   forms; for a name in both, this one is taken.
 *
 * Kept are the names in the namespaces ext4 stores as bytes (`user.`, `trusted.`, `security.`), as
 * long as all of them fit one ext4 attribute block (~4 KiB). Dropped, with the reason: any other
 * namespace (`system.posix_acl_*` ACLs need ext4's own ACL format), and all of an entry's attributes
 * when they do not fit.
 */
export function entryXattrs(h: TarHeader): EntryXattrs {
  const libarchive = Object.keys(h.pax).filter((k) => k.startsWith(LIBARCHIVE_PREFIX));
  if (h.xattrs.size === 0 && libarchive.length === 0) return { kept: [], dropped: [] };
  const values = new Map(h.xattrs);
  for (const key of libarchive) {
    const text = h.pax[key]!;
    const name = percentDecode(key.slice(LIBARCHIVE_PREFIX.length));
    if (name !== undefined && /^[A-Za-z0-9+/]*={0,2}$/.test(text))
      values.set(name, Buffer.from(text, "base64"));
  }
  const kept: Xattr[] = [];
  const dropped: EntryXattrs["dropped"] = [];
  for (const [name, value] of values) {
    if (xattrIndex(name)) kept.push({ name, value });
    else dropped.push({ name, reason: "ext4 images keep only user., trusted. and security. attributes" });
  }
  if (kept.length > 0 && !xattrsFitBlock(kept)) {
    for (const { name } of kept)
      dropped.push({ name, reason: "the entry's attributes exceed one ext4 block" });
    kept.length = 0;
  }
  return { kept, dropped };
}

/** `%XX` escapes to bytes, read as UTF-8; undefined for a malformed escape. */
function percentDecode(s: string): string | undefined {
  if (!s.includes("%")) return s;
  const bytes: number[] = [];
  for (let i = 0; i < s.length; i++) {
    if (s[i] !== "%") {
      bytes.push(...Buffer.from(s[i]!, "utf8"));
      continue;
    }
    const hex = s.slice(i + 1, i + 3);
    if (!/^[0-9A-Fa-f]{2}$/.test(hex)) return undefined;
    bytes.push(Number.parseInt(hex, 16));
    i += 2;
  }
  return Buffer.from(bytes).toString("utf8");
}
