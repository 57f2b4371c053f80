#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run → npm test → this script).
# Works on a fresh clone: installs what is missing first, then checks and tests everything.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n== %s\n' "$*"; }

step "system packages";      bash scripts/setup-system.sh
step "npm dependencies";     bash scripts/install-deps.sh
step "generated code";       npm run --silent gen:check
# One command per line: under set -e, a failure before `&&` would not stop the script.
step "lint and format";      npx biome check .
                             npx buf lint proto
step "build";                npm run --silent build
step "typecheck tests";      npx tsc -p tsconfig.test.json
step "docs";                 npm run --silent docs:check
step "tests (unit + e2e)";   npx vitest run
