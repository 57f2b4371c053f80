import type { Xattr } from "../rootfs/ext4/xattrs.js";
import { entryXattrs } from "./entry-xattrs.js";
import type { TarHeader } from "./tar-reader.js";

/**
 * The ownership, permissions, times and extended attributes a tar entry asks for. The reader has
 * applied the PAX records already (ids above 2097151, sub-second times), as Go's archive/tar does.
 */
export interface EntryMetadata {
  uid: number;
  gid: number;
  /** Permission bits including setuid, setgid and sticky (file-type bits stripped). */
  mode: number;
  /** Seconds since the epoch (fractional). */
  mtime: number;
  atime: number;
  /** Extended attributes to keep (entry-xattrs.ts). */
  xattrs: Xattr[];
  /** Attributes the entry carries that are not kept, and why. */
  droppedXattrs: Array<{ name: string; reason: string }>;
}

export function entryMetadata(h: TarHeader): EntryMetadata {
  const mtime = Number.isFinite(h.mtime) ? h.mtime : Date.now() / 1000;
  const { kept, dropped } = entryXattrs(h);
  return {
    uid: h.uid,
    gid: h.gid,
    mode: h.mode & 0o7777,
    mtime,
    atime: h.atime ?? mtime,
    xattrs: kept,
    droppedXattrs: dropped,
  };
}
