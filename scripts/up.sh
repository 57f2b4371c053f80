#!/usr/bin/env bash
# Sets up everything a fresh machine needs, builds Kiln and runs the whole platform in one
# process (`kiln up`). Arguments go to `kiln up`, e.g. `npm run up -- --data-dir /tmp/kiln`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-system.sh
bash scripts/install-deps.sh
npm run --silent build
exec node packages/cli/dist/main.js up "$@"
