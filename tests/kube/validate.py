"""Validates Kubernetes YAML documents for tests/tests/kube.rs.

usage: validate.py K8S_VERSION FILE...

Built-in kinds go through kubernetes-validate (PyPI) in strict mode, the same check as
`kubernetes-validate --strict -k K8S_VERSION`. Kinds kubernetes-validate has no schema
for (CRDs: ClusterSPIFFEID, cert-manager's Certificate and Issuer; kustomize's
Kustomization) are checked against the hand-written JSON schemas in schemas/ instead and
reported as `crd-schema`. Anything else without a schema is a failure. Prints one JSON
line per document: {"file", "index", "kind", "name", "result", "message"}.
"""
import json
import os
import sys

import jsonschema
import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    version, files = sys.argv[1], sys.argv[2:]
    schemas = {n[:-5]: json.load(open(os.path.join(HERE, "schemas", n))) for n in os.listdir(os.path.join(HERE, "schemas"))}
    for path in files:
        with open(path) as f:
            docs = list(yaml.safe_load_all(f))
        for index, doc in enumerate(docs):
            if doc is None:
                continue
            kind = doc.get("kind", "")
            name = (doc.get("metadata") or {}).get("name", "")
            out = {"file": path, "index": index, "kind": kind, "name": name}
            try:
                if kind in schemas:
                    jsonschema.validate(doc, schemas[kind])
                    out["result"] = "crd-schema"
                else:
                    kubernetes_validate.validate(doc, version, strict=True)
                    out["result"] = "passed"
                out["message"] = ""
            except Exception as e:  # noqa: BLE001 - every failure is reported, not raised
                out["result"] = "failed"
                out["message"] = f"{type(e).__name__}: {e}"[:2000]
            print(json.dumps(out))


if __name__ == "__main__":
    main()
