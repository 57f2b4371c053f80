import { statSync } from "node:fs";
import fs from "node:fs/promises";
import path from "node:path";
import { FailedPreconditionError, InvalidArgumentError } from "@kiln/kit";

/**
 * How backends place VM processes into the cgroup metald prepared (`VmSpec.cgroupParent`, a
 * cgroup v1 path present under each controller). metald's cgroup code creates, limits and removes
 * that cgroup; backends only join it (QEMU), or let their runtime make a child of it (runc, runsc,
 * the jailer) and remove what the runtime made.
 */

/**
 * The mount points of the host's cgroup hierarchies: v1 (one per controller group, plus
 * name=systemd) and, on a hybrid host, the unified v2 one, where runtimes create paths as well.
 */
export async function cgroupHierarchies(): Promise<string[]> {
  const text = await fs.readFile("/proc/self/mountinfo", "utf8");
  const out: string[] = [];
  for (const line of text.split("\n")) {
    const [pre, post] = line.split(" - ");
    if (!pre || !post) continue;
    const fstype = post.split(" ")[0];
    if (fstype !== "cgroup" && fstype !== "cgroup2") continue;
    const mountPoint = pre.split(" ")[4];
    if (mountPoint) out.push(mountPoint);
  }
  return out;
}

/** Checks a cgroup path from the spec: relative, no `..`, nothing odd. Returns it without slashes at the ends. */
export function normalizeCgroupPath(p: string, field = "cgroupParent"): string {
  const trimmed = p.replace(/^\/+|\/+$/g, "");
  if (
    trimmed === "" ||
    trimmed.split("/").some((s) => s === "" || s === "." || s === "..") ||
    /[\0\n]/.test(p)
  ) {
    throw new InvalidArgumentError(
      `${field} ${JSON.stringify(p)} must be a cgroup path such as kiln/acme/vm_123`,
      {
        field,
      },
    );
  }
  return trimmed;
}

/**
 * Directories a runtime would create for cgroup `rel` that do not exist yet (in every hierarchy),
 * so they can be removed again after the runtime removed its leaf: runc creates the whole path
 * in every hierarchy (devices, cpuset, name=systemd, …) but removes only the leaf.
 */
export async function missingCgroupDirs(rel: string): Promise<string[]> {
  const parts = normalizeCgroupPath(rel).split("/");
  const missing: string[] = [];
  // Synchronous: ~40 stats of cgroupfs take microseconds each, and one thread-pool round trip
  // apiece (in a row) had cost BootVm ~2 ms.
  for (const root of await cgroupHierarchies()) {
    for (let i = 1; i <= parts.length; i++) {
      const dir = path.join(root, ...parts.slice(0, i));
      if (!statSync(dir, { throwIfNoEntry: false })?.isDirectory()) missing.push(dir);
    }
  }
  return missing;
}

/** Removes cgroup directories, deepest first; non-empty or busy ones (still used) are left alone. */
export async function removeCgroupDirs(dirs: readonly string[]): Promise<void> {
  const sorted = [...new Set(dirs)].sort((a, b) => b.split("/").length - a.split("/").length);
  for (const d of sorted) {
    await fs.rmdir(d).catch(() => undefined);
  }
}

/**
 * Moves a process into cgroup `rel` in every hierarchy where metald created it. Throws when it
 * exists in none: the VM would run unlimited and unmetered.
 */
export async function joinCgroup(rel: string, pid: number): Promise<string[]> {
  const normalized = normalizeCgroupPath(rel);
  const joined: string[] = [];
  for (const root of await cgroupHierarchies()) {
    const dir = path.join(root, normalized);
    const exists = await fs.stat(dir).then(
      (s) => s.isDirectory(),
      () => false,
    );
    if (!exists) continue;
    await fs.writeFile(path.join(dir, "cgroup.procs"), `${pid}\n`);
    joined.push(dir);
  }
  if (joined.length === 0) {
    throw new FailedPreconditionError(
      `cgroup ${normalized} does not exist under any cgroup v1 hierarchy; metald must create it before boot`,
    );
  }
  return joined;
}
