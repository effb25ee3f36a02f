#!/usr/bin/env bash
# The test command: installs the test peers if missing, builds the binaries, and runs
# every test (unit tests and the end-to-end tests in tests/ that start the real binaries).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
# Every crate the lock file names, for every target: the dependency-graph test reads
# `cargo metadata --offline`, which a build alone (host crates only) does not provide.
cargo fetch --locked
cargo build --workspace --bins
# A throwaway PostgreSQL for the several-gateways tests (the machine's binaries; a
# temporary cluster on a free port, TLS on, stopped on exit). Skipped when the caller
# gave one (NEXUS_TEST_POSTGRES_URL, and NEXUS_TEST_POSTGRES_CA for the TLS test).
if [ -z "${NEXUS_TEST_POSTGRES_URL:-}" ]; then
  pgdir=$(mktemp -d /tmp/nexus-test-pg.XXXXXX)
  pgport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  NEXUS_TEST_POSTGRES_URL=$(scripts/postgres.sh start "$pgdir/data" "$pgport")
  NEXUS_TEST_POSTGRES_CA="$pgdir/data/nexus-test-ca.pem"
  export NEXUS_TEST_POSTGRES_URL NEXUS_TEST_POSTGRES_CA
  trap 'scripts/postgres.sh stop "$pgdir/data"; rm -rf "$pgdir"' EXIT
  echo "PostgreSQL for the tests: $NEXUS_TEST_POSTGRES_URL"
fi
cargo test --workspace --no-fail-fast "$@"
