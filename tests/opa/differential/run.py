#!/usr/bin/env python3
"""The OPA side of the differential harness: evaluates every case that nexus evaluated
(JSON lines written by tests/tests/opa_differential.rs) through OPA 1.20 (PyPI
`opa-golib-python-bindings`, OPA's Go library) and compares.

    NEXUS_DIFF_OUT=/tmp/nexus.jsonl cargo test -p nexus-tests --test opa_differential
    python3 tests/opa/differential/run.py --nexus /tmp/nexus.jsonl [--only NAME-PREFIX]

Each nexus line carries the expanded case (modules, data, input, query) and two nexus
outcomes: `sidecar` (Policy::compile/evaluate, what the sidecar decides with) and
`test` (the engine `nexusctl policy test` uses). An outcome has a status: `value` (with
its JSON text), `undefined`, `error`, `compile_error` or `panic`.

The comparison rule:
- value vs value: equal as JSON values, exactly: same types, strings byte for byte,
  numbers by their decimal value (1 and 1.0 are the same Rego number), object keys and
  array order as given (sets arrive sorted from both engines);
- undefined only matches undefined: `false` is not undefined;
- OPA's bindings run with strict builtin errors, so a failing builtin raises where
  OPA's default (opa eval, the OPA server) makes the call undefined. An OPA builtin error
  therefore matches a nexus `undefined` or `error` (nexus denies either way); the cases
  keep the failing call where its undefinedness reaches the query directly;
- a compile (prepare) error matches only a compile error;
- a nexus panic matches nothing.

A case whose outcome differs on either nexus path is a mismatch unless
known_differences.yaml lists it (case name -> reason); a listed case that agrees on
both paths is STALE. The exit status is 1 on any unlisted mismatch or stale listing.
The last line is "N passed, M failed".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

try:
    from opa_bindings import OpaEngine, OpaError, OpaUndefinedError
except ImportError:  # pragma: no cover - reported with the fix
    print(
        "differential: the OPA bindings are not importable (module `opa_bindings`);"
        " run scripts/install-test-deps.sh",
        file=sys.stderr,
    )
    sys.exit(2)

HERE = Path(__file__).resolve().parent
PATHS = ("sidecar", "test")


def parse_exact(text: str) -> Any:
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


def same_value(a: Any, b: Any) -> bool:
    """JSON equality without Python's bool/int confusion; numbers by decimal value."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, Decimal) or isinstance(b, Decimal):
        return isinstance(a, Decimal) and isinstance(b, Decimal) and a == b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return False


def opa_outcome(case: dict) -> dict:
    engine = OpaEngine()
    try:
        for path, text in case["modules"]:
            engine.add_policy(path, text)
        if case["data"]:
            engine.add_data(case["data"])
        path = case["query"][len("data."):]
        # The bindings evaluate the input document as given; no `input` key means
        # input is undefined (they cannot pass a JSON null).
        value = engine.eval_document(path, case.get("input"))
        return {"status": "value", "value": json.dumps(value, ensure_ascii=False)}
    except OpaUndefinedError:
        return {"status": "undefined"}
    except OpaError as e:
        if e.code in ("prepare_error", "add_policy_error", "parse_error") or "rego_parse_error" in e.message \
                or "rego_compile_error" in e.message or "rego_type_error" in e.message \
                or "rego_unsafe_var_error" in e.message or "rego_recursion_error" in e.message:
            return {"status": "compile_error", "detail": f"{e.code}: {e.message}"}
        # A builtin's operand type error (eval_type_error "<builtin>: operand N must be
        # ...") is a builtin error too: OPA's default evaluation makes the call undefined.
        builtin = "eval_builtin_error" in e.message or (
            "eval_type_error" in e.message and ": operand " in e.message)
        kind = "builtin_error" if builtin else "error"
        return {"status": kind, "detail": f"{e.code}: {e.message}"}
    finally:
        engine.close()


def agrees(opa: dict, nexus: dict) -> bool:
    o, n = opa["status"], nexus["status"]
    if n == "panic":
        return False
    if o == "value":
        return n == "value" and same_value(parse_exact(opa["value"]), parse_exact(nexus["value"]))
    if o == "builtin_error":
        return n in ("undefined", "error")
    return o == n


def show(outcome: dict) -> str:
    status = outcome["status"]
    if status == "value":
        text = outcome["value"]
        try:
            text = json.dumps(json.loads(text), ensure_ascii=False, separators=(",", ":"))
        except ValueError:
            pass
        out = f"value {text}"
    else:
        out = status
    if outcome.get("mode"):
        out += f" [{outcome['mode']}]"
    if outcome.get("detail") and status != "value":
        detail = " ".join(str(outcome["detail"]).split())
        out += f" ({detail[:300]})"
    return out


def load_known(path: Path) -> dict[str, str]:
    """known_differences.yaml: a map case name -> reason, read with OPA's own YAML."""
    if not path.exists():
        return {}
    engine = OpaEngine()
    try:
        rows = engine.eval_query("x := yaml.unmarshal(input.text)", {"text": path.read_text(encoding="utf-8")})
    finally:
        engine.close()
    known = rows[0]["x"] if rows else None
    if known is None:
        return {}
    if not isinstance(known, dict) or not all(isinstance(v, str) and v.strip() for v in known.values()):
        raise SystemExit(f"{path}: must map each case name to a non-empty reason")
    return known


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nexus", type=Path, required=True, help="nexus results (JSON lines)")
    ap.add_argument("--known", type=Path, default=HERE / "known_differences.yaml")
    ap.add_argument("--only", help="only cases whose name starts with this")
    ap.add_argument("--verbose", "-v", action="store_true", help="print every case")
    args = ap.parse_args()

    started = time.monotonic()
    cases = [json.loads(line) for line in args.nexus.read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.only:
        cases = [c for c in cases if c["name"].startswith(args.only)]
    known = load_known(args.known)
    names = {c["name"] for c in cases}
    if not args.only:
        unknown = sorted(k for k in known if k not in names)
        if unknown:
            print(f"known_differences.yaml lists cases that do not exist: {', '.join(unknown)}")
            return 1

    agreed = listed = 0
    mismatches, stale = [], []
    modes: dict[str, int] = {}
    by_file: dict[str, list[int]] = {}
    for case in cases:
        opa = opa_outcome(case)
        diff = [p for p in PATHS if not agrees(opa, case["nexus"][p])]
        mode = case["nexus"]["sidecar"].get("mode") or "none"
        modes[mode] = modes.get(mode, 0) + 1
        tally = by_file.setdefault(case["file"], [0, 0, 0])
        if diff and case["name"] in known:
            listed += 1
            tally[1] += 1
            if args.verbose:
                print(f"KNOWN {case['name']} ({', '.join(diff)}): {known[case['name']]}")
        elif diff:
            mismatches.append((case, opa, diff))
            tally[2] += 1
        elif case["name"] in known:
            stale.append(case)
            tally[2] += 1
        else:
            agreed += 1
            tally[0] += 1
            if args.verbose:
                print(f"ok    {case['name']}: {show(opa)}")

    for case, opa, diff in mismatches:
        print(f"\nMISMATCH {case['name']} ({case['file']}; differs on: {', '.join(diff)})")
        print(f"  query:   {case['query']}")
        if "input" in case:
            print(f"  input:   {json.dumps(case['input'], ensure_ascii=False)[:400]}")
        print(f"  opa:     {show(opa)}")
        for p in PATHS:
            print(f"  {p + ':':<8} {show(case['nexus'][p])}")
    for case in stale:
        opa = opa_outcome(case)
        print(f"\nSTALE {case['name']}: listed in known_differences.yaml but nexus now agrees with OPA "
              f"({show(opa)}); remove it from the list and the compatibility table")

    print("\nper file (agree / known / failing):")
    for file, (a, k, f) in sorted(by_file.items()):
        print(f"  {file:<40} {a:4d} {k:4d} {f:4d}")
    print(f"sidecar modes: {', '.join(f'{m} {n}' for m, n in sorted(modes.items()))}")
    print(f"{len(cases)} cases: {agreed} agree with OPA, {listed} known differences, "
          f"{len(mismatches)} unlisted mismatches, {len(stale)} stale listings "
          f"({time.monotonic() - started:.1f}s)")
    failed = len(mismatches) + len(stale)
    print(f"{agreed + listed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
