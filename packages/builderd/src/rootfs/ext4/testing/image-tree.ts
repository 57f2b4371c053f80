/**
 * A test oracle for ext4 images: reads an image's whole tree back without mounting it, as the same
 * `TreeSnapshot` that `snapshotTree` (extract/fixtures/tree-snapshot.ts) makes of a directory, so a
 * test can compare an image with `umoci raw unpack` of the same OCI image; and checks the image with
 * `e2fsck -fn`. Test helper only (not part of the build).
 *
 * Everything is read with e2fsprogs' debugfs, read-only, with inodes addressed by number (`<ino>`)
 * so that no name is ever quoted:
 * - `ls -p <dir>` per directory (inode, mode, uid, gid, name, size of each entry) and `stat <ino>`
 *   per non-directory inode (mtime, symlink target), in one debugfs process per level of the tree:
 *   a directory's children are known only once it has been listed;
 * - `cat <ino>` per regular file and slow symlink, in one last process, hashed as it streams.
 * A tree whose deepest entry is n levels below the root takes n + 2 processes.
 *
 * Each field is what `lstat` would report on the mounted image, decoded the way Linux does:
 * - type and permission bits from the inode's i_mode (not the directory entry's file type byte);
 * - uid and gid in full 32 bits (debugfs prints them with %d: above 2^31 they come out negative);
 * - mtime as `(s32)i_mtime + (epoch bits << 32)` seconds plus the nanoseconds of i_mtime_extra,
 *   truncated to milliseconds exactly as snapshotTree does (`mtimeNs / 1_000_000n`);
 * - fast symlinks (target in the inode) from `stat`, slow ones (target in a block) from `cat`,
 *   deciding which is which as Linux does (no data blocks), not as debugfs does (size < 60).
 *
 * Limits: names and targets are decoded as UTF-8, as snapshotTree's readdir/readlink do; a name or
 * a fast symlink target containing a newline followed by debugfs's echo of the next command
 * (`debugfs: stat <12>`) would confuse the output's framing (names are otherwise free, newlines and
 * quotes included). Extended attributes, device numbers and directory mtimes are not compared,
 * as snapshotTree does not compare them.
 */
import { spawn } from "node:child_process";
import { createHash, type Hash } from "node:crypto";
import { existsSync } from "node:fs";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import type { NodeType, TreeNode, TreeSnapshot } from "../../../extract/fixtures/tree-snapshot.js";

export interface SnapshotImageOptions {
  /**
   * Include the root's `lost+found` directory (default false). mke2fs always makes one, and trees
   * unpacked from OCI images have none, so by default it is left out, with everything in it.
   */
  includeLostFound?: boolean;
}

export interface FsckResult {
  /** e2fsck found nothing to fix: exit code 0 and no question it answered "no" to (see fsckImage). */
  clean: boolean;
  exitCode: number | null;
  /** e2fsck's stdout, then its stderr: for the failure message. */
  output: string;
}

const ROOT_INO = 2;
const EXT4_INLINE_DATA_FL = 0x10000000;
const S_IFMT = 0o170000;
const TYPES = new Map<number, NodeType>([
  [0o100000, "file"],
  [0o040000, "dir"],
  [0o120000, "symlink"],
  [0o020000, "char-device"],
  [0o060000, "block-device"],
  [0o010000, "fifo"],
  [0o140000, "socket"],
]);

/** debugfs stat's names for the types. */
const STAT_TYPES = new Map<string, NodeType>([
  ["regular", "file"],
  ["directory", "dir"],
  ["symlink", "symlink"],
  ["character special", "char-device"],
  ["block special", "block-device"],
  ["FIFO", "fifo"],
  ["socket", "socket"],
]);

/** One line of `ls -p`: `/ino/mode/uid/gid/name/size/`; size is empty for directories. Names cannot hold "/". */
const LS_ENTRY = /\/(\d+)\/([0-7]+)\/(-?\d+)\/(-?\d+)\/([^/]*)\/(\d*)\/\n/g;

interface Entry {
  name: string;
  ino: number;
  type: NodeType;
  mode: number;
  uid: number;
  gid: number;
}

interface InodeInfo {
  type: NodeType;
  size: number;
  mtimeMs: number;
  /** Set for fast symlinks (target in the inode). */
  target?: string;
}

/** The tree in an ext4 image, in the shape snapshotTree gives a directory. */
export async function snapshotImage(image: string, opts: SnapshotImageOptions = {}): Promise<TreeSnapshot> {
  const children = new Map<string, Entry[]>();
  const dirInodes = new Map<number, string>([[ROOT_INO, "."]]);
  const inodes = new Map<number, InodeInfo>();
  const statQueued = new Set<number>();
  let root: Entry | undefined;

  let toList: Array<{ ino: number; rel: string }> = [{ ino: ROOT_INO, rel: "." }];
  let toStat: number[] = [];
  while (toList.length > 0 || toStat.length > 0) {
    const commands = [...toList.map((d) => `ls -p <${d.ino}>`), ...toStat.map((ino) => `stat <${ino}>`)];
    const sections = await debugfsSections(image, commands);
    const nextList: typeof toList = [];
    const nextStat: number[] = [];
    toList.forEach((dir, i) => {
      const entries: Entry[] = [];
      for (const e of parseListing(sections[i]!, image, dir.rel)) {
        if (e.name === ".") {
          if (dir.rel === ".") root = e;
          continue;
        }
        if (e.name === "..") continue;
        const rel = dir.rel === "." ? e.name : `${dir.rel}/${e.name}`;
        if (e.type === "dir") {
          if (dir.rel === "." && e.name === "lost+found" && !opts.includeLostFound) continue;
          const seen = dirInodes.get(e.ino);
          if (seen !== undefined) {
            throw new Error(`${image}: directory inode ${e.ino} is both ${seen} and ${rel}`);
          }
          dirInodes.set(e.ino, rel);
          nextList.push({ ino: e.ino, rel });
        } else if (!statQueued.has(e.ino)) {
          statQueued.add(e.ino);
          nextStat.push(e.ino);
        }
        entries.push(e);
      }
      children.set(dir.rel, entries);
    });
    toStat.forEach((ino, i) => {
      inodes.set(ino, parseStat(sections[toList.length + i]!, image, ino));
    });
    toList = nextList;
    toStat = nextStat;
  }
  if (!root) throw new Error(`${image}: debugfs listed no "." in the root directory`);

  const toRead = [...inodes].filter(
    ([, info]) => info.type === "file" || (info.type === "symlink" && info.target === undefined),
  );
  const contents = await catInodes(
    image,
    toRead.map(([ino, info]) => ({ ino, size: info.size, keep: info.type === "symlink" })),
  );

  const nodes: Record<string, TreeNode> = {};
  const byInode = new Map<number, string[]>();
  const emit = (rel: string, e: Entry) => {
    const node: TreeNode = {
      type: e.type,
      mode: (e.mode & 0o7777).toString(8).padStart(4, "0"),
      uid: e.uid,
      gid: e.gid,
    };
    if (e.type !== "dir") {
      const info = inodes.get(e.ino)!;
      if (info.type !== e.type) {
        throw new Error(`${image}: ${rel} is a ${e.type} in its directory but a ${info.type} in stat`);
      }
      node.mtimeMs = info.mtimeMs;
      if (e.type === "symlink") {
        node.target = info.target ?? contents.get(e.ino)!.data!.toString("utf8");
        delete (node as { mode?: string }).mode; // as snapshotTree: a symlink's own mode is never applied
      }
      if (e.type === "file") node.sha256 = contents.get(e.ino)!.sha256;
      const group = byInode.get(e.ino) ?? [];
      group.push(rel);
      byInode.set(e.ino, group);
    }
    nodes[rel] = node;
    if (e.type === "dir") {
      const entries = children.get(rel) ?? [];
      const byName = new Map(entries.map((c) => [c.name, c]));
      for (const name of [...byName.keys()].sort())
        emit(rel === "." ? name : `${rel}/${name}`, byName.get(name)!);
    }
  };
  emit(".", root);

  const hardlinkGroups = [...byInode.values()]
    .filter((g) => g.length > 1)
    .map((g) => g.sort())
    .sort((a, b) => a[0]!.localeCompare(b[0]!));
  return { nodes, hardlinkGroups };
}

/**
 * Runs `e2fsck -fn` (full check, read-only, answers every question "no"). Clean means exit code 0
 * and no question answered "no" apart from "Optimize?" (a suggestion, not a fault): e2fsck exits 0
 * for some faults it calls harmless, such as a wrong free blocks count in the superblock ("Free
 * blocks count wrong (7, counted=14239). Fix? no"), which a writer must still get right. With its
 * own config it also reports directory entries without a file type, which `-n` otherwise passes
 * over in silence (problem 0x020027).
 */
export async function fsckImage(image: string): Promise<FsckResult> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "kiln-e2fsck-"));
  try {
    const config = path.join(dir, "e2fsck.conf");
    await fs.writeFile(config, "[problems]\n\t0x020027 = {\n\t\tno_nomsg = false\n\t}\n");
    const r = await runTool(e2fsprogsBinary("e2fsck"), ["-fn", image], { E2FSCK_CONFIG: config });
    const output = `${r.stdout.toString("utf8")}${r.stderr}`;
    const declined = /(?<!Optimize)\? no$/m.test(output);
    const unsetFileType = /^Setting filetype for /m.test(output);
    return { clean: r.code === 0 && !declined && !unsetFileType, exitCode: r.code, output };
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

/**
 * Runs `fn` with the image mounted read-only (a loop device, no journal replay) at a temporary
 * directory: the kernel's own ext4 driver reading what the writer made. Needs root.
 */
export async function withMountedImage<T>(image: string, fn: (dir: string) => Promise<T> | T): Promise<T> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "kiln-ext4-mount-"));
  try {
    await runChecked("mount", ["-t", "ext4", "-o", "loop,ro,noload", image, dir]);
    try {
      return await fn(dir);
    } finally {
      await runChecked("umount", [dir]);
    }
  } finally {
    await fs.rmdir(dir);
  }
}

async function runChecked(cmd: string, args: string[]): Promise<void> {
  const r = await runTool(cmd, args, {});
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")} failed (${r.code}): ${r.stderr}`);
}

function parseListing(section: string, image: string, rel: string): Entry[] {
  const entries: Entry[] = [];
  for (const m of section.matchAll(LS_ENTRY)) {
    const ino = Number(m[1]);
    // Unused slots (inode 0), such as the empty blocks mke2fs reserves in lost+found.
    if (ino === 0) continue;
    const name = Buffer.from(m[5]!, "latin1").toString("utf8");
    const mode = Number.parseInt(m[2]!, 8);
    const type = TYPES.get(mode & S_IFMT);
    if (!type) throw new Error(`${image}: ${rel}/${name} has mode ${m[2]}, which is no file type`);
    entries.push({ name, ino, type, mode, uid: Number(m[3]) >>> 0, gid: Number(m[4]) >>> 0 });
  }
  const rest = section.replace(LS_ENTRY, "");
  if (rest.trim() !== "") {
    throw new Error(`${image}: unexpected output listing ${rel}: ${JSON.stringify(rest.slice(0, 300))}`);
  }
  return entries;
}

function parseStat(section: string, image: string, ino: number): InodeInfo {
  const field = (re: RegExp): string => {
    const m = re.exec(section);
    if (!m) throw new Error(`${image}: no ${re.source} in debugfs stat <${ino}>: ${section.slice(0, 500)}`);
    return m[1]!;
  };
  if (Number(field(/^Inode: (\d+) /m)) !== ino)
    throw new Error(`${image}: debugfs stat <${ino}> is out of step`);
  const type = STAT_TYPES.get(field(/Type: (.+?) {2,}Mode:/));
  if (!type) throw new Error(`${image}: inode ${ino} has no valid type: ${section.slice(0, 200)}`);
  const size = Number(field(/^User:.* Size: (\d+)$/m));

  // Large inodes show "0x<i_mtime>:<i_mtime_extra>" once the extra fields reach the creation time
  // (i_extra_isize >= 24); Linux already reads i_mtime_extra from i_extra_isize >= 12.
  const m = /^ ?mtime: 0x([0-9a-f]{8})(?::([0-9a-f]{8}))? -- /m.exec(section);
  if (!m) throw new Error(`${image}: no mtime in debugfs stat <${ino}>: ${section.slice(0, 500)}`);
  const extraIsize = /^Size of extra inode fields: (\d+)$/m.exec(section);
  if (m[2] === undefined && extraIsize && Number(extraIsize[1]) >= 12) {
    throw new Error(
      `${image}: inode ${ino} has i_extra_isize ${extraIsize[1]}: Linux reads its mtime nanoseconds, debugfs does not show them`,
    );
  }
  const info: InodeInfo = { type, size, mtimeMs: Number(decodeTime(m[1]!, m[2]) / 1_000_000n) };

  if (type === "symlink") {
    const marker = 'Fast link dest: "';
    const at = section.indexOf(marker);
    const flags = Number.parseInt(field(/Flags: 0x([0-9a-f]+)/), 16);
    const fileAcl = Number(field(/^File ACL: (\d+)/m));
    const blocks = Number(field(/Blockcount: (\d+)/));
    // Linux reads the target from the inode when it has no data blocks (ext4_inode_is_fast_symlink),
    // debugfs when it is under 60 bytes. A short target in a block is slow to Linux: read it with
    // cat. With an xattr block, whose sectors would count too, debugfs's view is taken.
    const fast = (flags & EXT4_INLINE_DATA_FL) !== 0 || (fileAcl === 0 ? blocks === 0 : at >= 0);
    if (fast) {
      if (at < 0 || !section.endsWith('"\n')) {
        throw new Error(
          `${image}: symlink inode ${ino} (size ${size}) has no data blocks and no target debugfs shows`,
        );
      }
      const bytes = Buffer.from(section.slice(at + marker.length, -2), "latin1");
      if (bytes.length !== size) {
        throw new Error(`${image}: symlink inode ${ino} has size ${size} but a ${bytes.length}-byte target`);
      }
      info.target = bytes.toString("utf8");
    }
  }
  return info;
}

/** An ext4 timestamp in ns as Linux decodes it (ext4_decode_extra_time). */
function decodeTime(lowHex: string, extraHex: string | undefined): bigint {
  let sec = BigInt(Number.parseInt(lowHex, 16) | 0);
  let nsec = 0n;
  if (extraHex !== undefined) {
    const extra = Number.parseInt(extraHex, 16);
    sec += BigInt(extra & 3) << 32n;
    nsec = BigInt(extra >>> 2);
  }
  return sec * 1_000_000_000n + nsec;
}

/** Each command's output, split on debugfs's echo of the commands (`debugfs: <command>`). */
async function debugfsSections(image: string, commands: string[]): Promise<string[]> {
  const r = await runDebugfs(image, commands);
  const out = r.stdout.toString("latin1");
  const sections: string[] = [];
  let pos = 0;
  for (let i = 0; i < commands.length; i++) {
    const echo = `debugfs: ${commands[i]}\n`;
    if (!out.startsWith(echo, pos)) {
      throw new Error(
        `${image}: debugfs output out of step at "${commands[i]}": ${JSON.stringify(out.slice(pos, pos + 300))}`,
      );
    }
    pos += echo.length;
    const end = i + 1 < commands.length ? out.indexOf(`debugfs: ${commands[i + 1]}\n`, pos) : out.length;
    if (end < 0) throw new Error(`${image}: debugfs stopped before "${commands[i + 1]}"`);
    sections.push(out.slice(pos, end));
    pos = end;
  }
  return sections;
}

/**
 * `cat <ino>` for each inode in one debugfs process. Its output is exactly, per inode, the echo
 * `debugfs: cat <ino>\n` and then `size` bytes; anything else fails.
 */
async function catInodes(
  image: string,
  items: Array<{ ino: number; size: number; keep: boolean }>,
): Promise<Map<number, { sha256: string; data?: Buffer }>> {
  const results = new Map<number, { sha256: string; data?: Buffer }>();
  if (items.length === 0) return results;
  let index = 0;
  let header = Buffer.from(`debugfs: cat <${items[0]!.ino}>\n`);
  let headerAt = 0;
  let remaining = -1; // -1: in the header
  let hash: Hash = createHash("sha256");
  let parts: Buffer[] = [];
  let failure: string | undefined;
  const finish = () => {
    const item = items[index]!;
    results.set(item.ino, { sha256: hash.digest("hex"), data: item.keep ? Buffer.concat(parts) : undefined });
    index++;
    if (index < items.length) header = Buffer.from(`debugfs: cat <${items[index]!.ino}>\n`);
    headerAt = 0;
    remaining = -1;
  };
  const onData = (chunk: Buffer): boolean => {
    let off = 0;
    while (off < chunk.length) {
      if (index >= items.length) {
        failure = `output after the last file: ${JSON.stringify(chunk.subarray(off, off + 200).toString("latin1"))}`;
        return false;
      }
      if (remaining < 0) {
        const n = Math.min(header.length - headerAt, chunk.length - off);
        if (!chunk.subarray(off, off + n).equals(header.subarray(headerAt, headerAt + n))) {
          failure = `expected "${header.toString().trim()}" after ${index} files, got ${JSON.stringify(chunk.subarray(off, off + 200).toString("latin1"))}`;
          return false;
        }
        headerAt += n;
        off += n;
        if (headerAt === header.length) {
          remaining = items[index]!.size;
          hash = createHash("sha256");
          parts = [];
          if (remaining === 0) finish();
        }
      } else {
        const piece = chunk.subarray(off, off + Math.min(remaining, chunk.length - off));
        hash.update(piece);
        if (items[index]!.keep) parts.push(Buffer.from(piece));
        remaining -= piece.length;
        off += piece.length;
        if (remaining === 0) finish();
      }
    }
    return true;
  };
  await runDebugfs(
    image,
    items.map((i) => `cat <${i.ino}>`),
    onData,
  );
  if (failure) throw new Error(`${image}: debugfs cat: ${failure}`);
  if (index < items.length) {
    throw new Error(
      `${image}: debugfs cat stopped in inode ${items[index]!.ino} (${index} of ${items.length} read)`,
    );
  }
  return results;
}

/**
 * debugfs, read-only, with the commands on stdin (`-f -`). Fails on anything on stderr but its
 * version banner: debugfs reports a failed command there and carries on with the next.
 * `onStdout` returning false stops it early.
 */
async function runDebugfs(
  image: string,
  commands: string[],
  onStdout?: (chunk: Buffer) => boolean,
): Promise<{ stdout: Buffer }> {
  const r = await runTool(
    e2fsprogsBinary("debugfs"),
    ["-f", "-", image],
    {},
    `${commands.join("\n")}\n`,
    onStdout,
  );
  const stderr = r.stderr.replace(/^debugfs \d[^\n]*\n/, "");
  if (r.code !== 0 || stderr.trim() !== "") {
    if (r.stopped) return r; // the caller has its own reason
    throw new Error(`debugfs on ${image} failed (exit ${r.code ?? r.signal}): ${stderr.trim()}`);
  }
  return r;
}

interface ToolResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: Buffer;
  stderr: string;
  /** onStdout asked to stop and the tool was killed. */
  stopped: boolean;
}

function runTool(
  file: string,
  args: string[],
  env: NodeJS.ProcessEnv,
  input?: string,
  onStdout?: (chunk: Buffer) => boolean,
): Promise<ToolResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, {
      stdio: ["pipe", "pipe", "pipe"],
      env: { ...process.env, LC_ALL: "C", DEBUGFS_PAGER: "__none__", ...env },
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let stopped = false;
    child.stdout.on("data", (chunk: Buffer) => {
      if (stopped) return;
      if (!onStdout) out.push(chunk);
      else if (!onStdout(chunk)) {
        stopped = true;
        child.kill("SIGKILL");
      }
    });
    child.stderr.on("data", (chunk: Buffer) => err.push(chunk));
    child.stdin.on("error", () => {}); // EPIPE when it exits early: its exit status tells
    child.on("error", (e: NodeJS.ErrnoException) =>
      reject(
        e.code === "ENOENT"
          ? new Error(`${file} is not installed: install the e2fsprogs package`, { cause: e })
          : e,
      ),
    );
    child.on("close", (code, signal) =>
      resolve({
        code,
        signal,
        stdout: Buffer.concat(out),
        stderr: Buffer.concat(err).toString("utf8"),
        stopped,
      }),
    );
    child.stdin.end(input ?? "");
  });
}

function e2fsprogsBinary(name: string): string {
  // /usr/sbin is not on every PATH.
  return [`/usr/sbin/${name}`, `/sbin/${name}`].find((p) => existsSync(p)) ?? name;
}
