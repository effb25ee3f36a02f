#!/usr/bin/env python3
"""Conformance with OPA: every decision policy in a policy folder, evaluated over
generated inputs by nexus (`nexusctl policy eval`, regorus) and by OPA 1.20 (PyPI
`opa-golib-python-bindings`, OPA's Go library); every decision must match.

    python3 tests/opa/conformance.py --nexusctl target/debug/nexusctl --policies policies

The folder is loaded for OPA the way `opa eval -d DIR` loads it: every `.rego` module
(tests included), and each `.json`/`.yaml`/`.yml` file's content placed at
`data.<its folder path>` (YAML parsed by OPA's own `yaml.unmarshal`, i.e. the same
YAML library as OPA's loader). Hidden files and folders are skipped, as nexus does.

A decision policy is a package with a `decision` rule. Inputs come from a generator
registered for the package in GENERATORS (seeded, so a run is reproducible); a package
without one is skipped with a message. A generator also gives the runtime data
(`{"nexus": {"executions": ..., "revoked": ...}}`) each input is evaluated with: nexus
gets it with `--data runtime.json` (one call per runtime scenario, all inputs at once),
OPA as part of its data document (overlaid on the folder's data the way the sidecar
overlays it: runtime keys win).

Compared: `allow`, and `reasons` as sorted lists. An evaluation error or undefined
decision is a deny with an error on both sides and matches only an error of the same
kind. Every mismatch prints its input, the runtime scenario and both decisions; the
exit status is 1 on any mismatch. The last line is "N passed, M failed".

Note on builtin errors: the bindings evaluate with strict builtin errors (a failing
builtin such as `time.parse_rfc3339_ns("x")` raises), whereas OPA's default (and
regorus) treats the call as undefined. A strict error is reported as a mismatch with a
hint: it means the input reaches a builtin that OPA's Go implementation rejects; if
nexus returned a normal decision, regorus accepted the value, which OPA would not.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

try:
    from opa_bindings import OpaEngine, OpaError, OpaUndefinedError
except ImportError:  # pragma: no cover - reported with the fix
    print(
        "conformance: the OPA bindings are not importable (module `opa_bindings`);"
        " run scripts/install-test-deps.sh (pip install --ignore-requires-python"
        " opa-golib-python-bindings)",
        file=sys.stderr,
    )
    sys.exit(2)

DATA_EXTENSIONS = (".json", ".yaml", ".yml")

# --------------------------------------------------------------------------------------
# Loading a policy folder like `opa eval -d DIR`
# --------------------------------------------------------------------------------------


@dataclass
class Folder:
    root: Path
    modules: list[tuple[str, str]]  # (path relative to root, text), every .rego
    data: dict

    def decision_packages(self) -> list[str]:
        """Packages of non-test modules that define a `decision` rule."""
        found = []
        for rel, text in self.modules:
            if rel.endswith("_test.rego"):
                continue
            pkg = re.search(r"^package\s+([A-Za-z_][\w.]*)", text, re.M)
            if pkg and re.search(r"^(?:default\s+)?decision\b", text, re.M):
                if pkg.group(1) not in found:
                    found.append(pkg.group(1))
        return sorted(found)


class LoadError(Exception):
    pass


def load_folder(root: Path, yaml_engine: OpaEngine) -> Folder:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.endswith((".rego",) + DATA_EXTENSIONS):
                files.append(Path(dirpath, name).relative_to(root))
    modules, data = [], {}
    for rel in sorted(files):
        text = (root / rel).read_text(encoding="utf-8")
        if rel.suffix == ".rego":
            modules.append((rel.as_posix(), text))
            continue
        if rel.suffix == ".json":
            value = json.loads(text)
        else:
            # OPA's own YAML decoding (the library its loader uses).
            rows = yaml_engine.eval_query("x := yaml.unmarshal(input.text)", {"text": text})
            value = rows[0]["x"] if rows else None
        for part in reversed(rel.parent.parts):
            value = {part: value}
        try:
            deep_merge(data, value)
        except LoadError as e:
            raise LoadError(f"{root / rel}: conflicts with another data file at data.{e}") from None
    return Folder(root, modules, data)


def deep_merge(dst: dict, src: Any, path: str = "") -> None:
    """OPA's loader merge: objects merge, anything else conflicts."""
    if not isinstance(src, dict):
        raise LoadError(path or "<root>")
    for k, v in src.items():
        here = f"{path}.{k}" if path else k
        if k in dst:
            if isinstance(dst[k], dict) and isinstance(v, dict):
                deep_merge(dst[k], v, here)
            else:
                raise LoadError(here)
        else:
            dst[k] = v


def overlay(dst: dict, src: dict) -> dict:
    """The sidecar's runtime-data overlay: runtime keys replace the folder's, key by
    key, descending only into objects both have."""
    out = dict(dst)
    for k, v in src.items():
        if isinstance(out.get(k), dict) and isinstance(v, dict):
            out[k] = overlay(out[k], v)
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------------------
# Generators: per package, the inputs and the runtime data they are evaluated with
# --------------------------------------------------------------------------------------


@dataclass
class Case:
    kind: str  # what the generator aimed at (shown on a mismatch)
    scenario: str  # key into Corpus.runtimes
    input: dict


@dataclass
class Corpus:
    # Runtime scenarios: name -> runtime data document, or None for "no runtime data".
    runtimes: dict[str, dict | None]
    cases: list[Case] = field(default_factory=list)
    # Optional: the part of the runtime data an input depends on, shown on a mismatch.
    relevant: Callable[[dict, dict | None], dict] | None = None


UTC = timezone.utc
# The fixed "now" of every generated request, so a run is reproducible.
NOW = datetime(2026, 11, 26, 9, 41, 7, 123000, tzinfo=UTC)


def ms_time(t: datetime) -> str:
    """input.time as the sidecar writes it (RFC 3339 UTC, milliseconds)."""
    t = t.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def ns(t: datetime) -> int:
    return (int(t.timestamp()) * 1_000_000_000) + t.microsecond * 1000


# Spellings of an execution's `not_after`. Every one of them is RFC 3339 that the
# sidecar's state loader accepts (the `time` crate's Rfc3339), i.e. what the policy can
# see in data.nexus.executions.
def _spell_canonical(t):
    return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t.microsecond == 0 else ms_time(t)


def _spell_nanos(t):
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond:06d}000Z"


def _spell_offset(t):
    return t.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat(timespec="milliseconds")


def _spell_negative_offset(t):
    spec = "milliseconds" if t.microsecond else "seconds"
    return t.astimezone(timezone(timedelta(hours=-8))).isoformat(timespec=spec)


def _spell_minus_zero(t):
    return _spell_canonical(t)[:-1] + "-00:00"


def _spell_lowercase(t):
    # RFC 3339 §5.6 allows lowercase `t` and `z`.
    return _spell_canonical(t).replace("T", "t").replace("Z", "z")


def _spell_space(t):
    # RFC 3339 §5.6 NOTE: a space may replace `T`.
    return _spell_canonical(t).replace("T", " ")


def _spell_picoseconds(t):
    return _spell_nanos(t)[:-1] + "999Z"  # 12 fraction digits: both truncate to 9


NOT_AFTER_SPELLINGS: list[tuple[str, Callable[[datetime], str]]] = [
    ("canonical", _spell_canonical),
    ("nanoseconds", _spell_nanos),
    ("picoseconds", _spell_picoseconds),
    ("+05:30", _spell_offset),
    ("-08:00", _spell_negative_offset),
    ("-00:00", _spell_minus_zero),
    # Not here: lowercase t/z and a space for T. regorus (chrono) accepts them, Go's
    # RFC 3339 parser (OPA) does not; the sidecar rewrites every not_after it loads in
    # the canonical spelling (sidecar/src/policy/runtime.rs), so policies never see them.
]


def authz_corpus(folder: Folder, n: int, rng: random.Random) -> Corpus:
    """Inputs for nexus.authz (the reference policy): the sidecar's input document
    (DESIGN.md "Policy input", sidecar/src/policy/input.rs) with every field present
    and typed as the sidecar types it, varied over bound/unbound clauses, open,
    expired, forged and missing executions, methods, revoked workloads, public and
    unknown paths, odd strings and request times."""
    nexus = folder.data.get("nexus", {})
    # A binding is a list of clauses or an object {clauses, budgets} (docs/anomaly.md):
    # the generator needs the clauses; the policy sees the data as written.
    bindings: dict[str, list] = {
        plugin: (b.get("clauses") or []) if isinstance(b, dict) else list(b or [])
        for plugin, b in (nexus.get("bindings") or {}).items()
    }
    public_paths = [p for p in nexus.get("public_paths") or [] if isinstance(p, str)]
    plugins = sorted(bindings)
    if not plugins:
        raise LoadError("nexus.authz generator: data.nexus.bindings is empty")
    bound_pairs = [(p, c) for p in plugins for c in bindings[p] if isinstance(c, str)]
    all_bound_clauses = sorted({c for _, c in bound_pairs})

    rogue = "spiffe://nexus.local/ns/plugins/sa/rogue-model"
    hazard = "spiffe://nexus.local/ns/data/sa/hazard-api"
    retired = "spiffe://nexus.local/ns/data/sa/retired-api"
    revoked_plugin = plugins[-1]  # revoked in the "runtime" scenario only
    reinstated = "spiffe://nexus.local/ns/plugins/sa/reinstated-model"
    nulled = "spiffe://nexus.local/ns/plugins/sa/nulled-model"
    odd_strings = [
        "",
        " ",
        "c-ﬂood-17",  # ligature
        "C-FLOOD-17",
        "c-flood-17 ",
        "clause-\u00e9\u0301",  # combining accent
        "\u202ec-flood-17",  # right-to-left override
        "雨量-😀",
        "a\u0000b",
        "%s %v %d",
        "\"quoted\" \\ back",
        "x" * 300,
    ]
    unbound_clauses = ["c-flood-99", "c-quake-3", "c-flood-1"] + odd_strings[:6]
    methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "get", "Get", "", "ＧＥＴ"]

    # Executions (the runtime data the gateway pushes). `at` is the parsed instant.
    execs: dict[str, dict] = {}
    at: dict[str, datetime] = {}

    def add_exec(ex_id, plugin, clause, end, spelling=None):
        name, spell = spelling or NOT_AFTER_SPELLINGS[0]
        # not_after_ns: the sidecar parses not_after once at load (runtime.rs).
        execs[ex_id] = {"id": ex_id, "plugin": plugin, "clause": clause, "not_after": spell(end),
                        "not_after_ns": ns(end)}
        at[ex_id] = end

    for k, (plugin, clause) in enumerate(bound_pairs):
        # Open, in every spelling (whole seconds and milliseconds).
        for s, spelling in enumerate(NOT_AFTER_SPELLINGS):
            # The canonical one ends last (after the leap second below), so it is the
            # one the sidecar resolves when a request names no execution.
            later = timedelta(days=30) if s == 0 else timedelta(hours=len(NOT_AFTER_SPELLINGS) - s)
            end = NOW + later + timedelta(milliseconds=250 * (k % 2))
            add_exec(f"ex-open-{k}-{spelling[0].replace(':', '')}", plugin, clause, end, spelling)
        add_exec(f"ex-expired-{k}", plugin, clause, NOW - timedelta(minutes=5))
        add_exec(f"ex-edge-{k}", plugin, clause, NOW)  # not_after == request time: closed
        add_exec(f"ex-edge-plus-{k}", plugin, clause, NOW + timedelta(milliseconds=1))
        add_exec(f"ex-expired-lc-{k}", plugin, clause, NOW - timedelta(hours=1), NOT_AFTER_SPELLINGS[-1])
        # A leap second (23:59:60Z) reaches policies as the sidecar rewrites it: the
        # `time` crate reads it as 23:59:59.999999999 and the canonical spelling follows.
        execs[f"ex-leap-{k}"] = {"id": f"ex-leap-{k}", "plugin": plugin, "clause": clause,
                                 "not_after": "2026-11-30T23:59:59.999999999Z",
                                 "not_after_ns": ns(datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)) + 999_999_999}
        at[f"ex-leap-{k}"] = datetime(2026, 11, 30, 23, 59, 59, 999999, tzinfo=UTC)
    add_exec("ex-rogue", rogue, all_bound_clauses[0], NOW + timedelta(hours=2))
    add_exec("ex-unbound-clause", plugins[0], "c-flood-99", NOW + timedelta(hours=2))
    add_exec("ex-ünï-😀", plugins[0], bindings[plugins[0]][-1], NOW + timedelta(hours=3))
    add_exec("", plugins[0], bindings[plugins[0]][0], NOW + timedelta(hours=3))
    exec_ids = sorted(execs)

    revoked = {
        revoked_plugin: {"reason": "anomaly: exfiltration", "by": "gateway", "at": "2026-11-26T09:00:00Z"},
        retired: {"reason": "manual", "by": "ops@example.com", "at": "2026-11-25T00:00:00Z"},
        "spiffe://nexus.local/ns/plugins/sa/ünïcode-😀": {},
        "": {"reason": "empty id"},
        # Details are whatever the state says: `false` does not revoke (the reference
        # `data.nexus.revoked[id]` is false), `null` does (a defined, non-false value).
        reinstated: False,
        nulled: None,
    }
    runtimes = {
        "runtime": {"nexus": {"executions": execs, "revoked": revoked}},
        "runtime-no-revocations": {"nexus": {"executions": execs, "revoked": {}}},
        "no-runtime-data": None,
    }
    scenario_names = list(runtimes)
    scenario_weights = [0.6, 0.25, 0.15]

    def resolve(scenario, plugin, clause, now_ns, named):
        """The sidecar's input.execution (input.rs + runtime.rs `execution_for`)."""
        has = runtimes[scenario] is not None
        if named is not None:
            if has and named in execs:
                return dict(execs[named])
            return {"id": named}
        if not has or clause is None:
            return None
        open_ = [i for i in exec_ids if execs[i]["plugin"] == plugin and execs[i]["clause"] == clause]
        open_.sort(key=lambda i: ns(at[i]), reverse=True)
        for i in open_:
            if ns(at[i]) > now_ns:
                return dict(execs[i])
        return None

    def seg_quote(s):
        return quote(s, safe="-._~!$&'()*+,=:@")

    def request(method, segments):
        path = "/" + "/".join(seg_quote(s) for s in segments) if segments else "/"
        return {
            "method": method,
            "path": path,
            "segments": segments,
            "query": rng.choice([{}, {"from": ["2026-01-01"]}, {"y": ["2", "1"], "flag": [""]}]),
            "headers": rng.choice([{}, {"content-type": "application/json"}]),
            "body_size": rng.choice([0, 0, -1, 512]),
        }

    def clause_of(segments):
        if "clauses" in segments:
            at_ = segments.index("clauses")
            if at_ + 1 < len(segments):
                return segments[at_ + 1]
        return None

    def doc(scenario, source, destination, method, segments, when, execution="resolve",
            clause="from-path"):
        clause_v = clause_of(segments) if clause == "from-path" else clause
        now_ns = ns(when)
        if execution == "resolve":
            execution = resolve(scenario, source, clause_v, now_ns, None)
        elif isinstance(execution, tuple) and execution[0] == "named":
            execution = resolve(scenario, source, clause_v, now_ns, execution[1])
        return {
            "direction": rng.choice(["inbound", "outbound"]),
            "source": {"spiffe_id": source},
            "destination": {"spiffe_id": destination},
            "request": request(method, segments),
            "clause": clause_v,
            "execution": execution,
            "time": ms_time(when),
            "time_ns": now_ns,
        }

    def tail():
        return rng.choice([["rainfall"], ["rainfall", "2026"], [], ["a b", "café"]])

    def clause_path(clause):
        return rng.choice([["clauses"], ["api", "clauses"]]) + [clause] + tail()

    def other_paths():
        near = [["healthz", ""], ["HEALTHZ"], ["healthz", "x"], ["metrics"], [], ["clauses"],
                ["clause", "c-flood-17"], ["api", "v1", "clauses"], ["😀"], ["..."]]
        pub = [[s for s in p.split("/") if s] for p in public_paths]
        return rng.choice(pub * 3 + near) if pub else rng.choice(near)

    # Each kind aims at one part of the policy; the rest is drawn at random.
    def k_granted(sc):
        p, c = rng.choice(bound_pairs)
        return doc(sc, p, hazard, rng.choice(["GET", "HEAD"]), clause_path(c), NOW)

    def k_method(sc):
        p, c = rng.choice(bound_pairs)
        return doc(sc, p, hazard, rng.choice(methods), clause_path(c), NOW)

    def k_expired(sc):
        p, c = rng.choice(bound_pairs)
        k = bound_pairs.index((p, c))
        mode = rng.randrange(4)
        if mode == 0:  # named, expired
            return doc(sc, p, hazard, "GET", clause_path(c), NOW,
                       ("named", rng.choice([f"ex-expired-{k}", f"ex-edge-{k}", f"ex-expired-lc-{k}"])))
        if mode == 1:  # a later request: every execution has ended
            return doc(sc, p, hazard, "GET", clause_path(c), NOW + timedelta(days=rng.choice([31, 400])))
        if mode == 2:  # just before / at / just after the edge
            when = NOW + timedelta(milliseconds=rng.choice([-1, 0, 1, 2]))
            return doc(sc, p, hazard, "GET", clause_path(c), when, ("named", f"ex-edge-plus-{k}"))
        # the resolved (open) execution, sent back at a time after it ended
        d = doc(sc, p, hazard, "GET", clause_path(c), NOW)
        later = NOW + timedelta(hours=rng.choice([2, 5, 9]))
        d["time"] = ms_time(later)
        d["time_ns"] = ns(later)
        return d

    def k_forged(sc):
        p, c = rng.choice(bound_pairs)
        mode = rng.randrange(4)
        if mode == 0:  # an id the gateway never opened
            return doc(sc, p, hazard, "GET", clause_path(c), NOW,
                       ("named", rng.choice(["ex-forged", "ex-open-0", "EX-OPEN-0-canonical", "ex-ünï"])))
        if mode == 1:  # someone else's execution, or one for another clause
            return doc(sc, p, hazard, "GET", clause_path(c), NOW, ("named", rng.choice(exec_ids)))
        if mode == 2:  # an input that lies about the execution's fields
            ex = {"id": rng.choice(exec_ids), "plugin": p, "clause": c, "not_after": "2099-01-01T00:00:00Z"}
            return doc(sc, p, hazard, "GET", clause_path(c), NOW, ex)
        ex = rng.choice([{"id": "ex-forged"}, {"id": ""}, {}, {"id": None}, {"clause": c}])
        return doc(sc, p, hazard, "GET", clause_path(c), NOW, ex)

    def k_missing(sc):
        p, c = rng.choice(bound_pairs)
        return doc(sc, p, hazard, rng.choice(["GET", "HEAD", "POST"]), clause_path(c), NOW, None)

    def k_unbound(sc):
        if rng.random() < 0.5:
            p = rng.choice(plugins)
            c = rng.choice(unbound_clauses + [x for x in all_bound_clauses if x not in bindings[p]])
            return doc(sc, p, hazard, "GET", clause_path(c), NOW,
                       rng.choice(["resolve", ("named", "ex-unbound-clause")]))
        return doc(sc, rogue, hazard, "GET", clause_path(rng.choice(all_bound_clauses)), NOW,
                   rng.choice(["resolve", ("named", "ex-rogue"), None]))

    def k_revoked(sc):
        p, c = rng.choice(bound_pairs)
        if rng.random() < 0.5:
            p = revoked_plugin
            c = rng.choice(bindings[p])
        dest = rng.choice([hazard, retired, reinstated, nulled])
        return doc(sc, p, dest, rng.choice(["GET", "POST"]), rng.choice([clause_path(c), other_paths()]), NOW)

    def k_public(sc):
        src = rng.choice(plugins + [rogue, revoked_plugin, reinstated, nulled, ""])
        return doc(sc, src, rng.choice([hazard, retired]), rng.choice(methods), other_paths(), NOW,
                   rng.choice(["resolve", None, ("named", rng.choice(exec_ids))]))

    def k_null_clause(sc):
        # A clause path as the policy may see it with no clause resolved.
        p, c = rng.choice(bound_pairs)
        segs = rng.choice([clause_path(c), other_paths()])
        return doc(sc, p, hazard, rng.choice(["GET", "HEAD"]), segs, NOW, rng.choice(["resolve", None]), None)

    def k_odd(sc):
        p, c = rng.choice(bound_pairs)
        src, dest, method, clause = p, hazard, "GET", c
        execution = "resolve"
        for _ in range(rng.randint(1, 2)):
            what = rng.randrange(6)
            if what == 0:
                src = rng.choice(odd_strings + ["spiffe://nexus.local/ns/plugins/sa/ünïcode-😀"])
            elif what == 1:
                dest = rng.choice(odd_strings)
            elif what == 2:
                method = rng.choice(odd_strings)
            elif what == 3:
                clause = rng.choice(odd_strings)
            elif what == 4:
                execution = ("named", rng.choice(odd_strings + ["ex-ünï-😀", ""]))
            else:
                return doc(sc, src, dest, method, [rng.choice(odd_strings) or "x"], NOW, None)
        return doc(sc, src, dest, method, clause_path(clause), NOW, execution)

    time_turns = itertools.count()

    def k_time(sc):
        p, c = rng.choice(bound_pairs)
        delta = rng.choice([
            timedelta(0), timedelta(milliseconds=-1), timedelta(minutes=59, seconds=59, milliseconds=999),
            timedelta(hours=1), timedelta(hours=1, milliseconds=250), timedelta(hours=3, minutes=30),
            timedelta(hours=6, milliseconds=999), timedelta(hours=8), timedelta(days=5),
            timedelta(days=30), timedelta(days=30, milliseconds=250), timedelta(days=-400),
            timedelta(days=365 * 30),
        ])
        when = NOW + delta
        k = bound_pairs.index((p, c))
        # Every spelling in turn, then the leap second, then the sidecar's choice.
        turn = next(time_turns) % (len(NOT_AFTER_SPELLINGS) + 2)
        if turn < len(NOT_AFTER_SPELLINGS):
            execution = ("named", f"ex-open-{k}-{NOT_AFTER_SPELLINGS[turn][0].replace(':', '')}")
        else:
            execution = ("named", f"ex-leap-{k}") if turn == len(NOT_AFTER_SPELLINGS) else "resolve"
        return doc(sc, p, hazard, "GET", clause_path(c), when, execution)

    def k_random(sc):
        src = rng.choice(plugins + [rogue, revoked_plugin] + odd_strings[:3])
        clause = rng.choice(all_bound_clauses + unbound_clauses)
        segs = rng.choice([clause_path(clause), other_paths()])
        when = NOW + timedelta(minutes=rng.randint(-90, 600))
        execution = rng.choice(["resolve", None, ("named", rng.choice(exec_ids + ["ex-forged"]))])
        return doc(sc, src, rng.choice([hazard, retired, ""]), rng.choice(methods), segs, when, execution)

    kinds = [k_granted, k_method, k_expired, k_forged, k_missing, k_unbound, k_revoked,
             k_public, k_null_clause, k_odd, k_time, k_random]
    def relevant(d, runtime):
        if runtime is None:
            return {}
        rt = runtime["nexus"]
        ex = d.get("execution")
        ex_id = ex.get("id") if isinstance(ex, dict) else None
        out = {}
        if isinstance(ex_id, str) and ex_id in rt["executions"]:
            out[f"data.nexus.executions[{json.dumps(ex_id, ensure_ascii=False)}]"] = rt["executions"][ex_id]
        for who in ("source", "destination"):
            wid = d[who]["spiffe_id"]
            if wid in rt["revoked"]:
                out[f"data.nexus.revoked[{json.dumps(wid, ensure_ascii=False)}]"] = rt["revoked"][wid]
        return out

    corpus = Corpus(runtimes, relevant=relevant)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        scenario = rng.choices(scenario_names, scenario_weights)[0]
        corpus.cases.append(Case(kind.__name__[2:], scenario, kind(scenario)))
    return corpus


# package -> generator(folder, n, rng) -> Corpus. Add one per decision policy.
GENERATORS: dict[str, Callable[[Folder, int, random.Random], Corpus]] = {
    "nexus.authz": authz_corpus,
}

# --------------------------------------------------------------------------------------
# Evaluation and comparison
# --------------------------------------------------------------------------------------


def decision_from(value: Any) -> dict:
    """What nexus makes of a decision value (crates/policy engine.rs `decision_from`)."""
    if not isinstance(value, dict) or not isinstance(value.get("allow"), bool):
        return {"allow": False, "reasons": [], "error": "malformed",
                "detail": f"policy decision has no boolean `allow`: {json.dumps(value)}"}
    reasons = value.get("reasons")
    if reasons is None:
        reasons = []
    elif not isinstance(reasons, list):
        reasons = [reasons]
    reasons = [r if isinstance(r, str) else json.dumps(r, separators=(",", ":")) for r in reasons]
    return {"allow": value["allow"], "reasons": reasons, "error": None}


def opa_decide(engine: OpaEngine, path: str, doc: dict) -> dict:
    try:
        return decision_from(engine.eval_document(path, doc))
    except OpaUndefinedError:
        return {"allow": False, "reasons": [], "error": "undefined", "detail": "decision is undefined"}
    except OpaError as e:
        kind = "builtin_error" if "eval_builtin_error" in e.message else "error"
        return {"allow": False, "reasons": [], "error": kind, "detail": f"{e.code}: {e.message}"}


def nexus_kind(d: dict) -> dict:
    error = d.get("error")
    if error is None:
        return {"allow": d.get("allow"), "reasons": list(d.get("reasons") or []), "error": None}
    if "undefined" in error:
        kind = "undefined"
    elif "no boolean `allow`" in error:
        kind = "malformed"
    else:
        kind = "error"
    return {"allow": d.get("allow"), "reasons": [], "error": kind, "detail": error}


def same(a: dict, b: dict) -> bool:
    if a["error"] or b["error"]:
        return a["error"] == b["error"] and a["allow"] is False and b["allow"] is False
    return a["allow"] == b["allow"] and sorted(a["reasons"]) == sorted(b["reasons"])


def run_nexus(nexusctl: str, policies: Path, rule: str, docs: list[dict], runtime: dict | None,
              work: Path, tag: str) -> list[dict]:
    inputs = work / f"{tag}.inputs.jsonl"
    inputs.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    cmd = [nexusctl, "policy", "eval", "--dir", str(policies), "--inputs", str(inputs), "--rule", rule]
    if runtime is not None:
        data = work / f"{tag}.runtime.json"
        data.write_text(json.dumps(runtime, ensure_ascii=False, indent=1), encoding="utf-8")
        cmd += ["--data", str(data)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr}")
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    if len(out) != len(docs):
        raise RuntimeError(f"nexusctl printed {len(out)} decisions for {len(docs)} inputs")
    return out


def opa_version() -> str:
    """The bindings' version and the OPA module version built into their library."""
    import importlib.metadata

    import opa_bindings

    lib = Path(opa_bindings.__file__).with_name("libopabridge.so")
    found = re.search(rb"open-policy-agent/opa@(v[0-9][0-9.]*)", lib.read_bytes()) if lib.exists() else None
    opa = found.group(1).decode() if found else "unknown"
    return f"opa-golib-python-bindings {importlib.metadata.version('opa-golib-python-bindings')} (OPA {opa})"


def opa_engine(folder: Folder, runtime: dict | None) -> OpaEngine:
    engine = OpaEngine()
    for rel, text in folder.modules:
        engine.add_policy(rel, text)
    engine.add_data(overlay(folder.data, runtime) if runtime else folder.data)
    return engine


def hint(case: Case, nexus: dict, opa: dict) -> str | None:
    if opa["error"] == "builtin_error":
        return ("OPA's Go builtin rejected a value (strict builtin errors in the bindings; "
                "OPA's default makes the call undefined). nexus "
                + ("errored too" if nexus["error"] else "returned a decision, so regorus accepted the value"))
    return None


def check_package(args, folder: Folder, package: str, work: Path) -> tuple[int, int]:
    rule = f"data.{package}.decision"
    generator = GENERATORS.get(package)
    if generator is None:
        print(f"SKIP {rule}: no input generator for package {package} "
              f"(add one to GENERATORS in {Path(__file__).name})")
        return 0, 0
    rng = random.Random(f"{args.seed}:{package}")
    corpus = generator(folder, args.n, rng)
    passed = failed = 0
    stats = {"allow": 0, "deny": 0, "error": 0}
    reasons_seen: set[str] = set()
    t_nexus = t_opa = 0.0
    retried = 0
    failures = []
    reordered = []
    for scenario, runtime in corpus.runtimes.items():
        idx = [i for i, c in enumerate(corpus.cases) if c.scenario == scenario]
        docs = [corpus.cases[i].input for i in idx]
        if not docs:
            continue
        if any(d is None for d in docs):
            raise RuntimeError(f"{package}: the bindings cannot pass a null input document")
        tag = f"{package}.{scenario}"
        t0 = time.monotonic()
        nexus_out = run_nexus(args.nexusctl, folder.root, rule, docs, runtime, work, tag)
        # A wall-clock limit hit on a loaded machine is not a conformance result: retry.
        for attempt in range(2):
            slow = [j for j, d in enumerate(nexus_out) if "exceeded time limit" in (d.get("error") or "")]
            if not slow:
                break
            retried += len(slow)
            again = run_nexus(args.nexusctl, folder.root, rule, [docs[j] for j in slow], runtime, work,
                              f"{tag}.retry{attempt}")
            for j, d in zip(slow, again):
                nexus_out[j] = d
        t_nexus += time.monotonic() - t0
        t0 = time.monotonic()
        engine = opa_engine(folder, runtime)
        path = rule[len("data."):]
        opa_out = [opa_decide(engine, path, d) for d in docs]
        engine.close()
        t_opa += time.monotonic() - t0
        for i, n_raw, o in zip(idx, nexus_out, opa_out):
            nx = nexus_kind(n_raw)
            if same(nx, o):
                if nx["reasons"] != o["reasons"]:
                    reordered.append((i, nx["reasons"], o["reasons"]))
                passed += 1
                stats["error" if o["error"] else ("allow" if o["allow"] else "deny")] += 1
                reasons_seen.update(o["reasons"])
            else:
                failed += 1
                failures.append((i, corpus.cases[i], n_raw, o))
    print(f"{rule}: {len(corpus.cases)} inputs over {len(corpus.runtimes)} runtime scenarios: "
          f"{stats['allow']} allow, {stats['deny']} deny, {stats['error']} error (matching); "
          f"{len(reasons_seen)} distinct reasons; nexus {t_nexus:.2f}s, OPA {t_opa:.2f}s"
          + (f"; {retried} nexus evaluation(s) retried after the time limit" if retried else ""))
    for i, n_reasons, o_reasons in reordered:
        print(f"note: input #{i}: same reasons in another order: nexus {n_reasons}, OPA {o_reasons}")
    shown_runtimes = set()
    for i, case, n_raw, o in failures:
        print(f"\nMISMATCH {rule} input #{i} (kind {case.kind}, runtime scenario {case.scenario})")
        print(f"  input: {json.dumps(case.input, ensure_ascii=False)}")
        print(f"  nexus: {json.dumps(n_raw, ensure_ascii=False)}")
        print(f"  opa:   {json.dumps(o, ensure_ascii=False)}")
        if corpus.relevant is not None:
            part = corpus.relevant(case.input, corpus.runtimes[case.scenario])
            if part:
                print(f"  data:  {json.dumps(part, ensure_ascii=False)}")
        h = hint(case, nexus_kind(n_raw), o)
        if h:
            print(f"  hint:  {h}")
        shown_runtimes.add(case.scenario)
    for scenario in sorted(shown_runtimes):
        if corpus.runtimes[scenario] is None:
            print(f"runtime scenario {scenario}: no runtime data (nexusctl without --data)")
        else:
            print(f"runtime scenario {scenario}: --data {work / (package + '.' + scenario + '.runtime.json')}")
    if failures:
        print(f"reproduce one: {args.nexusctl} policy eval --dir {folder.root} --rule {rule} "
              f"--data RUNTIME.json --input INPUT.json")
    return passed, failed


def main() -> int:
    repo = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nexusctl", default=str(repo / "target/debug/nexusctl"))
    ap.add_argument("--policies", type=Path, default=repo / "policies")
    ap.add_argument("-n", type=int, default=300, help="inputs per decision policy (default 300)")
    ap.add_argument("--seed", default="nexus-opa-conformance", help="generator seed")
    ap.add_argument("--keep", type=Path, help="write inputs and runtime data here and keep them")
    args = ap.parse_args()

    started = time.monotonic()
    yaml_engine = OpaEngine()
    try:
        folder = load_folder(args.policies.resolve(), yaml_engine)
    except (LoadError, OpaError, ValueError) as e:
        print(f"conformance: cannot load {args.policies}: {e}", file=sys.stderr)
        return 1
    finally:
        yaml_engine.close()
    packages = folder.decision_packages()
    if not packages:
        print(f"conformance: no package with a `decision` rule in {args.policies}", file=sys.stderr)
        return 1
    print(f"policies {args.policies}: decision packages {', '.join(packages)}; {opa_version()}")

    work = args.keep or Path(tempfile.mkdtemp(prefix="nexus-opa-"))
    work.mkdir(parents=True, exist_ok=True)
    passed = failed = 0
    try:
        for package in packages:
            p, f = check_package(args, folder, package, work)
            passed += p
            failed += f
    except (RuntimeError, LoadError, OpaError) as e:
        print(f"conformance: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.keep and failed == 0:
            shutil.rmtree(work, ignore_errors=True)
    if failed:
        print(f"\ninputs and runtime data kept in {work}")
    if passed + failed == 0:
        print("conformance: no decision policy had an input generator", file=sys.stderr)
        return 1
    print(f"{passed} passed, {failed} failed ({time.monotonic() - started:.1f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
