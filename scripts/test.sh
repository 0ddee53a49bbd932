#!/usr/bin/env bash
# The test command: installs what the tests need, then runs lints, all tests, and
# checks that the benchmarks build. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-features
deploy/check.sh
cargo bench --no-run
