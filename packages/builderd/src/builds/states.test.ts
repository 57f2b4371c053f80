import { describe, expect, it } from "vitest";
import { ACTIVE, BUILD_STATES, canTransition, isTerminal, predecessors } from "./states.js";

describe("build state table", () => {
  it("runs the seeds' pipeline in order", () => {
    const path = ["pending", "pulling", "extracting", "building", "optimizing", "completed"] as const;
    for (let i = 1; i < path.length; i++) expect(canTransition(path[i - 1]!, path[i]!)).toBe(true);
  });

  it("lets every active state fail, and cancel through cleaning", () => {
    for (const s of ACTIVE) {
      if (s !== "cleaning") expect(canTransition(s, "cleaning")).toBe(true);
      expect(canTransition(s, "failed")).toBe(true);
    }
    expect(predecessors("cancelled")).toEqual(["pending", "cleaning"]);
  });

  it("never leaves a terminal state", () => {
    for (const from of BUILD_STATES.filter(isTerminal)) {
      for (const to of BUILD_STATES) expect(canTransition(from, to)).toBe(false);
    }
  });

  it("allows a reused build to complete straight from pulling", () => {
    expect(predecessors("completed")).toEqual(["pending", "pulling", "optimizing"]);
    expect(canTransition("extracting", "completed")).toBe(false);
  });
});
