#!/usr/bin/env bash
# The whole test suite, as the README gives it: the Rust workspace (unit, property, simulation
# and black-box tests against NATS, Redis and PostgreSQL on loopback), then the TypeScript
# integrations (their own tests, and the end-to-end test with the engine binary the Rust tests
# just built).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

# Everything the tests need, on a fresh Debian machine with Rust: the services on loopback,
# the official `standardwebhooks` Python package (the receiver-side cross-check of signatures)
# and Node.js 20.9+ with npm (the TypeScript integrations).
bash scripts/services.sh
if ! python3 -c 'import standardwebhooks' >/dev/null 2>&1; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt-get install -y -qq python3-pip >/dev/null
  fi
  python3 -m pip install --quiet --disable-pip-version-check standardwebhooks==1.1.0 2>/dev/null ||
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages standardwebhooks==1.1.0
fi
if ! command -v npm >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
fi
target="${CARGO_TARGET_DIR:-$root/target}"

cargo test --workspace

cd integrations
npm ci --no-audit --no-fund --loglevel=error
SYNC_ENGINE_BIN="$target/debug/sync-engine-under-test" npm test
