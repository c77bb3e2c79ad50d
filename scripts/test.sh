#!/usr/bin/env bash
# The project's whole test suite: formatting, lints, every test (unit, data-driven,
# property, end-to-end with real vrs-node processes, kill -9 crash test).
# Needs the Rust toolchain (rustup with rustfmt and clippy) and installs what is missing:
# the components, cargo-deny from crates.io (about 3 minutes on 2 cores the first time), and
# for the web UI's browser test Debian's chromium and playwright-core from npm (scripts/ui-test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component"
  fi
done

if ! cargo deny --version >/dev/null 2>&1; then
  echo "== installing cargo-deny"
  cargo install --locked cargo-deny@0.20.2
fi

# A whole-suite run builds everything once: incremental caches would only add gigabytes
# to the target directory.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo deny: licences, banned crates (openssl, native-tls, aws-lc), sources"
cargo deny --log-level error check bans licenses sources
echo "== cargo build vrs-node (the end-to-end tests start this binary)"
cargo build --locked -p node --bin vrs-node
echo "== cargo test"
cargo test --workspace --locked -- --test-threads 2
echo "== the web UI in a browser"
./scripts/ui-test.sh target/debug/vrs-node
