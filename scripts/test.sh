#!/usr/bin/env bash
# The test command: installs the test peers if missing, builds the binaries, and runs
# every test (unit tests and the end-to-end tests in tests/ that start the real binaries).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo build --workspace --bins
cargo test --workspace --no-fail-fast "$@"
