"""Differential test of the gateway's revocation policy: nexus (nexusctl policy eval,
i.e. regorus as the gateway runs it) against OPA 1.20 (its Go library, PyPI
opa-golib-python-bindings) on 3000 generated signals with history, with and without a
protected workload. Every decision, reasons included, must match.

Usage: revocation_conformance.py --nexusctl PATH --policies DIR
"""
import argparse, json, random, subprocess, sys, re, tempfile
from pathlib import Path
import yaml
from opa_bindings import OpaEngine, OpaError, OpaUndefinedError

ap = argparse.ArgumentParser()
ap.add_argument("--nexusctl", required=True)
ap.add_argument("--policies", required=True)
args = ap.parse_args()
root = Path(args.policies)
nexusctl = args.nexusctl
work = Path(tempfile.mkdtemp(prefix="nexus-revocation-conformance-"))
rng = random.Random(7)
W = ["spiffe://nexus.local/ns/plugins/sa/flood-model", "spiffe://nexus.local/ns/data/sa/hazard-api",
     "spiffe://nexus.local/ns/data/sa/rates-api", "unknown", "spiffe://nexus.local/ns/nexus/sa/gateway"]
KINDS = ["rate_spike", "denial_burst", "egress_bytes", "unbound_clause", "auth_failures", "sandbox_violation", "budget_exceeded", "mystery"]
NOW = 1764150000123

def sig(workload):
    kind = rng.choice(KINDS)
    rep = rng.choice([workload, workload] + W)
    ev = {"count": rng.randint(0, 100)}
    if kind == "sandbox_violation" or rng.random() < 0.1:
        ev["action"] = rng.choice(["kill", "eperm", "log"]); ev["syscall"] = "ptrace"
    s = {"id": f"sig-{rng.randint(0,999)}", "kind": kind, "workload": workload if rng.random() < 0.9 else rng.choice(W),
         "reporter": rep, "observed_as": rng.choice(["peer", "self", "self", "peer", "x"] if rng.random() < 0.1 else ["peer", "self"]),
         "score": rng.choice([0.5, 1, 1.5, 2, 3, 3.5, 4, 5, 7.9, 8, 10, 12.5, 100]), "evidence": ev,
         "time_ms": NOW - rng.choice([0, 10, 1000, 60000, 599999, 600000, 600124, 700000])}
    # What the gateway verified: mostly what it would say, sometimes anything (the
    # policy must not trust a status it did not expect), sometimes nothing.
    own = s["observed_as"] == "self" and s["reporter"] == s["workload"]
    likely = "not_required" if own else ("verified" if s["observed_as"] == "peer" else "unverified")
    status = rng.choice([likely, likely, likely, "verified", "unverified", "pending", "not_required", None])
    if status is not None:
        s["verification"] = {"status": status} if rng.random() < 0.3 else {"status": status, "reason": f"r{rng.randint(0, 9)}"}
    return s

docs = []
for i in range(3000):
    w = rng.choice(W[:3] + [W[4]])
    s = sig(w); s["workload"] = w if rng.random() < 0.95 else s["workload"]
    hist = [sig(w) for _ in range(rng.choice([0, 0, 1, 2, 3, 6]))]
    docs.append({"signal": s, "history": hist,
                 "workload": {"spiffe_id": w if rng.random() < 0.97 else W[1], "revoked": rng.random() < 0.05},
                 "now_ms": NOW})

def load_data(folder):
    data = {}
    for p in sorted(folder.rglob("*.yaml")):
        rel = p.relative_to(folder).parent.parts
        v = yaml.safe_load(p.read_text())
        for k in reversed(rel): v = {k: v}
        def merge(d, s):
            for k, x in s.items():
                if k in d and isinstance(d[k], dict) and isinstance(x, dict): merge(d[k], x)
                else: d[k] = x
        merge(data, v)
    return data

def run(folder, protected):
    data = load_data(folder)
    extra = {"nexus": {"revocation": {"protected": protected}}} if protected is not None else None
    e = OpaEngine()
    for p in sorted(folder.rglob("*.rego")):
        if not p.name.endswith("_test.rego"):
            e.add_policy(str(p.relative_to(folder)), p.read_text())
    d2 = json.loads(json.dumps(data))
    if extra:
        d2.setdefault("nexus", {}).setdefault("revocation", {})["protected"] = protected
    e.add_data(d2)
    (work / "in.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    cmd = [nexusctl, "policy", "eval", "--dir", str(folder), "--rule", "data.nexus.revocation.decision", "--inputs", str(work / "in.jsonl")]
    if extra:
        (work / "extra.json").write_text(json.dumps(extra)); cmd += ["--data", str(work / "extra.json")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
    bad = 0; actions = {}
    for d, line in zip(docs, out):
        n = json.loads(line)
        m = re.search(r"no boolean `allow`: (.*)$", n.get("error") or "", re.S)
        nv = json.loads(m.group(1)) if m else n
        try:
            ov = e.eval_document("nexus.revocation.decision", d) if hasattr(e, "eval_document") else None
        except OpaUndefinedError:
            ov = "undefined"
        if nv != ov:
            bad += 1
            if bad <= 3: print("MISMATCH", json.dumps(d)[:600], "\n nexus", nv, "\n opa  ", ov)
        a = nv.get("action") if isinstance(nv, dict) else nv
        actions[a] = actions.get(a, 0) + 1
    print(folder, "protected", protected, "inputs", len(docs), "mismatches", bad, "actions", actions)
    return bad

bad = run(root / "revocation", None) + run(root / "revocation", [W[4]])
print(f"{2 * len(docs) - bad} passed, {bad} failed")
sys.exit(1 if bad else 0)
