/**
 * `npm run bench -- <name> [args…]`: runs one side-by-side benchmark against the built packages
 * (dist/, as deployed; `npm run bench` builds first). Each module exports
 * `run(args)`, prints its results and the targets, and cleans up after itself.
 */
const benches: Record<string, () => Promise<{ run(args: string[]): Promise<void> }>> = {
  assets: () => import("./assets.js"),
  build: () => import("./build.js"),
  sampling: () => import("./sampling.js"),
  vm: () => import("./vm.js"),
};

const [name, ...args] = process.argv.slice(2);
const load = name ? benches[name] : undefined;
if (!load) {
  process.stderr.write(`usage: npm run bench -- <${Object.keys(benches).join("|")}> [args…]\n`);
  process.exit(2);
}
try {
  await (await load()).run(args);
} catch (err) {
  process.stderr.write(
    `bench ${name} failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`,
  );
  process.exit(1);
}
