import { describe, expect, it } from "vitest";
import { canDo, InvalidTransitionError, transition, VM_STATES, type VmVerb } from "./lifecycle.js";

describe("VM lifecycle table", () => {
  it.each([
    ["created", "boot", "running"],
    ["shutdown", "boot", "running"],
    ["failed", "boot", "running"],
    ["running", "pause", "paused"],
    ["paused", "resume", "running"],
    ["running", "reboot", "running"],
    ["running", "shutdown", "shutdown"],
    ["paused", "shutdown", "shutdown"],
  ] as const)("%s --%s--> %s", (from, verb, to) => {
    expect(transition("vm_1", from, verb)).toBe(to);
  });

  it("refuses pause before boot, naming the current state and what the verb needs", () => {
    expect(() => transition("vm_1", "created", "pause")).toThrow(
      "cannot pause VM vm_1: it is CREATED (pause needs RUNNING)",
    );
    expect(() => transition("vm_1", "created", "pause")).toThrow(InvalidTransitionError);
  });

  it.each([
    ["running", "boot"],
    ["paused", "pause"],
    ["running", "resume"],
    ["paused", "reboot"],
    ["shutdown", "shutdown"],
    ["created", "shutdown"],
  ] as const)("refuses %s on a %s VM", (state, verb) => {
    expect(canDo(state, verb)).toBe(false);
    expect(() => transition("vm_1", state, verb)).toThrow(/cannot/);
  });

  it("allows delete from every state", () => {
    for (const s of VM_STATES) expect(transition("vm_1", s, "delete" as VmVerb)).toBe("deleted");
  });
});
