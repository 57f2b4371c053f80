import fs from "node:fs";
import path from "node:path";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, describe, expect, it } from "vitest";
import { readConsole, trimConsoleLog } from "./console.js";

let dir: ReturnType<typeof tempDir>;
afterEach(() => dir?.remove());

const collect = async (it: AsyncIterable<string>) => {
  const out: string[] = [];
  for await (const l of it) out.push(l);
  return out;
};

describe("console log", () => {
  it("returns the last lines, or all", async () => {
    dir = tempDir();
    const f = path.join(dir.path, "console.log");
    fs.writeFileSync(f, "a\nb\r\nc\nd\npartial");
    const running = async () => false;
    expect(await collect(readConsole(f, { tailLines: 2, follow: false, stillRunning: running }))).toEqual([
      "c",
      "d",
      "partial",
    ]);
    expect(await collect(readConsole(f, { tailLines: 0, follow: false, stillRunning: running }))).toEqual([
      "a",
      "b",
      "c",
      "d",
      "partial",
    ]);
  });

  it("follows new lines until the VM stops", async () => {
    dir = tempDir();
    const f = path.join(dir.path, "console.log");
    fs.writeFileSync(f, "boot\n");
    let running = true;
    const lines = collect(
      readConsole(f, { tailLines: 0, follow: true, pollMs: 20, stillRunning: async () => running }),
    );
    await new Promise((r) => setTimeout(r, 50));
    fs.appendFileSync(f, "httpd started\n");
    await new Promise((r) => setTimeout(r, 50));
    fs.appendFileSync(f, "bye\n");
    running = false;
    expect(await lines).toEqual(["boot", "httpd started", "bye"]);
  });

  it("stops following when the caller goes away", async () => {
    dir = tempDir();
    const f = path.join(dir.path, "console.log");
    const abort = new AbortController();
    const lines = collect(
      readConsole(f, {
        tailLines: 0,
        follow: true,
        pollMs: 20,
        signal: abort.signal,
        stillRunning: async () => true,
      }),
    );
    setTimeout(() => abort.abort(), 60);
    expect(await lines).toEqual([]);
  });

  it("trims a file past its bound to the newest half, at a line boundary", async () => {
    dir = tempDir();
    const f = path.join(dir.path, "console.log");
    const lines = Array.from({ length: 1000 }, (_, i) => `line ${i}`);
    fs.writeFileSync(f, `${lines.join("\n")}\n`);
    expect(await trimConsoleLog(f, 4096)).toBe(true);
    const kept = fs.readFileSync(f, "utf8").split("\n");
    expect(fs.statSync(f).size).toBeLessThan(2200);
    expect(kept[0]).toMatch(/^\[kiln: console trimmed/);
    expect(kept[1]).toMatch(/^line \d+$/);
    expect(kept.at(-2)).toBe("line 999");
    expect(await trimConsoleLog(f, 4096)).toBe(false);
    expect(await trimConsoleLog(path.join(dir.path, "missing"), 10)).toBe(false);
  });
});
