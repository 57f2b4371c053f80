import { fileURLToPath } from "node:url";
import { defineConfig } from "vitest/config";

// Two projects: `unit` (fast; runs on every change) and `e2e` (slow: boots real VMs, real registries).
// Both run in CI through `npm test`. Workspace packages resolve to their TypeScript sources, so
// tests never need a build.
const packages = fileURLToPath(new URL("./packages/", import.meta.url));
const resolve = {
  alias: [
    { find: /^@kiln\/kit\/testing$/, replacement: `${packages}kit/src/testing/index.ts` },
    { find: /^@kiln\/kit\/(errors|fs)$/, replacement: `${packages}kit/src/$1.ts` },
    { find: /^@kiln\/([a-z]+)$/, replacement: `${packages}$1/src/index.ts` },
  ],
};

export default defineConfig({
  test: {
    projects: [
      {
        resolve,
        test: {
          name: "unit",
          include: ["packages/*/src/**/*.test.ts"],
          testTimeout: 30_000,
          hookTimeout: 60_000,
        },
      },
      {
        resolve,
        test: {
          name: "e2e",
          include: ["packages/*/test/e2e/**/*.test.ts"],
          testTimeout: 300_000,
          hookTimeout: 300_000,
          fileParallelism: false,
        },
      },
    ],
  },
});
