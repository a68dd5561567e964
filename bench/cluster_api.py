#!/usr/bin/env python3
"""API timings for bench/cluster.sh (standard library only).

  cluster_api.py create URL TOKEN PREFIX COUNT THREADS   -> identity creates per second
  cluster_api.py methods URL TOKEN PREFIX DEVICES CALLS  -> method round trip p50/p99 (ms)
  cluster_api.py twins URL TOKEN PREFIX COUNT THREADS    -> desired twin writes per second, p50/p99
"""
import http.client
import json
import sys
import threading
import time
import urllib.parse


def conn(url):
    u = urllib.parse.urlparse(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=60)


def call(c, token, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    c.request(method, path, body=data, headers=headers)
    r = c.getresponse()
    payload = r.read()
    return r.status, payload


def run_threads(threads, work):
    """Runs work(t) on `threads` threads at once; the seconds they took together."""
    start = time.monotonic()
    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.monotonic() - start


def create(url, token, prefix, count, threads):
    per = count // threads
    failures = []

    def work(t):
        c = conn(url)
        for i in range(per):
            status, body = call(c, token, "POST", "/devices", {"deviceId": f"{prefix}{t:02d}-{i:05d}"})
            if status not in (200, 201):
                failures.append((status, body[:200]))

    secs = run_threads(threads, work)
    print(json.dumps({"creates": per * threads, "threads": threads, "seconds": round(secs, 3),
                      "per_second": round(per * threads / secs, 1), "failures": len(failures),
                      "first_failure": str(failures[0]) if failures else None}))


def methods(url, token, prefix, devices, calls):
    c = conn(url)
    took = []
    bad = 0
    for i in range(calls):
        device = f"{prefix}{i % devices}"
        start = time.monotonic()
        status, _ = call(c, token, "POST", f"/devices/{device}/methods",
                         {"methodName": "ping", "payload": {"n": i}, "responseTimeoutInSeconds": 10})
        took.append((time.monotonic() - start) * 1000)
        if status != 200:
            bad += 1
            if bad == 1:
                print(f"first failed call: {status} {_[:200]!r}", file=sys.stderr)
    took.sort()
    pct = lambda p: round(took[min(len(took) - 1, int(len(took) * p))], 2)
    print(json.dumps({"calls": calls, "failed": bad, "p50_ms": pct(0.50), "p99_ms": pct(0.99)}))


def twins(url, token, prefix, count, threads):
    """Desired patches to the devices `create` made (thread t writes its own devices)."""
    per = count // threads
    took = []
    failures = []

    def work(t):
        c = conn(url)
        for i in range(per):
            start = time.monotonic()
            status, body = call(c, token, "PATCH", f"/twins/{prefix}{t:02d}-{i:05d}",
                                {"properties": {"desired": {"n": i}}})
            took.append((time.monotonic() - start) * 1000)
            if status != 200:
                failures.append((status, body[:200]))

    secs = run_threads(threads, work)
    took.sort()
    pct = lambda p: round(took[min(len(took) - 1, int(len(took) * p))], 2)
    print(json.dumps({"writes": per * threads, "threads": threads, "per_second": round(per * threads / secs, 1),
                      "p50_ms": pct(0.5), "p99_ms": pct(0.99), "failures": len(failures),
                      "first_failure": str(failures[0]) if failures else None}))


if __name__ == "__main__":
    verb, url, token, prefix = sys.argv[1:5]
    if verb == "create":
        create(url, token, prefix, int(sys.argv[5]), int(sys.argv[6]))
    elif verb == "twins":
        twins(url, token, prefix, int(sys.argv[5]), int(sys.argv[6]))
    else:
        methods(url, token, prefix, int(sys.argv[5]), int(sys.argv[6]))
