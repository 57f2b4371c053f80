import { once } from "node:events";
import { describe, expect, it } from "vitest";
import { EXTRACTION_INITIAL_OLD_SPACE_MB, startExtractionWorker } from "./worker-heap.js";

const SET = `--initial-old-space-size=${EXTRACTION_INITIAL_OLD_SPACE_MB}`;
const RESET = "--initial-old-space-size=0";
const OK = `require("node:worker_threads").parentPort.postMessage("up")`;

/** Records the V8 flags the function sets, in order. */
function recorder() {
  const calls: string[] = [];
  return { calls, setFlags: (f: string) => void calls.push(f) };
}

describe("startExtractionWorker", () => {
  it("sets the heap flag while the worker's isolate is made and puts it back once it is online", async () => {
    const { calls, setFlags } = recorder();
    const w = startExtractionWorker(OK, { eval: true }, setFlags, []);
    expect(calls).toEqual([SET]);
    const [msg] = await once(w, "message");
    expect(msg).toBe("up");
    expect(calls).toEqual([SET, RESET]);
    await w.terminate();
  });

  it("keeps the flag set until every worker started together is online, and puts it back once", async () => {
    const { calls, setFlags } = recorder();
    const a = startExtractionWorker(OK, { eval: true }, setFlags, []);
    const b = startExtractionWorker(OK, { eval: true }, setFlags, []);
    await Promise.all([once(a, "online"), once(b, "online")]);
    expect(calls).toEqual([SET, RESET]);
    await Promise.all([a.terminate(), b.terminate()]);
    expect(calls).toEqual([SET, RESET]);
  });

  it("puts the flag back when a worker fails to start", async () => {
    const { calls, setFlags } = recorder();
    const w = startExtractionWorker("this is not javascript(", { eval: true }, setFlags, []);
    const [err] = await once(w, "error");
    expect(err).toBeInstanceOf(SyntaxError);
    expect(calls).toEqual([SET, RESET]);
    expect(() => startExtractionWorker(OK, { eval: true, env: 42 as never }, setFlags, [])).toThrow();
    expect(calls).toEqual([SET, RESET, SET, RESET]);
  });

  it("leaves an operator's own --initial-old-space-size alone", async () => {
    const { calls, setFlags } = recorder();
    const w = startExtractionWorker(OK, { eval: true }, setFlags, ["--initial-old-space-size=512"]);
    await once(w, "message");
    expect(calls).toEqual([]);
    await w.terminate();
  });
});
