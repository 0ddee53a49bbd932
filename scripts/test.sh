#!/usr/bin/env bash
# The test command: installs what the tests need, then runs lints, all tests, and
# checks that the benchmarks build. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo fmt --all -- --check
# The proxy as released (without the demo feature), then everything (the tests and
# benchmarks turn the demo feature on).
cargo clippy --lib --bins -- -D warnings
cargo clippy --all-targets --all-features -- -D warnings
cargo test --all-features
deploy/check.sh
# The benchmarks build and link (in the test profile: the optimised bench profile would
# rebuild every dependency, minutes on a fresh machine, for no further check).
cargo test --all-features --benches --no-run
