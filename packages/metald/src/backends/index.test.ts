import { InvalidArgumentError } from "@kiln/kit";
import { describe, expect, it } from "vitest";
import {
  autoBackend,
  type BackendReport,
  BackendUnavailableError,
  parseBackendChoice,
  probeAll,
  rankReports,
  resolveBackend,
} from "./index.js";

const probe = (available: boolean, accelerated = false) => ({
  available,
  reason: available ? "ok" : "missing",
  isolation: "container" as const,
  accelerated,
  version: "",
});

describe("auto", () => {
  it("ranks firecracker > qemu (kvm) > gvisor > qemu (tcg) > runc, skipping what is unavailable", () => {
    const all = (over: Partial<Record<string, ReturnType<typeof probe>>>): BackendReport[] =>
      (["runc", "gvisor", "qemu", "firecracker"] as const).map((name) => ({
        name,
        probe: over[name] ?? probe(true),
      }));
    const names = (r: BackendReport[]) => rankReports(r).map((x) => x.name);
    expect(names(all({ qemu: probe(true, true) }))).toEqual(["firecracker", "qemu", "gvisor", "runc"]);
    expect(names(all({ qemu: probe(true, false) }))).toEqual(["firecracker", "gvisor", "qemu", "runc"]);
    expect(names(all({ firecracker: probe(false), qemu: probe(true, false) }))).toEqual([
      "gvisor",
      "qemu",
      "runc",
    ]);
    expect(names(all({ firecracker: probe(false), gvisor: probe(false), qemu: probe(false) }))).toEqual([
      "runc",
    ]);
  });

  it("probes every backend on this host and picks the strongest that works", async () => {
    const reports = await probeAll();
    expect(reports.map((r) => r.name).sort()).toEqual(["firecracker", "gvisor", "qemu", "runc"]);
    for (const r of reports) expect(r.probe.reason, r.name).not.toBe("");
    const { backend, probe: chosen } = await autoBackend();
    expect(chosen.available).toBe(true);
    expect(backend.name).toBe(rankReports(reports)[0]!.name);
    // No usable /dev/kvm on the project's machines: Firecracker is never chosen there.
    const fc = reports.find((r) => r.name === "firecracker")!;
    if (!fc.probe.available) expect(backend.name).not.toBe("firecracker");
  });

  it("refuses a named backend that cannot run here", async () => {
    const reports = await probeAll();
    const missing = reports.find((r) => !r.probe.available);
    if (!missing) return; // every backend works on this host
    await expect(resolveBackend(missing.name)).rejects.toBeInstanceOf(BackendUnavailableError);
    await expect(resolveBackend(missing.name)).rejects.toThrow(missing.probe.reason);
  });
});

describe("parseBackendChoice", () => {
  it("accepts auto and every backend name, case-insensitively", () => {
    expect(parseBackendChoice("auto")).toBe("auto");
    expect(parseBackendChoice(" QEMU ")).toBe("qemu");
    expect(parseBackendChoice("firecracker")).toBe("firecracker");
  });
  it("names the field for anything else", () => {
    expect(() => parseBackendChoice("kata", "UNKEY_METALD_BACKEND")).toThrow(InvalidArgumentError);
    expect(() => parseBackendChoice("kata", "UNKEY_METALD_BACKEND")).toThrow(
      /UNKEY_METALD_BACKEND "kata".*auto, firecracker/,
    );
  });
});
