#!/usr/bin/env bash
# Installs the npm dependencies exactly as locked (npm ci), skipping the work when
# node_modules already matches package-lock.json.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=node_modules/.kiln-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "install-deps: node_modules matches package-lock.json"
  exit 0
fi
echo "install-deps: npm ci (the first run compiles better-sqlite3 and zstd-napi, about a minute)"
npm ci --no-audit --no-fund
echo "$want" > "$stamp"
