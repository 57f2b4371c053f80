import fs from "node:fs/promises";
import path from "node:path";
import { sharedSpawner } from "@kiln/kit";

/** Runs a tool through the spawn helper (no fork of the service); stdout, or throws on failure. */
async function tool(cmd: string, args: string[]): Promise<string> {
  const r = await sharedSpawner().run(cmd, args, { maxBuffer: 16 << 20 });
  if (r.code !== 0) {
    throw Object.assign(new Error(`${cmd} failed: ${r.startError?.message ?? r.stderr.trim()}`), {
      code: r.startError?.code,
    });
  }
  return r.stdout;
}

/**
 * Runs `strip --strip-debug` over the rootfs' ELF files. Conservative by design: only regular
 * files with one link and no setuid/setgid bit, never files with file capabilities (a rewrite
 * would drop the security.capability xattr); owner, mode and times are restored. Without `strip`
 * or `getcap` on the host it does nothing (and says so in `skipped`).
 */
export async function stripDebugSymbols(
  root: string,
  isExcluded: (rel: string) => boolean,
): Promise<{ files: number; bytesSaved: number; skipped?: string }> {
  if (!(await hasTool("strip", ["--version"])) || !(await hasTool("getcap", ["-v"]))) {
    return { files: 0, bytesSaved: 0, skipped: "strip (binutils) or getcap (libcap2-bin) is not installed" };
  }
  const candidates: string[] = [];
  const walk = async (dirAbs: string, dirRel: string): Promise<void> => {
    for (const name of await fs.readdir(dirAbs)) {
      const rel = dirRel === "" ? name : `${dirRel}/${name}`;
      if (isExcluded(rel)) continue;
      const abs = path.join(dirAbs, name);
      const st = await fs.lstat(abs);
      if (st.isDirectory()) await walk(abs, rel);
      else if (
        st.isFile() &&
        st.nlink === 1 &&
        (st.mode & 0o6000) === 0 &&
        st.size > 64 &&
        (await isElf(abs))
      ) {
        candidates.push(abs);
      }
    }
  };
  await walk(root, "");

  const withCaps = new Set<string>();
  for (let i = 0; i < candidates.length; i += 200) {
    const batch = candidates.slice(i, i + 200);
    const stdout = await tool("getcap", batch).catch(() => "");
    for (const line of stdout.split("\n")) {
      const file = batch.find((f) => line.startsWith(`${f} `));
      if (file) withCaps.add(file);
    }
  }

  let files = 0;
  let bytesSaved = 0;
  for (const file of candidates) {
    if (withCaps.has(file)) continue;
    const before = await fs.lstat(file);
    const tmp = `${file}.kiln-strip`;
    try {
      await tool("strip", ["--strip-debug", "-o", tmp, file]);
      const after = await fs.stat(tmp);
      if (after.size >= before.size) continue;
      await fs.chown(tmp, before.uid, before.gid);
      await fs.chmod(tmp, before.mode & 0o7777);
      await fs.utimes(tmp, before.atime, before.mtime);
      await fs.rename(tmp, file);
      files++;
      bytesSaved += before.size - after.size;
    } catch {
      // Not every ELF file is strippable (odd sections, firmware blobs); leave it as it was.
    } finally {
      await fs.rm(tmp, { force: true });
    }
  }
  return { files, bytesSaved };
}

async function isElf(file: string): Promise<boolean> {
  const fh = await fs.open(file, "r");
  try {
    const b = Buffer.alloc(4);
    await fh.read(b, 0, 4, 0);
    return b.readUInt32BE(0) === 0x7f454c46;
  } finally {
    await fh.close();
  }
}

async function hasTool(cmd: string, args: string[]): Promise<boolean> {
  return tool(cmd, args).then(
    () => true,
    (err: NodeJS.ErrnoException) => err.code !== "ENOENT",
  );
}
