import { execFile } from "node:child_process";
import fs from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import zlib from "node:zlib";
import { FailedPreconditionError } from "@kiln/kit";

const gunzip = promisify(zlib.gunzip);
const execFileP = promisify(execFile);

/** A loadable module resolved from a kernel's modules directory. */
export interface KernelModule {
  /** Canonical name (dashes as underscores), e.g. "virtio_blk". */
  name: string;
  /** Path relative to the modules directory, e.g. "kernel/drivers/block/virtio_blk.ko.xz". */
  file: string;
}

/** `modules.dep` and `modules.builtin` of one kernel, read once. */
export interface ModuleIndex {
  modulesDir: string;
  /** name → { file, dependency files as listed } */
  deps: Map<string, { file: string; deps: string[] }>;
  builtin: Set<string>;
}

export async function readModuleIndex(modulesDir: string): Promise<ModuleIndex> {
  let depText: string;
  try {
    depText = await fs.readFile(path.join(modulesDir, "modules.dep"), "utf8");
  } catch (err) {
    throw new FailedPreconditionError(
      `cannot read ${path.join(modulesDir, "modules.dep")}: the kernel's modules are missing or depmod never ran (reinstall the kernel package, e.g. linux-image-cloud-amd64)`,
      { cause: err },
    );
  }
  const deps = new Map<string, { file: string; deps: string[] }>();
  for (const line of depText.split("\n")) {
    const colon = line.indexOf(":");
    if (colon <= 0) continue;
    const file = line.slice(0, colon).trim();
    const rest = line.slice(colon + 1).trim();
    deps.set(moduleNameOf(file), { file, deps: rest ? rest.split(/\s+/) : [] });
  }
  const builtin = new Set<string>();
  const builtinText = await fs.readFile(path.join(modulesDir, "modules.builtin"), "utf8").catch(() => "");
  for (const line of builtinText.split("\n")) if (line.trim()) builtin.add(moduleNameOf(line.trim()));
  return { modulesDir, deps, builtin };
}

/** "kernel/drivers/net/virtio_net.ko.xz" → "virtio_net"; "virtio-net" → "virtio_net". */
export function moduleNameOf(fileOrName: string): string {
  return path
    .basename(fileOrName)
    .replace(/\.ko(\.(xz|gz|zst))?$/, "")
    .replace(/-/g, "_");
}

/**
 * The modules to load, in an order where every module comes after what it needs (modules.dep
 * lists a module's full dependency closure; modprobe loads that list from its end, which the
 * depth-first walk below reproduces). Built-in modules are skipped; a module that is neither
 * built in nor present is an error naming it.
 */
export function resolveLoadOrder(index: ModuleIndex, wanted: string[]): KernelModule[] {
  const order: KernelModule[] = [];
  const seen = new Set<string>();
  const visit = (name: string, chain: string[]) => {
    if (seen.has(name) || index.builtin.has(name)) return;
    const entry = index.deps.get(name);
    if (!entry) {
      const via = chain.length > 0 ? ` (needed by ${chain.join(" → ")})` : "";
      throw new FailedPreconditionError(
        `kernel module ${name}${via} is neither built into the kernel nor present in ${index.modulesDir}`,
      );
    }
    seen.add(name);
    for (const dep of [...entry.deps].reverse()) visit(moduleNameOf(dep), [...chain, name]);
    order.push({ name, file: entry.file });
  };
  for (const w of wanted) visit(moduleNameOf(w), []);
  return order;
}

/** A module's object code, decompressed when the kernel ships compressed modules. */
export async function readModule(modulesDir: string, m: KernelModule): Promise<Buffer> {
  const file = path.join(modulesDir, m.file);
  if (m.file.endsWith(".ko")) return fs.readFile(file);
  if (m.file.endsWith(".ko.gz")) return gunzip(await fs.readFile(file));
  // Node 20 has no xz or zstd decoder; the kernel packages that compress this way depend on the tools.
  const tool = m.file.endsWith(".ko.xz") ? "xz" : m.file.endsWith(".ko.zst") ? "zstd" : undefined;
  if (!tool) throw new FailedPreconditionError(`kernel module ${m.file} has an unknown compression`);
  try {
    const { stdout } = await execFileP(tool, ["-dc", file], { encoding: "buffer", maxBuffer: 256 << 20 });
    return stdout;
  } catch (err) {
    throw new FailedPreconditionError(
      `cannot decompress kernel module ${m.file} with ${tool}: install the ${tool === "xz" ? "xz-utils" : "zstd"} package`,
      { cause: err },
    );
  }
}
