import { describe, expect, it } from "vitest";
import { createKeyedLock } from "./keyed-lock.js";

describe("keyed lock", () => {
  it("runs one operation at a time per key, also after a failure, and keys apart in parallel", async () => {
    const lock = createKeyedLock();
    const log: string[] = [];
    let release!: () => void;
    const gate = new Promise<void>((r) => {
      release = r;
    });
    const a1 = lock("a", async () => {
      log.push("a1 start");
      await gate;
      log.push("a1 end");
      throw new Error("a1 failed");
    });
    const a2 = lock("a", async () => {
      log.push("a2");
      return 2;
    });
    const b = lock("b", async () => {
      log.push("b");
      return "b";
    });
    expect(await b).toBe("b"); // not held up by a
    expect(log).toEqual(["a1 start", "b"]);
    release();
    await expect(a1).rejects.toThrow("a1 failed");
    expect(await a2).toBe(2);
    expect(log).toEqual(["a1 start", "b", "a1 end", "a2"]);
  });
});
