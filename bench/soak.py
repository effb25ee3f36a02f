#!/usr/bin/env python3
"""Soak: a steady load through both sidecars for a long time, watching for leaks.

Runs the local stack (`target/release/nexusctl up`: gateway, the demo data API, its
sidecar and the demo plugin's sidecar, both with the reference policy, execution
records and the anomaly watch on) and sends RATE requests/s (default 1000) to
/clauses/c-flood-17/rainfall through the plugin's sidecar (outbound, then mTLS to the
data API's sidecar), on THREADS keep-alive connections, for DURATION seconds (default
600), on loopback only. The load ramps up over the warm-up (WARMUP seconds, default
60, not counted) so the anomaly watch learns it instead of taking it for a spike.

Reports, for each sidecar, RSS (VmRSS) and open file descriptors at the end of the
warm-up and 1, 5 and 10 minutes after it (or at the end of a shorter run), the RSS
growth from the first sample to the last, and every request that did not answer 200.
The targets (issue 19): 0 errors, RSS growth <= 5% after warm-up, a flat fd count.

Usage: bench/soak.py [--duration 600] [--rate 1000] [--threads 16] [--warmup 60]
                     [--bin target/release] [--every SECONDS] [--keep]
Prints a Markdown table and, with --json FILE, writes the raw samples.
This is a benchmark, not a test: it is not run in CI.

The demo plugin's declared budget is 100 requests/s (policies/nexus/bindings.yaml), so
before the load starts the soak registers and certifies version 1.0.1 of it with
budgets of twice RATE (`raise_budget`), as an operator would for a plugin whose usual
load is RATE, and starts the stack with the anomaly watch's prior at RATE
(`nexusctl up --prior-rate-per-s`): the watch stays on and judges the soak against
that.
"""
import argparse
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = "/clauses/c-flood-17/rainfall"
PLUGIN = "spiffe://nexus.local/ns/plugins/sa/flood-model"


def proc_sample(pid):
    """VmRSS, split into anonymous memory (the heap: what a leak grows) and file-backed
    pages (the binary's code and data, faulted in as code paths first run)."""
    fields = {"VmRSS:": "rss_kib", "RssAnon:": "anon_kib", "RssFile:": "file_kib"}
    row = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0] + ":"
            if key in fields:
                row[fields[key]] = int(line.split()[1])
    row["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return row


class Load:
    def __init__(self, base, threads):
        u = urllib.parse.urlsplit(base)
        assert u.hostname in ("127.0.0.1", "localhost"), "loopback only"
        self.host, self.port, self.threads = u.hostname, u.port, threads
        self.rate = 0.0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.statuses = {}
        self.counting = False

    def worker(self):
        conn, next_at = None, time.monotonic()
        while not self.stop.is_set():
            rate = self.rate / self.threads
            if rate <= 0:
                time.sleep(0.05)
                next_at = time.monotonic()
                continue
            now = time.monotonic()
            if next_at > now:
                time.sleep(next_at - now)
            next_at = max(next_at + 1.0 / rate, time.monotonic() - 1.0)
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                conn.request("GET", PATH)
                r = conn.getresponse()
                r.read()
                code = r.status
            except Exception:
                conn, code = None, 0
            if self.counting:
                with self.lock:
                    self.statuses[code] = self.statuses.get(code, 0) + 1

    def start(self):
        self.pool = [threading.Thread(target=self.worker, daemon=True) for _ in range(self.threads)]
        for t in self.pool:
            t.start()


def raise_budget(bin_dir, work, state, rate):
    """Declares the soak's load as the demo plugin's usual load, as an operator would for
    a plugin that serves RATE requests/s: a new version of flood-model (signed with the
    stack's development publisher key, registered by the operator, certified by the
    reviewer) whose budgets allow twice RATE. The latest certified version's budgets
    are the binding's (docs/registry.md); without this the demo's 100/s budget revokes
    the plugin within seconds of the ramp passing it."""
    ctl = os.path.join(bin_dir, "nexusctl")

    def run(*args, who=None):
        extra = ["--up-state", state]
        if who:
            extra += ["--cert", os.path.join(work, f"{who}-svid.pem"),
                      "--key", os.path.join(work, f"{who}-svid.key"),
                      "--ca", os.path.join(work, "ca.pem")]
        out = subprocess.run([ctl, *args, *extra], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            sys.exit(f"nexusctl {' '.join(args)}: {out.stdout}{out.stderr}")
        return out.stdout

    digest = "sha256:" + hashlib.sha256(f"nexus soak flood-model {rate}".encode()).hexdigest()
    image = f"localhost/nexus/demo-flood-model@{digest}"
    payload, signature = os.path.join(work, "soak.payload"), os.path.join(work, "soak.sig")
    run("plugin", "sign", "--key", os.path.join(work, "dev-publisher.key"), "--image", image,
        "--payload-out", payload, "--signature-out", signature)
    budgets = {"requests_per_s": int(rate * 2), "egress_bytes": int(rate * 512 * 10 * 2),
               "distinct_clauses": 4, "window": "10s"}
    run("plugin", "register", "--name", "flood-model", "--publisher", "nexus-dev",
        "--version", "1.0.1", "--image", image, "--spiffe-id", PLUGIN,
        "--clause", "c-flood-17", "--clause", "c-flood-18",
        "--budgets", json.dumps(budgets), "--payload", payload, "--signature", signature)
    run("plugin", "certify", "flood-model", "--version", "1.0.1", who="reviewer")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--rate", type=float, default=1000)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--warmup", type=float, default=60)
    p.add_argument("--bin", default=os.path.join(ROOT, "target", "release"))
    p.add_argument("--every", type=float, default=0,
                   help="also sample every EVERY seconds (0: only at 0, 1, 5 and 10 minutes)")
    p.add_argument("--keep", action="store_true",
                   help="keep the stack's folder (records, logs, gateway.db: GBs after 10 min)")
    p.add_argument("--json")
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="nexus-soak-")
    state = os.path.join(work, "state.json")
    # The anomaly watch's prior is the soak's load (about 300 bytes out per request):
    # the plugin's usual load, declared as an operator would (docs/anomaly.md).
    up = subprocess.Popen([os.path.join(a.bin, "nexusctl"), "up", "--dir", work,
                           "--prior-rate-per-s", str(a.rate),
                           "--prior-bytes-per-s", str(a.rate * 512)],
                          stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "up.log"), "w"),
                          env={**os.environ, "NEXUS_LOG": "warn"})
    try:
        deadline = time.time() + 60
        while not os.path.exists(state):
            if time.time() > deadline or up.poll() is not None:
                sys.exit(f"nexusctl up did not start; see {work}/up.log")
            time.sleep(0.1)
        st = json.load(open(state))
        raise_budget(a.bin, work, state, a.rate)
        pids = {k: st["pids"][k] for k in ("plugin-sidecar", "data-sidecar")}
        load = Load(st["plugin_outbound_url"], a.threads)
        load.start()
        # Warm-up: ramp from 5% to the full rate.
        t0 = time.monotonic()
        while (t := time.monotonic() - t0) < a.warmup:
            load.rate = a.rate * max(0.05, t / a.warmup)
            time.sleep(0.5)
        load.rate = a.rate
        load.counting = True
        start = time.monotonic()
        marks = {m for m in (0, 60, 300, 600) if m < a.duration} | {a.duration}
        if a.every > 0:
            marks |= {round(i * a.every, 3) for i in range(1, int(a.duration / a.every) + 1)}
        marks = sorted(m for m in marks if m <= a.duration)
        samples = []
        for mark in marks:
            wait = start + mark - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            row = {"t_s": round(time.monotonic() - start, 1)}
            for name, pid in pids.items():
                row[name] = proc_sample(pid)
            with load.lock:
                row["requests"] = sum(load.statuses.values())
            samples.append(row)
            print(f"t={row['t_s']:>6}s " + " ".join(
                f"{n}: rss={row[n]['rss_kib']} KiB (anon {row[n]['anon_kib']}) fds={row[n]['fds']}"
                for n in pids),
                f"requests={row['requests']}", file=sys.stderr)
        load.stop.set()
        elapsed = time.monotonic() - start
        statuses = dict(load.statuses)
    finally:
        up.send_signal(2)
        try:
            up.wait(20)
        except subprocess.TimeoutExpired:
            up.kill()
        if a.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    total = sum(statuses.values())
    errors = total - statuses.get(200, 0)
    print(f"\nSoak: {a.rate:.0f} requests/s target for {a.duration:.0f}s after a {a.warmup:.0f}s warm-up; "
          f"{total} requests ({total / elapsed:.0f}/s achieved), {errors} not 200: {statuses}\n")
    print("| t after warm-up | " + " | ".join(
        f"{n} RSS (KiB) | anon | file | fds" for n in pids) + " |")
    print("|---|" + "---:|---:|---:|---:|" * len(pids))
    for row in samples:
        print(f"| {row['t_s']:.0f}s | " + " | ".join(
            f"{row[n]['rss_kib']} | {row[n]['anon_kib']} | {row[n]['file_kib']} | {row[n]['fds']}"
            for n in pids) + " |")
    for n in pids:
        growth = {k: 100.0 * (samples[-1][n][k] - samples[0][n][k]) / max(samples[0][n][k], 1)
                  for k in ("rss_kib", "anon_kib")}
        print(f"\n{n}: RSS growth after warm-up {growth['rss_kib']:+.1f}% "
              f"(anonymous memory {growth['anon_kib']:+.1f}%)", end="")
    print()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rate": a.rate, "duration": a.duration, "statuses": statuses,
                       "samples": samples}, f, indent=1)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
