#!/usr/bin/env python3
"""The web console at scale (docs/console.md#measured): a real nexus-gateway holding N
real control streams (gateway/examples/control_bench.rs in CONSOLE_HOLD mode), S
synthetic signals written into its store, `nexusctl console` following it, and headless
chromium (chromedriver) measuring page load, the time from a revocation at the gateway
to the open page showing it (every stream acknowledging it makes N sidecar events), the
live region's swap time, and the console's CPU while idle.

Usage (from the repository, after `cargo build --bins --example control_bench -p nexus-gateway`
for debug, or with --release for both):
  python3 bench/console_scale.py [--streams 1000] [--signals 10000] [--profile debug]
Prints a Markdown table.
"""
import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "console"))

ap = argparse.ArgumentParser()
ap.add_argument("--streams", type=int, default=1000)
ap.add_argument("--signals", type=int, default=10000)
ap.add_argument("--profile", default="debug")
args = ap.parse_args()
root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
target = os.path.join(root, "target", args.profile)
tmp = tempfile.mkdtemp(prefix="console-scale-")
hold = os.path.join(tmp, "hold.json")
procs = []


def spawn(cmd, name, env=None):
    log = open(os.path.join(tmp, name + ".log"), "w")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    procs.append(p)
    return p


def wait_for(what, cond, timeout=120, step=0.1):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise SystemExit(f"timed out: {what} (logs in {tmp})")


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


try:
    spawn([os.path.join(target, "examples", "control_bench"), str(args.streams)], "bench",
          env=dict(os.environ, CONSOLE_HOLD=hold, REVOCATIONS="1", CYCLES="1"))
    info = wait_for("the streams open", lambda: os.path.exists(hold) and json.load(open(hold)), 300)
    db = sqlite3.connect(info["db"], timeout=30)
    now = int(time.time() * 1000)
    rows = []
    for i in range(args.signals):
        w = f"spiffe://nexus.local/ns/plugins/sa/w{i % 50}"
        rows.append((f"scale-{i}", info["sidecar_id"], w, "denial_burst", "peer", 3.5,
                     '{"denials": 12}', now - i * 100, now - i * 100,
                     ["alert", "ignore", "revoke"][i % 3], json.dumps([f"reason {i}"]),
                     "[]", '{"status": "verified"}'))
    db.executemany("INSERT INTO signals (id, reporter, workload, kind, observed_as, score, evidence, "
                   "time_ms, received_ms, action, reasons, decision_ids, verification) "
                   "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    db.commit()
    nexusctl = os.path.join(target, "nexusctl")
    flags = ["--gateway", info["grpc"], "--gateway-id", info["gateway_id"], "--cert", info["cert"],
             "--key", info["key"], "--ca", info["ca"], "--up-state", "/nonexistent"]
    console = spawn([nexusctl, "console", "--no-browser", "--signals", str(args.signals), *flags], "console")
    url = wait_for("the console URL", lambda: next((w for w in open(os.path.join(tmp, "console.log")).read().split()
                                                    if "/login?token=" in w), None), 30)
    port = 9515 + os.getpid() % 1000
    spawn(["chromedriver", f"--port={port}"], "chromedriver")
    time.sleep(1.0)
    os.environ["SCALE_DRIVER"] = f"http://127.0.0.1:{port}"
    import urllib.request

    def wd(method, path, body=None):
        req = urllib.request.Request(os.environ["SCALE_DRIVER"] + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read() or b"{}").get("value")

    sid = wd("POST", "/session", {"capabilities": {"alwaysMatch": {"goog:chromeOptions": {"args": [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]}}}})["sessionId"]
    S = f"/session/{sid}"
    js = lambda s: wd("POST", S + "/execute/sync", {"script": s, "args": []})
    base = url.split("/login")[0]
    wd("POST", S + "/url", {"url": url})
    wait_for("overview loaded", lambda: js("return !!document.getElementById('sidecar-count')"))
    shown = wait_for("all sidecars", lambda: (lambda n: n if n and int(n) >= args.streams else None)(
        js("return document.getElementById('sidecar-count').textContent")))
    results = {}
    for page in ["/", "/signals", "/workloads", "/revocations"]:
        t = time.time()
        wd("POST", S + "/url", {"url": base + page})
        nav = js("var n=performance.getEntriesByType('navigation')[0]; return [n.responseEnd - n.startTime, n.loadEventEnd - n.startTime, n.transferSize]")
        results[page] = (nav[0], nav[1], nav[2], (time.time() - t) * 1000)
    wait_for("live", lambda: js("return document.getElementById('conn').textContent") == "live")
    lat = []
    for i in range(5):
        subject = f"spiffe://nexus.local/ns/bench/sa/scale{i}"
        t = time.time()
        subprocess.run([nexusctl, "revoke", subject, "--reason", f"scale {i}", *flags], check=True, capture_output=True)
        called = time.time()
        wait_for("the revocation in the page", lambda: subject in js("return document.getElementById('live').innerText"), 30, 0.01)
        lat.append(((time.time() - t) * 1000, (time.time() - called) * 1000))
    render = js("return window.nexusConsole.lastRenderMs")
    # Idle: no change at the gateway, the page open.
    time.sleep(2)
    c0 = cpu_seconds(console.pid)
    time.sleep(10)
    idle = (cpu_seconds(console.pid) - c0) / 10 * 100
    wd("DELETE", S)
    print(f"Console at scale: {shown} sidecar streams (real, one gateway), {args.signals} signals in the store; "
          f"{args.profile} build; {time.strftime('%Y-%m-%d')}\n")
    print("| page | server response ms | load event ms | bytes |")
    print("|---|---|---|---|")
    for page, (resp, load, size, _) in results.items():
        print(f"| {page} | {resp:.0f} | {load:.0f} | {size} |")
    print("\n| revocation i | CLI start -> visible ms | CLI return -> visible ms |")
    print("|---|---|---|")
    for i, (a, b) in enumerate(lat):
        print(f"| {i} | {a:.0f} | {b:.0f} |")
    print(f"\nLast live-region swap in the browser: {render:.1f} ms. Console CPU while idle (10 s, page open): {idle:.2f} %.")
finally:
    try:
        open(hold + ".done", "w").close()
    except Exception:
        pass
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except Exception:
            p.kill()
