#!/usr/bin/env node
// Generates packages/api/src/gen from proto/ (buf.gen.yaml), or checks that it is up to date.
//
//   node scripts/gen-proto.mjs           buf lint proto, then buf generate
//   node scripts/gen-proto.mjs --check   generate into a temporary directory with the same
//                                        template and compare; exit 1 listing missing, extra and
//                                        stale files when the committed code differs
//
// buf.gen.yaml uses `clean: true`, so a file in the output directory that generation would not
// produce counts as stale too.
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const buf = join(root, "node_modules", ".bin", "buf");
const template = join(root, "buf.gen.yaml");

function run(args) {
  const res = spawnSync(buf, args, { cwd: root, stdio: "inherit" });
  if (res.error) {
    console.error(`gen-proto: cannot run ${relative(root, buf)}: ${res.error.message} (run \`npm ci\`)`);
    process.exit(1);
  }
  if (res.status !== 0) {
    console.error(`gen-proto: \`buf ${args.join(" ")}\` failed (exit ${res.status ?? res.signal})`);
    process.exit(res.status ?? 1);
  }
}

/** The `out:` directories of buf.gen.yaml, relative to the repo root. */
function outDirs() {
  const dirs = [...readFileSync(template, "utf8").matchAll(/^\s*-?\s*out:\s*["']?([^"'\s#]+)["']?/gm)].map(
    (m) => m[1],
  );
  if (dirs.length === 0) {
    console.error("gen-proto: no `out:` directory found in buf.gen.yaml");
    process.exit(1);
  }
  return [...new Set(dirs)];
}

/** Files under dir, as paths relative to dir with '/' separators. */
function listFiles(dir) {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => relative(dir, join(e.parentPath, e.name)).split(sep).join("/"))
    .sort();
}

function check() {
  const tmp = mkdtempSync(join(tmpdir(), "kiln-gen-"));
  try {
    // --output prefixes every plugin's `out` with tmp, so the template (plugins, options,
    // clean) is exactly the one `npm run gen` uses.
    run(["generate", "--template", template, "--output", tmp]);
    const problems = [];
    for (const out of outDirs()) {
      const fresh = join(tmp, out);
      const committed = join(root, out);
      const want = listFiles(fresh);
      const have = new Set(listFiles(committed));
      for (const file of want) {
        const path = `${out}/${file}`;
        if (!have.has(file)) {
          problems.push(`missing: ${path}`);
          continue;
        }
        have.delete(file);
        if (!readFileSync(join(fresh, file)).equals(readFileSync(join(committed, file)))) {
          problems.push(`stale:   ${path}`);
        }
      }
      for (const file of have) problems.push(`extra:   ${out}/${file}`);
    }
    if (problems.length > 0) {
      console.error("gen-proto: generated code is out of date:");
      for (const p of problems) console.error(`  ${p}`);
      console.error("run `npm run gen`");
      return 1;
    }
    console.log("gen-proto: generated code is up to date");
    return 0;
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

const args = process.argv.slice(2);
const unknown = args.filter((a) => a !== "--check");
if (unknown.length > 0) {
  console.error(`gen-proto: unknown argument ${unknown.join(" ")}; usage: gen-proto.mjs [--check]`);
  process.exit(2);
}
if (args.includes("--check")) {
  process.exit(check());
}
run(["lint", "proto"]);
run(["generate", "--template", template]);
console.log(`gen-proto: generated ${outDirs().join(", ")}`);
