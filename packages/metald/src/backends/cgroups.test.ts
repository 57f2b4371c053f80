import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { FailedPreconditionError, InvalidArgumentError } from "@kiln/kit";
import { afterEach, describe, expect, it } from "vitest";
import { createTestCgroup, type TestCgroup } from "./backend.suite.js";
import {
  cgroupHierarchies,
  joinCgroup,
  missingCgroupDirs,
  normalizeCgroupPath,
  removeCgroupDirs,
} from "./cgroups.js";

const cleanups: Array<() => void> = [];
afterEach(() => {
  for (const c of cleanups.splice(0).reverse()) c();
});

function cgroup(): TestCgroup {
  const c = createTestCgroup();
  cleanups.push(() => c.remove());
  return c;
}

describe("cgroup paths", () => {
  it("normalises relative paths and refuses escapes", () => {
    expect(normalizeCgroupPath("/kiln/acme/vm_1/")).toBe("kiln/acme/vm_1");
    for (const bad of ["", "/", "kiln/../etc", "kiln//x", "./x"]) {
      expect(() => normalizeCgroupPath(bad)).toThrow(InvalidArgumentError);
    }
  });

  it("finds the v1 hierarchies and the unified one", async () => {
    const roots = await cgroupHierarchies();
    expect(roots).toContain("/sys/fs/cgroup/memory");
    expect(roots).toContain("/sys/fs/cgroup/cpuacct");
  });
});

describe("what a runtime creates below metald's cgroup", () => {
  it("lists the directories missing in every hierarchy and removes only those, once empty", async () => {
    const c = cgroup();
    const missing = await missingCgroupDirs(`${c.rel}/runc`);
    // metald made the parent in six controllers: there only the leaf is missing; elsewhere both.
    expect(missing).toContain(path.join("/sys/fs/cgroup/memory", c.rel, "runc"));
    expect(missing).not.toContain(path.join("/sys/fs/cgroup/memory", c.rel));
    expect(missing).toContain(path.join("/sys/fs/cgroup/devices", c.rel));
    for (const d of missing) fs.mkdirSync(d, { recursive: true });
    await removeCgroupDirs(missing);
    for (const d of missing) expect(fs.existsSync(d), d).toBe(false);
    for (const d of c.dirs) expect(fs.existsSync(d), d).toBe(true);
  });
});

describe("joinCgroup", () => {
  it("moves a process into metald's cgroup wherever it exists", async () => {
    const c = cgroup();
    const child = spawn("sleep", ["30"], { stdio: "ignore" });
    cleanups.push(() => child.kill("SIGKILL"));
    await new Promise((r) => child.once("spawn", r));
    const joined = await joinCgroup(c.rel, child.pid!);
    expect(joined.sort()).toEqual([...c.dirs].sort());
    const own = fs.readFileSync(`/proc/${child.pid}/cgroup`, "utf8");
    expect(own).toMatch(new RegExp(`:memory:/${c.rel}$`, "m"));
    child.kill("SIGKILL");
    await new Promise((r) => child.once("exit", r));
  });

  it("refuses a cgroup that does not exist anywhere", async () => {
    await expect(joinCgroup("kiln-no-such-cgroup", process.pid)).rejects.toBeInstanceOf(
      FailedPreconditionError,
    );
  });
});
