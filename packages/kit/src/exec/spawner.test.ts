import fs from "node:fs";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { tempDir } from "../testing/index.js";
import { createSpawner, SpawnError } from "./spawner.js";

describe("spawner", () => {
  const spawner = createSpawner();
  const work = tempDir("kiln-spawner-");
  afterAll(async () => {
    await spawner.close();
    work.remove();
  });

  it("runs a command with arguments, stdin, cwd and env, and returns its output and exit code", async () => {
    const r = await spawner.run(
      "sh",
      ["-c", 'read line; echo "$line $1 $GREETING $(pwd)"; echo oops >&2; exit 3', "sh", "arg with 'quotes'"],
      { input: "from stdin\n", cwd: work.path, env: { PATH: process.env.PATH, GREETING: "hi" } },
    );
    expect(r).toEqual({
      code: 3,
      signal: null,
      stdout: `from stdin arg with 'quotes' hi ${fs.realpathSync(work.path)}\n`,
      stderr: "oops\n",
      timedOut: false,
    });
  });

  it("runs commands concurrently", async () => {
    // The first finishes only once the second has run: one at a time, it would time out.
    const flag = path.join(work.path, "flag");
    const waiter = spawner.run("sh", ["-c", `while [ ! -e ${flag} ]; do sleep 0.01; done; echo waited`], {
      timeoutMs: 10_000,
    });
    expect((await spawner.run("touch", [flag])).code).toBe(0);
    expect(await waiter).toMatchObject({ code: 0, stdout: "waited\n" });
  });

  it("kills a command past its timeout and says so", async () => {
    const r = await spawner.run("sleep", ["10"], { timeoutMs: 100 });
    expect(r).toMatchObject({ code: null, signal: "SIGKILL", timedOut: true });
  });

  it("kills a command when its caller aborts, and rejects with the reason", async () => {
    const pidFile = path.join(work.path, "aborted.pid");
    const ac = new AbortController();
    const running = spawner.run("sh", ["-c", `echo $$ > ${pidFile}; exec sleep 30`], { signal: ac.signal });
    while (!fs.existsSync(pidFile) || !fs.readFileSync(pidFile, "utf8").trim()) {
      await new Promise((r) => setTimeout(r, 10));
    }
    const pid = Number(fs.readFileSync(pidFile, "utf8"));
    ac.abort(new Error("build cancelled"));
    await expect(running).rejects.toThrow("build cancelled");
    expect(() => process.kill(pid, 0)).toThrow(/ESRCH/); // gone, and reaped by the helper
    await expect(spawner.run("true", [], { signal: ac.signal })).rejects.toThrow("build cancelled");
  });

  it("kills a command whose output exceeds maxBuffer", async () => {
    const r = await spawner.run("head", ["-c", "100000", "/dev/zero"], { maxBuffer: 1000 });
    expect(r.timedOut).toBe(true);
    expect(r.stderr).toMatch(/exceeded 1000 bytes/);
  });

  it("reports a program that cannot start", async () => {
    const r = await spawner.run("/nonexistent/kiln-no-such-binary", []);
    expect(r.startError?.code).toBe("ENOENT");
    await expect(
      spawner.spawnDetached("/nonexistent/kiln-no-such-binary", [], {
        logFile: path.join(work.path, "x.log"),
      }),
    ).rejects.toThrow(SpawnError);
  });

  it("starts a detached process in its own session with output appended to a log, and reports its exit", async () => {
    const log = path.join(work.path, "detached.log");
    fs.writeFileSync(log, "before\n");
    const p = await spawner.spawnDetached("sh", ["-c", "echo out; echo err >&2; ps -o sid= -p $$; exit 7"], {
      logFile: log,
    });
    expect(p.pid).toBeGreaterThan(0);
    expect(await p.exited).toEqual({ code: 7, signal: null });
    const [before, out, err, sid] = fs.readFileSync(log, "utf8").trim().split("\n");
    expect([before, out, err]).toEqual(["before", "out", "err"]);
    expect(Number(sid)).toBe(p.pid); // session leader: setsid
  });

  it("keeps the helper through signals sent to the whole process group (Ctrl-C)", async () => {
    const helperPid = Number((await spawner.run("sh", ["-c", "echo $PPID"])).stdout.trim());
    process.kill(helperPid, "SIGINT");
    process.kill(helperPid, "SIGTERM");
    await new Promise((r) => setTimeout(r, 100));
    expect(Number((await spawner.run("sh", ["-c", "echo $PPID"])).stdout.trim())).toBe(helperPid);
  });

  it("answers commands under way when the helper dies, and starts a new helper for the next", async () => {
    const other = createSpawner();
    try {
      const slow = other.run("sleep", ["5"]);
      const helperPid = Number(
        (await other.run("sh", ["-c", "echo $PPID"])).stdout.trim(), // the helper is sh's parent
      );
      process.kill(helperPid, "SIGKILL");
      const r = await slow;
      expect(r.startError?.code).toBe("EHELPER");
      expect((await other.run("echo", ["again"])).stdout).toBe("again\n");
    } finally {
      await other.close();
    }
  });
});
