#!/usr/bin/env python3
"""Helpers for bench/run.sh: everything that is easier in Python than in bash.

Subcommands (all print to stdout, exit non-zero on failure):

  free-port                       a free TCP port on 127.0.0.1 (for nginx, which
                                  cannot report a port 0 binding)
  addr FILE KEY                   a "host:port" value from an address-file JSON
  rss PID...                      summed VmRSS, VmHWM and Pss of the PIDs, in KiB, as JSON
  children PID                    the child PIDs of PID (nginx workers), space-separated
  sample-rss OUT MAX_S PID...     samples summed VmRSS every 100 ms until SIGTERM/SIGINT
                                  or MAX_S seconds, then writes {"peak_kib", "samples",
                                  "cpu_s", "wall_s"} to OUT (cpu_s: user+system CPU
                                  seconds the PIDs used meanwhile)
  metric URL NAME                 sum of every sample of metric NAME at a Prometheus URL
  row OUT NAME LOAD OHA_JSON [DB SETTLE_S CORRECTED]
                                  appends one result row (parsed from oha's JSON) to OUT;
                                  with oha's request database (--db-url), p50 and p99 are
                                  of the requests started SETTLE_S seconds or more after
                                  the first (CORRECTED=1: timed from the intended send
                                  time, as oha --latency-correction)
  rotation-row OUT NAME LOAD TOOL RESULT_JSON HS_BEFORE HS_AFTER ROT_BEFORE ROT_AFTER
                                  appends one rotation result to OUT
  rss-row OUT NAME WHAT IDLE RATE_SAMPLE RATE_OHA AFTER_RATE MAX_SAMPLE MAX_OHA AFTER_MAX
                                  appends one memory/CPU result to OUT; every argument
                                  after WHAT is a JSON file written by `rss`,
                                  `sample-rss` or oha
  report OUT BASELINE PEER        prints the markdown tables from OUT

OUT is a JSON-lines file of results, so rows can be added by any number of
run_target calls and the report is computed once at the end.
"""

import json
import os
import signal
import socket
import sys
import time
import urllib.request


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_kib(pid, field, file="status"):
    try:
        with open(f"/proc/{pid}/{file}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    return 0


def rss(pids):
    return {
        "rss_kib": sum(proc_status_kib(p, "VmRSS") for p in pids),
        "hwm_kib": sum(proc_status_kib(p, "VmHWM") for p in pids),
        # Proportional set size: shared pages (nginx workers share with their master)
        # are split between the processes that map them instead of counted in each.
        "pss_kib": sum(proc_status_kib(p, "Pss", "smaps_rollup") for p in pids),
    }


def children(pid):
    out = []
    task_dir = f"/proc/{pid}/task"
    for tid in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{tid}/children") as f:
                out.extend(f.read().split())
        except FileNotFoundError:
            pass
    return out


def cpu_seconds(pids):
    """user + system CPU seconds of the PIDs (all their threads)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                # The command name may contain spaces: split after its closing paren.
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return total / ticks


def sample_rss(out, max_seconds, pids):
    stop = False

    def on_signal(_signum, _frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    peak = 0
    samples = 0
    cpu0, wall0 = cpu_seconds(pids), time.monotonic()
    deadline = wall0 + max_seconds
    next_tick = wall0
    while not stop and time.monotonic() < deadline:
        peak = max(peak, sum(proc_status_kib(p, "VmRSS") for p in pids))
        samples += 1
        next_tick += 0.1
        delay = next_tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(
            {
                "peak_kib": peak,
                "samples": samples,
                "cpu_s": cpu_seconds(pids) - cpu0,
                "wall_s": time.monotonic() - wall0,
            },
            f,
        )
    os.replace(tmp, out)


def metric(url, name):
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key = line.split("{", 1)[0].split(" ", 1)[0]
        if key == name:
            total += float(line.rsplit(" ", 1)[1])
    return total


def parse_oha(path):
    """rps, latency percentiles (ms) and error counts from oha's JSON output."""
    with open(path) as f:
        d = json.load(f)
    statuses = {int(k): v for k, v in d.get("statusCodeDistribution", {}).items()}
    transport_errors = sum(d.get("errorDistribution", {}).values())
    ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
    non_2xx = sum(v for k, v in statuses.items() if not 200 <= k < 300)
    pct = d.get("latencyPercentiles", {})
    ms = lambda key: (pct.get(key) or 0.0) * 1000.0  # noqa: E731
    total_s = d["summary"]["total"] or 1.0
    return {
        "requests": ok + non_2xx + transport_errors,
        "ok": ok,
        # Successful responses per second: errors do not count as throughput.
        "rps": ok / total_s,
        "p50_ms": ms("p50"),
        "p99_ms": ms("p99"),
        "errors": non_2xx + transport_errors,
        "error_kinds": {
            **{f"HTTP {k}": v for k, v in statuses.items() if not 200 <= k < 300},
            **d.get("errorDistribution", {}),
        },
    }


def settled_latency(db, settle_s, corrected):
    """p50 and p99 (ms, nearest rank) of the successful requests oha recorded in `db`
    that started `settle_s` seconds or more after the first one, and their count."""
    import math
    import sqlite3

    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "select start, start_latency_correction, end, duration from oha where status between 200 and 299"
        ).fetchall()
    finally:
        con.close()
    if not rows:
        raise SystemExit(f"{db}: no successful requests recorded")
    t0 = min(r[0] for r in rows)
    durations = sorted(
        (end - fixed) if corrected and fixed is not None else duration
        for start, fixed, end, duration in rows
        if start - t0 >= settle_s
    )
    if not durations:
        raise SystemExit(f"{db}: no request after the first {settle_s} s")
    rank = lambda p: durations[max(math.ceil(p * len(durations)) - 1, 0)] * 1000.0  # noqa: E731
    return {"p50_ms": rank(0.50), "p99_ms": rank(0.99), "settled_requests": len(durations)}


def append(out, row):
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def fmt(x, digits=2):
    return "—" if x is None else f"{x:.{digits}f}"


def median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def merge_rounds(rows, key, how):
    """One row per key (first-seen order) from one row per round: each field combined
    as `how` says (median, max, first or sum; error kinds are added up)."""
    groups = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    merged = []
    for group in groups.values():
        m = dict(group[0])
        m["rounds"] = len(group)
        for field, combine in how.items():
            values = [r[field] for r in group]
            m[field] = {"median": median, "max": max, "sum": sum, "first": lambda v: v[0]}[
                combine
            ](values)
            if combine == "median" and len(group) > 1:
                m[field + "_range"] = (min(values), max(values))
        if "error_kinds" in m:
            kinds = {}
            for r in group:
                for k, v in r["error_kinds"].items():
                    kinds[k] = kinds.get(k, 0) + v
            m["error_kinds"] = kinds
        merged.append(m)
    return merged


def report(out, baseline, peer):
    rows = [json.loads(line) for line in open(out) if line.strip()]
    latency = merge_rounds(
        [r for r in rows if r["kind"] == "latency"],
        lambda r: (r["name"], r["load"]),
        {"rps": "median", "p50_ms": "median", "p99_ms": "median", "errors": "sum",
         "requests": "sum", "ok": "sum"},
    )
    memory = merge_rounds(
        [r for r in rows if r["kind"] == "memory"],
        lambda r: r["name"],
        {"idle_kib": "first", "peak_rate_kib": "max", "hwm_rate_kib": "max",
         "peak_max_kib": "max", "pss_max_kib": "max", "cpu_pct_rate": "median",
         "cpu_us_rate": "median", "cpu_us_max": "median"},
    )
    rotation = [r for r in rows if r["kind"] == "rotation"]

    by_key = {(r["name"], r["load"]): r for r in latency}

    def added(r, field):
        # Only at a fixed rate: unthrottled runs are closed-loop (latency = connections
        # / throughput), so their latency difference says nothing about the proxy.
        base = by_key.get((baseline, r["load"]))
        if base is None or r["name"] == baseline or r["load"] == "max":
            return None
        return r[field] - base[field]

    print(
        "| target | load | rps | p50 ms | p99 ms | p99 range over rounds | added p50 ms "
        f"| added p99 ms | added p99 nexus/{peer} | rps nexus/{peer} | errors |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in latency:
        ratio_p99 = ratio_rps = None
        other = by_key.get((peer, r["load"]))
        if r["name"].startswith("nexus") and other is not None:
            a, b = added(r, "p99_ms"), added(other, "p99_ms")
            if a is not None and b:
                ratio_p99 = a / b
            if other["rps"]:
                ratio_rps = r["rps"] / other["rps"]
        errors = str(r["errors"])
        if r["errors"]:
            kinds = ", ".join(f"{k}: {v}" for k, v in r["error_kinds"].items())
            errors += f" ({kinds})"
        lo_hi = r.get("p99_ms_range")
        p99_range = f"{lo_hi[0]:.3f}–{lo_hi[1]:.3f}" if lo_hi else "—"
        print(
            f"| {r['name']} | {r['load']} | {r['rps']:.0f} | {fmt(r['p50_ms'], 3)} "
            f"| {fmt(r['p99_ms'], 3)} | {p99_range} | {fmt(added(r, 'p50_ms'), 3)} "
            f"| {fmt(added(r, 'p99_ms'), 3)} | {fmt(ratio_p99)} | {fmt(ratio_rps)} "
            f"| {errors} |"
        )

    if memory:
        print()
        print(
            "| target | processes measured | idle RSS MiB | peak RSS MiB at fixed rate "
            "| VmHWM MiB after fixed rate | peak RSS MiB at max | PSS MiB after max "
            "| CPU % of a core at fixed rate | CPU µs/request at fixed rate "
            "| CPU µs/request at max |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        mib = lambda kib: kib / 1024.0  # noqa: E731
        for r in memory:
            print(
                f"| {r['name']} | {r['what']} | {mib(r['idle_kib']):.1f} "
                f"| {mib(r['peak_rate_kib']):.1f} | {mib(r['hwm_rate_kib']):.1f} "
                f"| {mib(r['peak_max_kib']):.1f} | {mib(r['pss_max_kib']):.1f} "
                f"| {r['cpu_pct_rate']:.0f} | {r['cpu_us_rate']:.0f} "
                f"| {r['cpu_us_max']:.0f} |"
            )

    if rotation:
        print()
        print(
            "| rotation run | load | requests | ok | rps | errors | handshake failures "
            "(sidecar metric delta) | SVID rotations (delta) | p50 ms | p99 ms |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rotation:
            errors = str(r["errors"])
            if r["errors"]:
                kinds = ", ".join(f"{k}: {v}" for k, v in r["error_kinds"].items())
                errors += f" ({kinds})"
            print(
                f"| {r['name']} | {r['load']} | {r['requests']} | {r['ok']} "
                f"| {r['rps']:.0f} | {errors} "
                f"| {r['hs_failures']:.0f} | {r['rotations']:.0f} "
                f"| {fmt(r['p50_ms'], 3)} | {fmt(r['p99_ms'], 3)} |"
            )


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "free-port":
        print(free_port())
    elif cmd == "addr":
        with open(args[0]) as f:
            value = json.load(f)
        for key in args[1].split("."):
            value = value[key]
        print(value)
    elif cmd == "rss":
        print(json.dumps(rss(args)))
    elif cmd == "children":
        print(" ".join(children(args[0])))
    elif cmd == "sample-rss":
        sample_rss(args[0], float(args[1]), args[2:])
    elif cmd == "metric":
        print(metric(args[0], args[1]))
    elif cmd == "row":
        out, name, load, path = args[:4]
        row = {"kind": "latency", "name": name, "load": load, **parse_oha(path)}
        if len(args) == 7:
            db, settle_s, corrected = args[4], float(args[5]), args[6] == "1"
            row.update(settled_latency(db, settle_s, corrected))
        append(out, row)
    elif cmd == "rotation-row":
        out, name, load, tool, path, hs0, hs1, rot0, rot1 = args
        with open(path) as f:
            raw = json.load(f)
        result = parse_oha(path) if tool == "oha" else raw
        append(
            out,
            {
                "kind": "rotation",
                "name": name,
                "load": load,
                **result,
                "hs_failures": float(hs1) - float(hs0),
                "rotations": float(rot1) - float(rot0),
            },
        )
    elif cmd == "rss-row":
        out, name, what = args[:3]
        idle, rate_s, after_rate, max_s, after_max = (
            json.load(open(args[i])) for i in (3, 4, 6, 7, 9)
        )
        rate_oha, max_oha = parse_oha(args[5]), parse_oha(args[8])
        us_per_req = lambda s, o: 1e6 * s["cpu_s"] / max(o["requests"], 1)  # noqa: E731
        append(
            out,
            {
                "kind": "memory",
                "name": name,
                "what": what,
                "idle_kib": idle["rss_kib"],
                "peak_rate_kib": rate_s["peak_kib"],
                "hwm_rate_kib": after_rate["hwm_kib"],
                "peak_max_kib": max_s["peak_kib"],
                "pss_max_kib": after_max["pss_kib"],
                "cpu_pct_rate": 100.0 * rate_s["cpu_s"] / max(rate_s["wall_s"], 1e-9),
                "cpu_us_rate": us_per_req(rate_s, rate_oha),
                "cpu_us_max": us_per_req(max_s, max_oha),
            },
        )
    elif cmd == "report":
        report(*args)
    else:
        sys.exit(f"benchlib.py: unknown subcommand {cmd}")


if __name__ == "__main__":
    main(sys.argv)
