"""Paced HTTP load on one keep-alive connection (loopback only, bounded in time).

Usage: load.py URL RATE SECONDS [--stop-on STATUS] [--ramp-to RATE2]
With --ramp-to, the rate rises linearly from RATE to RATE2 over SECONDS.
Prints JSON: {"sent", "statuses": {code: n}, "first": {code: seconds since start}}.
A refused connection counts as status 0 and is retried on a new connection.
"""
import http.client
import json
import sys
import time
import urllib.parse

url, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
opts = dict(zip(sys.argv[4::2], sys.argv[5::2]))
stop_on = int(opts["--stop-on"]) if "--stop-on" in opts else None
ramp_to = float(opts["--ramp-to"]) if "--ramp-to" in opts else None
u = urllib.parse.urlsplit(url)
assert u.hostname in ("127.0.0.1", "localhost"), "loopback only"
path = u.path + ("?" + u.query if u.query else "")
conn = None
statuses, first = {}, {}
start = time.monotonic()
interval = 1.0 / rate
sent = 0
while True:
    now = time.monotonic() - start
    if now >= seconds:
        break
    if ramp_to is None:
        target = sent * interval
    else:
        # The time of request n under a linear ramp: solve rate*t + k*t^2/2 = n.
        k = (ramp_to - rate) / seconds
        target = (2 * sent / (rate + (rate * rate + 2 * k * sent) ** 0.5)) if k else sent * interval
    if target > now:
        time.sleep(target - now)
    try:
        if conn is None:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        code = resp.status
    except Exception:
        conn = None
        code = 0
    sent += 1
    statuses[code] = statuses.get(code, 0) + 1
    first.setdefault(code, round(time.monotonic() - start, 4))
    if stop_on is not None and code == stop_on:
        break
print(json.dumps({"sent": sent, "statuses": statuses, "first": first}))
