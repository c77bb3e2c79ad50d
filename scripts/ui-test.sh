#!/usr/bin/env bash
# The staff web UI in a real browser: starts `vrs-node demo` and drives the pages in headless
# Chromium (admin-ui/e2e/ui.test.mjs). Installs what is missing: Debian's chromium package
# (apt-get, as root or through sudo) and playwright-core from the npm registry (locked).
# Usage: scripts/ui-test.sh [path to vrs-node]   (default: target/debug/vrs-node)
set -euo pipefail
cd "$(dirname "$0")/.."
binary="${1:-target/debug/vrs-node}"
[ -x "$binary" ] || { echo "ui-test: $binary not found; build it first (cargo build -p node --bin vrs-node)" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

browser="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$browser" ]; then
  echo "== installing chromium (Debian package)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium >/dev/null
fi
if ! command -v node >/dev/null 2>&1; then
  echo "== installing nodejs (Debian package)"
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq nodejs npm >/dev/null
fi

echo "== npm ci (playwright-core, to drive Chromium)"
npm ci --prefix admin-ui/e2e --no-audit --no-fund --silent

echo "== the web UI in headless Chromium"
VRS_NODE="$(realpath "$binary")" CHROMIUM="$browser" node admin-ui/e2e/ui.test.mjs
