#!/usr/bin/env bash
# The whole test suite, as the README gives it: the Rust workspace (unit, property, simulation
# and black-box tests against NATS, Redis and PostgreSQL on loopback), then the TypeScript
# integrations (their own tests, and the end-to-end test with the engine binary the Rust tests
# just built).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"

cargo test --workspace

cd integrations
npm ci --no-audit --no-fund --loglevel=error
SYNC_ENGINE_BIN="$target/debug/sync-engine-under-test" npm test
