import { describe, expect, it } from "vitest";
import { newId, randomIdChars } from "./ids.js";

describe("newId", () => {
  it("is prefix, 10 time characters and 16 random ones, sorting by time", async () => {
    const a = newId("vm");
    await new Promise((r) => setTimeout(r, 2));
    const b = newId("vm");
    expect(a).toMatch(/^vm_[0-9a-hjkmnp-tv-z]{26}$/);
    expect(a < b).toBe(true);
    expect(a.slice(-16)).not.toBe(b.slice(-16));
  });

  it("ends with a given tail, and refuses one that is too long or off the alphabet", () => {
    const tail = randomIdChars(12);
    expect(tail).toMatch(/^[0-9a-hjkmnp-tv-z]{12}$/);
    const id = newId("vm", tail);
    expect(id).toMatch(/^vm_[0-9a-z]{26}$/);
    expect(id.endsWith(tail)).toBe(true);
    expect(() => newId("vm", "x".repeat(17))).toThrow(/at most 16 characters/);
    expect(() => newId("vm", "ABC")).toThrow(/at most 16 characters/);
    expect(() => newId("vm", "il0")).toThrow(/at most 16 characters/);
  });
});
