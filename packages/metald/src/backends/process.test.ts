import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, describe, expect, it } from "vitest";
import {
  identify,
  isAlive,
  killAndWait,
  parseProcStat,
  processStartTime,
  readProcessRecord,
  spawnDetached,
  waitForExit,
  writeProcessRecord,
} from "./process.js";

const cleanups: Array<() => void> = [];
afterEach(() => {
  for (const c of cleanups.splice(0)) c();
});

function dir(): string {
  const d = tempDir("kiln-proc-");
  cleanups.push(() => d.remove());
  return d.path;
}

describe("process identity", () => {
  it("parses /proc/<pid>/stat even when the command name has spaces and parentheses", () => {
    const fields = Array.from({ length: 50 }, (_, i) => String(i + 3));
    fields[0] = "S"; // state (field 3)
    const st = parseProcStat(`4242 (qemu (x) ) y) ${fields.join(" ")}`);
    expect(st.state).toBe("S");
    expect(st.ppid).toBe(4);
    expect(st.utimeTicks).toBe(14);
    expect(st.stimeTicks).toBe(15);
    expect(st.startTime).toBe(22);
    expect(st.rssPages).toBe(24);
  });

  it("tells a live process from a dead one, and from a reused pid", async () => {
    const me = await identify(process.pid);
    expect(await isAlive(me)).toBe(true);
    expect(await isAlive({ pid: process.pid, startTime: me.startTime + 1 })).toBe(false);
    expect(await isAlive({ pid: 0x3fffffff, startTime: 1 })).toBe(false);
    expect(await processStartTime(-1)).toBeUndefined();
  });

  it("waits for exit and kills by identity", async () => {
    const child = spawn("sleep", ["60"], { stdio: "ignore" });
    await new Promise((r) => child.once("spawn", r));
    const id = await identify(child.pid!);
    cleanups.push(() => child.kill("SIGKILL"));
    expect(await waitForExit(id, 100)).toBe(false);
    await killAndWait(id);
    expect(await isAlive(id)).toBe(false);
    expect(await waitForExit(id, 100)).toBe(true);
  });

  it("keeps a process record across restarts, and reads nothing from a torn one", async () => {
    const d = dir();
    const file = path.join(d, "process.json");
    expect(await readProcessRecord(file)).toBeUndefined();
    await writeProcessRecord(file, { pid: 12, startTime: 34 });
    expect(await readProcessRecord(file)).toEqual({ pid: 12, startTime: 34 });
    fs.writeFileSync(file, '{"pid": 12');
    expect(await readProcessRecord(file)).toBeUndefined();
  });
});

describe("spawnDetached", () => {
  it("starts the process in its own session, appending its output to the log", async () => {
    const d = dir();
    const log = path.join(d, "logs/console.log");
    fs.mkdirSync(path.dirname(log));
    fs.writeFileSync(log, "earlier boot\n");
    const { pid, exited } = await spawnDetached("/bin/sh", ["-c", "echo out; echo err >&2; sleep 0.2"], {
      logFile: log,
    });
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    expect(Number(fields[3]), "session id is its own pid").toBe(pid);
    expect((await exited).code).toBe(0);
    expect(fs.readFileSync(log, "utf8")).toBe("earlier boot\nout\nerr\n");
  });

  it("says which binary could not be started", async () => {
    await expect(
      spawnDetached("/nonexistent/qemu", [], { logFile: path.join(dir(), "log") }),
    ).rejects.toThrow("/nonexistent/qemu");
  });
});
