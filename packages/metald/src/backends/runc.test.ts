import fs from "node:fs";
import path from "node:path";
import { tempDir } from "@kiln/kit/testing";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { NotImplementedError } from "./backend.js";
import {
  backendConformanceSuite,
  buildSuiteAssets,
  cleanupVmFixture,
  newVmFixture,
  processesMentioning,
  type SuiteAssets,
  type SuiteTarget,
  type VmFixture,
  waitForHttp,
} from "./backend.suite.js";
import { mountsUnder } from "./mounts.js";
import { isAlive } from "./process.js";
import { createRuncBackend } from "./runc.js";

const target: SuiteTarget = {
  label: "runc",
  backend: () => createRuncBackend(),
  network: "address",
  vm: false,
  bootTimeoutMs: 10_000,
  shutdownTimeoutMs: 5_000,
};

backendConformanceSuite(target);

describe("runc backend, beyond the suite", () => {
  let work: { path: string; remove(): void };
  let assets: SuiteAssets;
  let vm: VmFixture | undefined;
  beforeAll(async () => {
    work = tempDir("kiln-bt-assets-");
    assets = await buildSuiteAssets(work.path, false);
  });
  afterAll(() => work?.remove());
  afterEach(async () => {
    if (vm) await cleanupVmFixture(target, vm);
    vm = undefined;
  });

  it("deletes a VM whose runc state was lost, by the process it recorded", async () => {
    vm = await newVmFixture(target, assets);
    const b = createRuncBackend();
    await b.create(vm.spec);
    const h = await b.boot(vm.spec);
    vm.handles.push(h);
    expect(await waitForHttp(`${vm.url}/`, 10_000)).toBeDefined();
    fs.rmSync(path.join(vm.spec.dir, "runc/state"), { recursive: true, force: true });
    await b.delete(vm.spec); // no handle either
    expect(await isAlive({ pid: h.pid, startTime: h.pidStartTime })).toBe(false);
    expect(processesMentioning(vm.spec.dir)).toEqual([]);
    expect(await mountsUnder(vm.spec.dir)).toEqual([]);
    expect(fs.readdirSync(vm.spec.dir)).toEqual([]);
  });

  it("refuses port forwards without a network: containers have no user-mode networking", async () => {
    vm = await newVmFixture({ ...target, network: "user" }, assets);
    await expect(createRuncBackend().create(vm.spec)).rejects.toBeInstanceOf(NotImplementedError);
    expect(fs.readdirSync(vm.spec.dir)).toEqual([]);
  });
});
