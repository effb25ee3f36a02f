#!/usr/bin/env python3
"""Anomaly watch benchmark: onset -> enforced revocation, and false positives.

Runs the local stack (`target/release/nexusctl up`: gateway with the reference
revocation policy, both sidecars with the default detector settings) and drives the
demo plugin through its sidecar, on loopback only, every phase bounded in time:

  1. well-behaved: RATE requests/s with +-30% jitter (a new rate each second) for
     DURATION seconds; counts the signals it caused and whether it was revoked;
  2. spike: 15 s at 20/s, then 10x (200/s) until refused; onset -> first refusal;
     reinstated, ROUNDS times;
  3. exfiltration: 15 s of small reads at 20/s, then bulk reads (~1 MB each) at 20/s
     until refused; onset -> first refusal; reinstated, ROUNDS times.

Usage: bench/anomaly.py [--duration 600] [--rate 50] [--rounds 3]
Prints a Markdown table.
"""
import argparse
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
PLUGIN = "spiffe://nexus.local/ns/plugins/sa/flood-model"


class Client:
    """One keep-alive connection to the plugin's outbound listener."""

    def __init__(self, base):
        u = urllib.parse.urlsplit(base)
        assert u.hostname in ("127.0.0.1", "localhost")
        self.host, self.port, self.conn = u.hostname, u.port, None

    def get(self, path):
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
            self.conn.request("GET", path)
            r = self.conn.getresponse()
            r.read()
            return r.status
        except Exception:
            self.conn = None
            return 0


def paced(client, path, rate_fn, seconds, stop_on_refusal=False):
    """Sends at rate_fn(t) requests/s for `seconds`; returns (statuses, t_first_refusal)."""
    start = time.monotonic()
    statuses, refused_at, next_at = {}, None, 0.0
    while True:
        t = time.monotonic() - start
        if t >= seconds:
            break
        if next_at > t:
            time.sleep(next_at - t)
        code = client.get(path)
        statuses[code] = statuses.get(code, 0) + 1
        if code in (0, 403, 503) and refused_at is None:
            refused_at = time.monotonic() - start
            if stop_on_refusal:
                break
        next_at += 1.0 / rate_fn(next_at)
    return statuses, refused_at


def ctl(state, *args):
    out = subprocess.run([os.path.join(BIN, "nexusctl"), *args, "--up-state", state],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"nexusctl {args}: {out.stderr}")
    return out.stdout


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--rate", type=float, default=50)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="nexus-anomaly-bench-")
    state = os.path.join(work, "state.json")
    up = subprocess.Popen([os.path.join(BIN, "nexusctl"), "up", "--dir", work],
                          stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "up.log"), "w"),
                          env={**os.environ, "NEXUS_LOG": "warn"})
    try:
        deadline = time.time() + 60
        while not os.path.exists(state):
            if time.time() > deadline or up.poll() is not None:
                sys.exit(f"nexusctl up did not start; see {work}/up.log")
            time.sleep(0.1)
        st = json.load(open(state))
        client = Client(st["plugin_outbound_url"])
        path = "/clauses/c-flood-17/rainfall"

        def revoked():
            s = json.loads(ctl(state, "status", "-o", "json"))
            return [r["subject"] for r in s["revoked"]]

        def plugin_signals(since_s):
            out = json.loads(ctl(state, "signals", "--workload", PLUGIN, "--since", f"{int(since_s) + 5}s", "-o", "json"))
            return out

        # 1. Well-behaved, +-30% jitter.
        rnd = random.Random(7)
        rates, second = {}, [None]

        def jitter(t):
            s = int(t)
            if s not in rates:
                rates[s] = a.rate * rnd.uniform(0.7, 1.3)
            return rates[s]

        t0 = time.time()
        calm, _ = paced(client, path, jitter, a.duration)
        calm_signals = plugin_signals(time.time() - t0)
        calm_revoked = PLUGIN in revoked()
        print(f"well-behaved: {calm} over {a.duration:.0f}s; {len(calm_signals)} signals; revoked={calm_revoked}",
              file=sys.stderr)
        if calm_revoked:
            ctl(state, "reinstate", PLUGIN)

        def episode(anomalous_path, rate):
            paced(client, path, lambda t: 20, 15)
            statuses, refused = paced(client, anomalous_path, lambda t: rate, 20, stop_on_refusal=True)
            kinds = sorted({s["kind"] for s in plugin_signals(40) if s["action"] == "revoke"})
            if PLUGIN in revoked():
                ctl(state, "reinstate", PLUGIN)
            # Let the detectors' windows (10 s) forget the episode before the next one:
            # what they still hold would revoke the reinstated plugin again.
            time.sleep(12)
            return refused, kinds, statuses

        spikes, exfil = [], []
        for _ in range(a.rounds):
            spikes.append(episode(path, 200))
            print(f"spike: refused after {spikes[-1][0]} s, revoked on {spikes[-1][1]}", file=sys.stderr)
        for _ in range(a.rounds):
            exfil.append(episode(path + "?n=200000", 20))
            print(f"exfiltration: refused after {exfil[-1][0]} s, revoked on {exfil[-1][1]}", file=sys.stderr)

        def fmt(rows):
            times = [r[0] for r in rows if r[0] is not None]
            if not times:
                return "never", "-"
            kinds = sorted({k for r in rows for k in r[1]})
            return (f"{statistics.median(times) * 1000:.0f} / {max(times) * 1000:.0f}"
                    f" ({len(times)}/{len(rows)} refused)", ", ".join(kinds))

        print("| scenario | onset -> refused, median / max ms | revoked on |")
        print("|---|---|---|")
        s, k = fmt(spikes)
        print(f"| 10x rate spike (20/s -> 200/s) | {s} | {k} |")
        s, k = fmt(exfil)
        print(f"| exfiltration (small reads -> ~1 MB reads at 20/s) | {s} | {k} |")
        print()
        print(f"well-behaved plugin, {a.rate:.0f}/s +-30% for {a.duration:.0f} s: "
              f"{sum(calm.values())} requests, {len(calm_signals)} signals "
              f"({', '.join(sorted({x['kind'] + ':' + x['action'] for x in calm_signals})) or 'none'}), "
              f"revoked: {'yes' if calm_revoked else 'no'}")
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=15)
        except subprocess.TimeoutExpired:
            up.kill()


if __name__ == "__main__":
    main()
