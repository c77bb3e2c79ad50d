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
updated=""
install() {
  if [ -z "$updated" ]; then as_root apt-get update -qq; updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

browser="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$browser" ]; then
  echo "== installing chromium (Debian package)"
  install chromium
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "== installing nodejs and npm (Debian packages)"
  install nodejs npm
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
  echo "ui-test: playwright-core needs Node.js 20 or newer; this machine has $(node --version)" >&2
  exit 1
fi

echo "== npm ci (playwright-core, to drive Chromium)"
npm ci --prefix admin-ui/e2e --no-audit --no-fund --silent

echo "== the web UI in headless Chromium"
VRS_NODE="$(realpath "$binary")" CHROMIUM="$browser" node admin-ui/e2e/ui.test.mjs
