import type { Header } from "tar-stream";

/**
 * The ownership, permissions and times a tar header asks for. PAX records override the ustar
 * fields as in Go's archive/tar (which umoci uses): `uid`/`gid` for ids above 2097151, `mtime`
 * and `atime` with sub-second precision. tar-stream applies only `path`, `linkpath` and `size`.
 */
export interface EntryMetadata {
  uid: number;
  gid: number;
  /** Permission bits including setuid, setgid and sticky (file-type bits stripped). */
  mode: number;
  /** Seconds since the epoch (fractional). */
  mtime: number;
  atime: number;
  /** Whether the entry carries extended attributes (which Node cannot set). */
  hasXattrs: boolean;
}

export function entryMetadata(h: Header): EntryMetadata {
  const pax = paxRecords(h.pax);
  const uid = paxInt(pax?.["uid"]) ?? h.uid;
  const gid = paxInt(pax?.["gid"]) ?? h.gid;
  let mtime = paxTime(pax?.["mtime"]) ?? h.mtime.getTime() / 1000;
  if (!Number.isFinite(mtime)) mtime = Date.now() / 1000;
  const atime = paxTime(pax?.["atime"]) ?? mtime;
  let hasXattrs = false;
  if (pax) {
    for (const key of Object.keys(pax)) {
      if (key.startsWith("SCHILY.xattr.") || key.startsWith("LIBARCHIVE.xattr.")) {
        hasXattrs = true;
        break;
      }
    }
  }
  return { uid, gid, mode: h.mode & 0o7777, mtime, atime, hasXattrs };
}

function paxRecords(pax: unknown): Record<string, string> | null {
  return typeof pax === "object" && pax !== null ? (pax as Record<string, string>) : null;
}

function paxInt(v: string | undefined): number | undefined {
  if (v === undefined || !/^\d+$/.test(v)) return undefined;
  return Number(v);
}

function paxTime(v: string | undefined): number | undefined {
  if (v === undefined || !/^-?\d+(\.\d+)?$/.test(v)) return undefined;
  return Number(v);
}
