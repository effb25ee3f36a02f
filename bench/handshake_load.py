#!/usr/bin/env python3
"""A fixed-rate HTTPS load where every request is a new connection with a *full* mTLS
handshake (no session resumption), for the rotation run.

Why not oha alone: oha's rustls client caches TLS 1.3 session tickets, so with
--disable-keepalive almost every connection resumes a session (no certificates are
sent or verified), and an SVID rotation is never exercised by those handshakes.
Python's ssl module never resumes unless told to, so each request here makes the
sidecar present its current SVID and verify the client's certificate.

Prints one JSON object: requests, ok, rps, p50_ms, p99_ms, errors, error_kinds.
"""

import argparse
import asyncio
import json
import ssl
import time
import urllib.parse


async def one(url, ctx, timeout):
    host, port, path = url.hostname, url.port or 443, url.path or "/"
    start = time.perf_counter()
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=host),
        timeout,
    )
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 1)
        except Exception:  # noqa: BLE001 - the response is already in hand
            pass
    status = data.split(b"\r\n", 1)[0].decode(errors="replace")
    return status, time.perf_counter() - start


async def run(args):
    url = urllib.parse.urlsplit(args.url)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(args.cacert)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.check_hostname = True

    latencies, errors, samples = [], {}, []
    ok = 0
    limit = asyncio.Semaphore(args.concurrency)

    async def task():
        nonlocal ok
        async with limit:
            sent = time.time()
            try:
                status, latency = await one(url, ctx, args.timeout)
            except Exception as e:  # noqa: BLE001 - every failure is a counted error
                kind = type(e).__name__ + (f": {e}" if str(e) else "")
                errors[kind[:120]] = errors.get(kind[:120], 0) + 1
                return
            if args.dump:
                samples.append((sent, latency, status))
            if status.split(" ")[1:2] == ["200"]:
                ok += 1
                latencies.append(latency)
            else:
                errors[status[:60]] = errors.get(status[:60], 0) + 1

    start = time.perf_counter()
    tasks = []
    n = int(args.rate * args.duration)
    for i in range(n):
        delay = start + i / args.rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(task()))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start

    if args.dump:
        with open(args.dump, "w") as f:
            for sent, latency, status in samples:
                f.write(f"{sent:.6f} {latency * 1000:.3f} {status}\n")
    latencies.sort()
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else None  # noqa: E731
    print(
        json.dumps(
            {
                "requests": n,
                "ok": ok,
                "rps": ok / elapsed,
                "p50_ms": pct(0.50),
                "p99_ms": pct(0.99),
                "errors": n - ok,
                "error_kinds": errors,
            }
        )
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=float, required=True, help="new connections per second")
    p.add_argument("--duration", type=float, required=True, help="seconds")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--cacert", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--dump", help="also write 'unix_time latency_ms status' per request here")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
