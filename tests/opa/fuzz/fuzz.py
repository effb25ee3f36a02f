#!/usr/bin/env python3
"""Differential fuzzer: generated Rego modules and inputs, evaluated by nexus
(`nexusctl policy eval`, in the default mode and with the interpreter forced) and by
OPA 1.20 (its Go library, PyPI `opa-golib-python-bindings`).

    python3 tests/opa/fuzz/fuzz.py --nexusctl target/debug/nexusctl --seed 1 --seconds 60
    python3 tests/opa/fuzz/fuzz.py --seed 7 --minutes 30 --regressions /tmp/new.yaml

Each case is one module (package `fz`) built from a grammar of what authorization
policies use: complete rules with `else` and `default`, partial sets and objects, ref
heads (a variable in a multi-value ref head included), functions, array/set/object
comprehensions, `some ... in`, `every`, `not`, `with`, key-value membership, and
string/regex/glob/time/net/JSON/encoding/crypto builtins; with a data document and a
few generated inputs (fields missing or of another type included). The module's rules
are collected in one partial object `out` (one key per rule that is defined), whose
`allow` key is the case's decision; nexus evaluates `data.fz.out`, OPA each rule.

Compared per rule: the same keys with the same values (numbers by decimal value,
undefined distinct from false). OPA's bindings raise builtin errors that OPA's default
evaluation turns into undefined: an OPA builtin error matches an absent key. A module
OPA refuses to compile is skipped (counted). A mismatch is **fail-open** when nexus
makes a rule `true` (or the decision allow) where OPA does not.

Every mismatch is printed with its module and input, and with `--regressions FILE` is
appended as a case of the differential harness (tests/opa/differential/cases/), so it
runs in CI from then on. The last lines give the case count, the mismatch count and
the fail-open count; the exit status is 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

try:
    from opa_bindings import OpaEngine, OpaError, OpaUndefinedError
except ImportError:  # pragma: no cover - reported with the fix
    print("fuzz: the OPA bindings are not importable; run scripts/install-test-deps.sh", file=sys.stderr)
    sys.exit(2)

REPO = Path(__file__).resolve().parents[3]

DATA = {
    "fzdata": {
        "roles": {"admin": ["read", "write", "delete"], "dev": ["read", "write"], "guest": ["read"]},
        "owners": {"doc-1": "alice", "doc-2": "bob"},
        "nets": ["10.0.0.0/8", "192.168.1.0/24", "2001:db8::/32"],
        "limits": {"alice": 3, "bob": 10},
        "blocked": ["mallory"],
    }
}

NAMES = ["alice", "bob", "mallory", "", "Alice"]
ROLES = ["admin", "dev", "guest", "root"]
ACTIONS = ["read", "write", "delete", "list"]
PATHS = ["/api/v1/docs", "/api/v1/docs/doc-1", "/admin", "/api/v2/x", ""]
IPS = ["10.1.2.3", "192.168.1.7", "8.8.8.8", "2001:db8::1", "::ffff:10.0.0.1", "not-an-ip"]
TIMES = ["2026-01-01T10:00:00Z", "2026-06-30T23:59:59.5+02:00", "2025-12-31T00:00:00Z", "yesterday"]


class Gen:
    """Builds one module: rules r0..rN, helper functions, `allow`, and `out`."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.rules: list[tuple[str, str]] = []  # (name, kind) defined so far
        self.funcs: list[str] = []
        self.lines: list[str] = []
        self.var = 0

    def fresh(self) -> str:
        self.var += 1
        return f"v{self.var}"

    def pick(self, xs):
        return self.rng.choice(xs)

    # -- terms ----------------------------------------------------------------------

    def string_ref(self) -> str:
        return self.pick([
            "input.user.name", "input.action", "input.resource.path", "input.resource.owner",
            "input.ip", "input.time", "input.token", "input.resource.id", "input.headers.origin",
        ])

    def string_lit(self) -> str:
        return json.dumps(self.pick(NAMES + ROLES + ACTIONS + PATHS + ["/api/", "doc-", "x"]))

    def string_term(self) -> str:
        r = self.rng.random()
        if r < 0.5:
            return self.string_ref()
        if r < 0.7:
            return self.string_lit()
        return self.pick([
            f"lower({self.string_ref()})",
            f"upper({self.string_ref()})",
            f"concat(\"-\", [{self.string_ref()}, {self.string_lit()}])",
            f"sprintf(\"%s/%v\", [{self.string_ref()}, {self.any_term(0)}])",
            f"trim_space({self.string_ref()})",
            f"object.get(input.resource, \"owner\", \"nobody\")",
            f"replace({self.string_ref()}, \"/\", \".\")",
        ])

    def num_term(self) -> str:
        return self.pick([
            "input.user.age", "input.amount", "count(input.user.roles)", "count(input.items)",
            str(self.rng.randint(-2, 30)), "data.fzdata.limits[input.user.name]",
            f"count({self.string_ref()})", "input.user.age * 2", "input.amount + 1",
            "sum([x.n | some x in input.items])",
        ])

    def coll_ref(self) -> str:
        return self.pick([
            "input.user.roles", "input.items", "input.resource.tags", "data.fzdata.nets",
            "data.fzdata.roles", "data.fzdata.blocked", "input.groups",
        ])

    def any_term(self, depth: int) -> str:
        r = self.rng.random()
        if r < 0.35:
            return self.string_term()
        if r < 0.55:
            return self.num_term()
        if r < 0.65:
            return self.pick(["true", "false", "null"])
        if r < 0.75 and self.rules:
            name, _ = self.pick(self.rules)
            return name
        if r < 0.85 and depth < 2:
            return f"[{self.any_term(depth + 1)}, {self.any_term(depth + 1)}]"
        return self.coll_ref()

    # -- conditions -------------------------------------------------------------------

    def condition(self, depth: int = 0) -> list[str]:
        """Body literals (one or more) that may hold or fail."""
        r = self.rng.random()
        s, n = self.string_term, self.num_term
        if r < 0.10:
            return [f"{s()} == {self.string_lit()}"]
        if r < 0.15:
            return [f"{s()} != {self.string_lit()}"]
        if r < 0.22:
            return [f"{n()} {self.pick(['>', '<', '>=', '<=', '=='])} {self.rng.randint(-1, 12)}"]
        if r < 0.30:
            return [f"{self.pick(['startswith', 'endswith', 'contains'])}({s()}, {self.string_lit()})"]
        if r < 0.36:
            return [f"{self.string_lit()} in {self.coll_ref()}"]
        if r < 0.40:
            coll = self.pick(['{"alice", "bob"}', "data.fzdata.blocked", "input.user.roles"])
            return [f"not {self.string_ref()} in {coll}"]
        if r < 0.46:
            x = self.fresh()
            inner = self.pick([f"{x} == {self.string_lit()}", f"startswith({x}, \"a\")", f"{x}.ok == true",
                               f"{x}.n > 1", f"data.fzdata.roles[{x}]"])
            return [f"some {x} in {self.coll_ref()}", inner]
        if r < 0.50:
            x = self.fresh()
            cond = self.pick([f"is_string({x})", f'{x} != "root"', f"{x}.ok"])
            return [f"every {x} in {self.coll_ref()} {{ {cond} }}"]
        if r < 0.56:
            x = self.fresh()
            return [f"{x} := {self.any_term(1)}", self.pick([f"not {x} == {self.string_lit()}", f"{x} != null",
                                                           f"is_string({x})", f"count([{x}]) == 1", f"not {x}"])]
        if r < 0.60 and self.rules:
            name, _ = self.pick(self.rules)
            return [self.pick([name, f"not {name}"])]
        if r < 0.63 and self.funcs:
            f = self.pick(self.funcs)
            return [self.pick([f"{f}({s()})", f"not {f}({s()})", f"{f}({s()}) == true"])]
        if r < 0.67:
            return [self.pick([
                f"regex.match(\"^/api/v[0-9]+/\", {s()})",
                f"glob.match(\"/api/*/docs\", [\"/\"], {s()})",
                f"regex.template_match(\"/api/{{[a-z0-9]+}}/docs\", {s()}, \"{{\", \"}}\")",
            ])]
        if r < 0.71:
            return [self.pick([
                "net.cidr_contains(\"10.0.0.0/8\", input.ip)",
                "some c in data.fzdata.nets; net.cidr_contains(c, input.ip)",
                "net.cidr_intersects(\"10.0.0.0/8\", input.cidr)",
            ])]
        if r < 0.75:
            return [self.pick([
                "time.parse_rfc3339_ns(input.time) < time.parse_rfc3339_ns(\"2026-03-01T00:00:00Z\")",
                "time.parse_rfc3339_ns(input.time) > 0",
                "[y, _, _] := time.date(time.parse_rfc3339_ns(input.time)); y >= 2026",
            ])]
        if r < 0.78:
            return [self.pick([
                "json.unmarshal(input.token).sub == \"alice\"",
                "crypto.sha256(input.user.name) == \"2bd806c97f0e00af1a1fc3328fa763a9269723c8db8fac4f93af71db186d6e90\"",
                "base64.decode(input.token) == \"alice\"",
                "urlquery.decode(input.resource.path) != \"\"",
                "count(split(input.resource.path, \"/\")) > 3",
            ])]
        if r < 0.82:
            k, v = self.fresh(), self.fresh()
            return [self.pick([f"some {k}, {v} in input.resource.tags", f"some {k}, {v} in data.fzdata.owners"]),
                    self.pick([f"{v} == {self.string_lit()}", f"{k} == input.resource.id", f"startswith({k}, \"doc\")"])]
        if r < 0.85:
            key = self.pick(["0", "1", '"doc-1"'])
            return [f"{key}, {self.string_lit()} in {self.coll_ref()}"]
        if r < 0.88 and self.rules:
            name, _ = self.pick(self.rules)
            return [f"{name} with input.user.name as {self.string_lit()}"]
        if r < 0.93:
            x = self.fresh()
            return [f"count([{x}.{self.pick(['id', 'ok', 'n'])} | some {x} in input.items]) "
                    f"{self.pick(['>', '==', '<'])} {self.rng.randint(0, 3)}"]
        if r < 0.96:
            x = self.fresh()
            return [f"count({{{x} | some {x} in input.user.roles; data.fzdata.roles[{x}]}}) > 0"]
        return [f"{self.string_ref()} == data.fzdata.owners[input.resource.id]"]

    def body(self) -> str:
        lits = []
        for _ in range(self.rng.randint(1, 3)):
            lits.extend(self.condition())
        return "{\n\t" + "\n\t".join(lits) + "\n}"

    # -- rules -------------------------------------------------------------------------

    def rule(self, i: int) -> None:
        name = f"r{i}"
        kind = self.rng.random()
        if kind < 0.30:
            if self.rng.random() < 0.4:
                self.lines.append(f"default {name} := false")
            self.lines.append(f"{name} if {self.body()}")
            if self.rng.random() < 0.3:
                self.lines.append(f"{name} if {self.body()}")
            self.rules.append((name, "bool"))
        elif kind < 0.45:
            t1, t2 = self.any_term(0), self.any_term(0)
            text = f"{name} := {t1} if {self.body()}"
            if self.rng.random() < 0.5:
                text += f" else := {t2} if {self.body()}"
            if self.rng.random() < 0.5:
                text += " else := \"none\""
            self.lines.append(text)
            self.rules.append((name, "value"))
        elif kind < 0.58:
            x = self.fresh()
            self.lines.append(self.pick([
                f"{name} contains {x} if {{\n\tsome {x} in {self.coll_ref()}\n\t{self.condition()[-1]}\n}}",
                f"{name} contains {self.string_term()} if {self.body()}",
                f"{name} contains sprintf(\"%s may %s\", [input.user.name, {x}]) if {{\n\tsome r in input.user.roles\n\tsome {x} in data.fzdata.roles[r]\n}}",
            ]))
            self.rules.append((name, "set"))
        elif kind < 0.64:
            k = self.fresh()
            self.lines.append(self.pick([
                f"{name}[{k}] := v if {{\n\tsome {k}, v in input.resource.tags\n\t{self.condition()[-1]}\n}}",
                f"{name}[{k}] := count(data.fzdata.roles[{k}]) if {{\n\tsome {k} in input.user.roles\n}}",
                f"{name}[{k}] contains p if {{\n\tsome {k} in input.user.roles\n\tsome p in data.fzdata.roles[{k}]\n}}",
            ]))
            self.rules.append((name, "object"))
        elif kind < 0.68:
            # A ref-head rule: referred to by its full path (a prefix is refused).
            self.lines.append(f"{name}.a.b := {self.any_term(0)} if {self.body()}")
            self.rules.append((f"{name}.a.b", "value"))
        elif kind < 0.78:
            x = self.fresh()
            self.lines.append(self.pick([
                f"{name} := [{x}.id | some {x} in input.items; {x}.ok]",
                f"{name} := {{{x} | some {x} in input.user.roles}}",
                f"{name} := {{{x}.id: {x}.n | some {x} in input.items}}",
                f"{name} := [{x} | some {x} in input.user.roles; not {x} in data.fzdata.blocked]",
                f"{name} := count([{x} | some {x} in input.items; {x}.n > 1])",
            ]))
            self.rules.append((name, "value"))
        elif kind < 0.88:
            f = f"f{i}"
            self.lines.append(self.pick([
                f"{f}(s) := true if {{\n\tstartswith(s, {self.string_lit()})\n}}",
                f"{f}(s) if s == {self.string_lit()}",
                f"{f}(s) := upper(s)",
                f"default {f}(_) := false\n\n{f}(s) if endswith(s, \"e\")",
                f"{f}(s) := x if {{\n\tx := data.fzdata.owners[s]\n}}",
            ]))
            self.funcs.append(f)
        else:
            self.lines.append(f"{name} := {self.any_term(0)}")
            self.rules.append((name, "value"))

    def module(self) -> str:
        for i in range(self.rng.randint(2, 6)):
            self.rule(i)
        parts = []
        if self.rules:
            for _ in range(self.rng.randint(1, 2)):
                n, kind = self.pick(self.rules)
                # count() only of collections: OPA's type checker refuses the rest.
                forms = [n, f"not {n}"] + ([f"count({n}) > 0"] if kind in ("set", "object") else [])
                parts.append(self.pick(forms))
        parts.extend(self.condition())
        self.lines.append("default allow := false")
        self.lines.append("allow if {\n\t" + "\n\t".join(parts) + "\n}")
        # `out`: [name, value] pairs of the rules that are defined, in one complete rule
        # (array comprehensions: a partial object would put `out` itself on the
        # interpreter, and the RVM is what most needs checking).
        parts = [f"[[{json.dumps(n)}, x] | x := {n}]" for n, _ in self.rules + [("allow", "")]]
        expr = parts[0]
        for p in parts[1:]:
            expr = f"array.concat({expr}, {p})"
        out = f"out := {expr}"
        return "package fz\n\n" + "\n\n".join(self.lines + [out]) + "\n"


def gen_input(rng: random.Random) -> dict:
    def maybe(v, p=0.85):
        return v if rng.random() < p else rng.choice([None, 1, "x", [], {}, True])

    doc: dict[str, Any] = {}
    user: dict[str, Any] = {}
    if rng.random() < 0.9:
        user["name"] = maybe(rng.choice(NAMES))
    if rng.random() < 0.85:
        user["roles"] = maybe(rng.sample(ROLES, rng.randint(0, 3)))
    if rng.random() < 0.7:
        user["age"] = maybe(rng.randint(-1, 40))
    if rng.random() < 0.95:
        doc["user"] = maybe(user, 0.95)
    if rng.random() < 0.9:
        doc["action"] = maybe(rng.choice(ACTIONS))
    res: dict[str, Any] = {}
    if rng.random() < 0.9:
        res["path"] = maybe(rng.choice(PATHS))
    if rng.random() < 0.7:
        res["id"] = maybe(rng.choice(["doc-1", "doc-2", "doc-3"]))
    if rng.random() < 0.6:
        res["owner"] = maybe(rng.choice(NAMES))
    if rng.random() < 0.6:
        res["tags"] = maybe({k: rng.choice(NAMES + ["x"]) for k in rng.sample(["doc-1", "team", "env", "a"], rng.randint(0, 3))})
    doc["resource"] = maybe(res, 0.95)
    if rng.random() < 0.8:
        doc["ip"] = rng.choice(IPS)
    if rng.random() < 0.5:
        doc["cidr"] = rng.choice(["10.1.0.0/16", "::/0", "0.0.0.0/0", "::ffff:10.0.0.0/104", "bad"])
    if rng.random() < 0.8:
        doc["time"] = rng.choice(TIMES)
    if rng.random() < 0.6:
        doc["token"] = rng.choice(['{"sub": "alice"}', '{"sub": 1}', "YWxpY2U=", "not json", '"\\ud800"'])
    if rng.random() < 0.7:
        doc["items"] = maybe([{k: v for k, v in (("id", f"i{j}"), ("ok", rng.choice([True, False])),
                                                   ("n", rng.randint(0, 3))) if rng.random() < 0.8}
                              for j in range(rng.randint(0, 3))])
    if rng.random() < 0.3:
        doc["amount"] = maybe(rng.choice([0, 5, 2.5, -3]))
    if rng.random() < 0.3:
        doc["groups"] = maybe(rng.sample(["a", "b", "c"], rng.randint(0, 2)))
    if rng.random() < 0.3:
        doc["headers"] = {"origin": rng.choice(["https://a", "", "x"])}
    return doc


# -- comparison ------------------------------------------------------------------------

def exact(v: Any) -> Any:
    return json.loads(json.dumps(v), parse_float=Decimal, parse_int=Decimal)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, Decimal) or isinstance(b, Decimal):
        return isinstance(a, Decimal) and isinstance(b, Decimal) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


ABSENT = object()
# OPA raised a builtin error for this rule: the bindings evaluate with strict builtin
# errors, where OPA's default (and nexus) make the failing call undefined and evaluate
# on; what default OPA answers is then unknown here, so the rule is not compared.
UNKNOWN = object()


def opa_out(engine: OpaEngine, names: list[str], doc: dict) -> dict:
    """OPA's value of each rule (ABSENT: undefined or a builtin error), or raises."""
    out = {}
    for n in names:
        try:
            out[n] = engine.eval_document(f"fz.{n}", doc)
        except OpaUndefinedError:
            out[n] = ABSENT
        except OpaError as e:
            if e.code in ("prepare_error", "add_policy_error", "parse_error") or any(
                    k in e.message for k in ("rego_type_error", "rego_compile_error", "rego_parse_error",
                                             "rego_unsafe_var_error", "rego_recursion_error")):
                raise
            if "eval_builtin_error" in e.message or ("eval_type_error" in e.message and ": operand " in e.message):
                out[n] = UNKNOWN
            else:
                out[n] = ("error", e.message.splitlines()[0][:200])
    return out


def run_nexus(nexusctl: str, work: Path, docs: list[dict], mode: str) -> list[dict]:
    inputs = work / "inputs.jsonl"
    inputs.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cmd = [nexusctl, "policy", "eval", "--dir", str(work / "policy"), "--inputs", str(inputs),
           "--rule", "data.fz.out", "--value", "--mode", mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return [{"compile_error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
                 "exit": proc.returncode}] * len(docs)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    if len(lines) != len(docs):
        return [{"compile_error": f"nexusctl printed {len(lines)} lines for {len(docs)} inputs (crash?)",
                 "exit": proc.returncode}] * len(docs)
    return lines


# Differences listed in docs/opa-compatibility.md that the generator reaches: (pattern
# of nexus's error, the difference). Errors on nexus's side, so a deny: never a
# fail-open.
KNOWN = [
    # Arithmetic on a non-number: the interpreter's and the RVM's messages.
    (re.compile(r"`(add|sub|mul|div|rem)` expects numeric argument"), "arithmetic on a non-number"),
    (re.compile(r"Cannot (add|subtract|multiply|divide|modulo|mod)\b"), "arithmetic on a non-number"),
]


def known(nexus: dict) -> str | None:
    text = nexus.get("error") or ""
    for pattern, case in KNOWN:
        if pattern.search(text):
            return case
    return None


def truthy(v: Any) -> bool:
    return v is not ABSENT and v is not False and not (isinstance(v, tuple))


def compare(names: list[str], opa: dict, nexus: dict) -> list[tuple[str, str, str, bool]]:
    """Mismatching rules: (rule, opa, nexus, fail_open)."""
    if "compile_error" in nexus or "error" in nexus or "undefined" in nexus:
        what = nexus.get("compile_error") or nexus.get("error") or "out is undefined"
        # No value at all: a deny. A mismatch only where OPA has a value.
        if any(v is not ABSENT and v is not UNKNOWN for v in opa.values()):
            return [("out", json.dumps({k: v for k, v in opa.items() if v is not ABSENT and v is not UNKNOWN}, default=str)[:200],
                     f"no value ({what[:200]})", False)]
        return []
    got = nexus.get("value", [])
    if isinstance(got, list):
        got = {pair[0]: pair[1] for pair in got if isinstance(pair, list) and len(pair) == 2}
    diffs = []
    for n in names:
        o = opa.get(n, ABSENT)
        if o is UNKNOWN:
            continue
        v = got.get(n, ABSENT) if isinstance(got, dict) else ABSENT
        if isinstance(o, tuple):  # an OPA evaluation error (a conflict): no value
            o_cmp = ABSENT
        else:
            o_cmp = o
        if o_cmp is ABSENT and v is ABSENT:
            continue
        if o_cmp is not ABSENT and v is not ABSENT and same(exact(o_cmp), exact(v)):
            continue
        fail_open = (v is True and o_cmp is not True) or (n == "allow" and v is True and o_cmp is not True)
        show = lambda x: "undefined" if x is ABSENT else json.dumps(x)[:200]
        diffs.append((n, show(o) if not isinstance(o, tuple) else f"error {o[1]}", show(v), fail_open))
    return diffs


def regression_yaml(name: str, module: str, doc: dict) -> str:
    indented = "\n".join("      " + line if line else "" for line in module.splitlines())
    return (f"  - name: {name}\n    query: data.fz.out\n    input: {json.dumps(doc)}\n"
            f"    policy: |\n{indented}\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nexusctl", default=str(REPO / "target/debug/nexusctl"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--cases", type=int, default=None, help="stop after this many cases")
    ap.add_argument("--inputs", type=int, default=4, help="inputs per case")
    ap.add_argument("--regressions", type=Path, help="append mismatches as differential cases")
    ap.add_argument("--verbose", "-v", action="store_true")
    args = ap.parse_args()
    budget = args.seconds if args.seconds is not None else (args.minutes or 1.0) * 60
    rng = random.Random(args.seed)
    started = time.monotonic()
    cases = skipped = refused = mismatches = fail_opens = evaluations = listed = 0
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "policy").mkdir()
        (work / "policy" / "data.json").write_text(json.dumps(DATA))
        while time.monotonic() - started < budget and (args.cases is None or cases < args.cases):
            case_seed = rng.randrange(1 << 32)
            crng = random.Random(case_seed)
            gen = Gen(crng)
            module = gen.module()
            names = [n for n, _ in gen.rules] + ["allow"]
            docs = [gen_input(crng) for _ in range(args.inputs)]
            engine = OpaEngine()
            try:
                engine.add_policy("fz.rego", module)
                engine.add_data(DATA)
                opa = [opa_out(engine, names, d) for d in docs]
            except OpaError as e:
                skipped += 1
                if args.verbose:
                    print(f"skip (OPA refuses: {e.message.splitlines()[0][:120]})")
                continue
            finally:
                engine.close()
            (work / "policy" / "fz.rego").write_text(module)
            cases += 1
            case_bad = False
            for mode in ("auto", "interpreted"):
                outs = run_nexus(args.nexusctl, work, docs, mode)
                if outs and "refused at load" in outs[0].get("compile_error", ""):
                    # Refused at load with file:line and what to write instead: the
                    # documented answer to what nexus cannot evaluate as OPA does.
                    refused += 1
                    if args.verbose:
                        print(f"refused: {outs[0]['compile_error'][:200]}")
                    break
                for i, (doc, o, n) in enumerate(zip(docs, opa, outs)):
                    evaluations += 1
                    diffs = compare(names, o, n)
                    if not diffs:
                        continue
                    if known(n):
                        listed += 1
                        continue
                    mismatches += 1
                    fo = any(d[3] for d in diffs)
                    fail_opens += fo
                    case_bad = True
                    print(f"\n{'FAIL-OPEN ' if fo else ''}MISMATCH seed {args.seed} case-seed {case_seed} mode {mode} input {i}")
                    print(f"  input: {json.dumps(doc)}")
                    for rule, ov, nv, f in diffs:
                        print(f"  {rule}: opa {ov} | nexus {nv}{'  <- fail-open' if f else ''}")
                    found.append((case_seed, i, module, doc))
            if case_bad:
                print("  module:\n" + "\n".join("    " + l for l in module.splitlines()))
    if args.regressions and found:
        seen = set()
        with args.regressions.open("a", encoding="utf-8") as f:
            for case_seed, i, module, doc in found:
                key = (case_seed, i)
                if key in seen:
                    continue
                seen.add(key)
                f.write(regression_yaml(f"fuzz-{case_seed}-{i}", module, doc))
    elapsed = time.monotonic() - started
    print(f"\nfuzz seed {args.seed}: {cases} cases ({skipped} skipped: OPA refuses the module; "
          f"{refused} refused at load by nexus), "
          f"{evaluations} evaluations (default mode and interpreter), {listed} listed differences, "
          f"{mismatches} mismatches, "
          f"{fail_opens} fail-open, in {elapsed:.1f}s")
    print(f"{evaluations - mismatches} passed, {mismatches} failed")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
