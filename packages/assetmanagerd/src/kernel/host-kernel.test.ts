import fs from "node:fs";
import path from "node:path";
import { FailedPreconditionError, NotFoundError } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, describe, expect, it } from "vitest";
import { compareVersions, findHostKernel } from "./host-kernel.js";

const dirs: Array<{ remove(): void }> = [];
afterEach(() => {
  for (const d of dirs.splice(0)) d.remove();
});

/** A fake /boot and /lib/modules; `kernels` maps versions to whether their modules exist. */
function fakeHost(kernels: Record<string, boolean>) {
  const d = tempDir("kiln-kernel-");
  dirs.push(d);
  const bootDir = path.join(d.path, "boot");
  const modulesRoot = path.join(d.path, "lib/modules");
  fs.mkdirSync(bootDir, { recursive: true });
  fs.mkdirSync(modulesRoot, { recursive: true });
  fs.writeFileSync(path.join(bootDir, "config-ignored"), "");
  for (const [version, modules] of Object.entries(kernels)) {
    fs.writeFileSync(path.join(bootDir, `vmlinuz-${version}`), "bzImage");
    if (modules) {
      fs.mkdirSync(path.join(modulesRoot, version));
      fs.writeFileSync(path.join(modulesRoot, version, "modules.dep"), "");
    }
  }
  return { bootDir, modulesRoot };
}

describe("findHostKernel", () => {
  it("prefers the newest cloud kernel that has its modules", async () => {
    const host = fakeHost({
      "6.1.0-9-amd64": true,
      "6.1.0-10-cloud-amd64": true,
      "6.1.0-9-cloud-amd64": true,
      "6.1.0-11-cloud-amd64": false,
      "6.5.0-1-amd64": true,
    });
    expect(await findHostKernel(host)).toEqual({
      version: "6.1.0-10-cloud-amd64",
      vmlinuz: path.join(host.bootDir, "vmlinuz-6.1.0-10-cloud-amd64"),
      modulesDir: path.join(host.modulesRoot, "6.1.0-10-cloud-amd64"),
    });
  });

  it("falls back to another kernel when there is no cloud kernel", async () => {
    const host = fakeHost({ "6.1.0-9-amd64": true, "5.10.0-1-amd64": true });
    expect((await findHostKernel(host)).version).toBe("6.1.0-9-amd64");
  });

  it("finds a requested version, and names the alternatives when it is missing", async () => {
    const host = fakeHost({ "6.1.0-9-cloud-amd64": true, "6.1.0-8-cloud-amd64": false });
    expect((await findHostKernel({ ...host, version: "6.1.0-9-cloud-amd64" })).version).toBe(
      "6.1.0-9-cloud-amd64",
    );
    const missing = await findHostKernel({ ...host, version: "7.0.0-1-cloud-amd64" }).catch((e) => e);
    expect(missing).toBeInstanceOf(NotFoundError);
    expect(missing.message).toMatch(/linux-image-cloud-amd64.*6\.1\.0-9-cloud-amd64/);
    await expect(findHostKernel({ ...host, version: "6.1.0-8-cloud-amd64" })).rejects.toThrow(
      /has no modules/,
    );
    await expect(findHostKernel({ ...host, version: "../../etc/passwd" })).rejects.toBeInstanceOf(
      NotFoundError,
    );
  });

  it("says which package to install when there is no kernel", async () => {
    const err = await findHostKernel(fakeHost({})).catch((e) => e);
    expect(err).toBeInstanceOf(FailedPreconditionError);
    expect(err.message).toMatch(/no kernel found .*apt-get install linux-image-cloud-amd64/);
    const noModules = await findHostKernel(fakeHost({ "6.1.0-9-cloud-amd64": false })).catch((e) => e);
    expect(noModules.message).toMatch(/has its modules.*linux-image-cloud-amd64/);
  });
});

describe("compareVersions", () => {
  it("compares numerically part by part", () => {
    expect(compareVersions("6.1.0-10-cloud-amd64", "6.1.0-9-cloud-amd64")).toBeGreaterThan(0);
    expect(compareVersions("5.10.0-1", "6.1.0-1")).toBeLessThan(0);
    expect(compareVersions("6.1.0-9", "6.1.0-9")).toBe(0);
  });
});
