#!/usr/bin/env python3
"""Summarise the requests a distribution registry (docker-registry 2.8, log
level info) served, from its "response completed" log lines.

Usage:
  reglog.py LOG FROM TO [--since ISO8601] [--host HOST:PORT]

Reads lines FROM..TO (1-based, TO inclusive; as counted by `wc -l` before
and after a run) of LOG and prints one JSON object:
  requests       every request answered
  pings          GET /v2/ (version check / auth probe)
  blob_gets      GET of a blob (200 or 206), ranged = 206 only
  ranged         GET answered 206 (HTTP Range)
  manifests      GET/HEAD/PUT of a manifest or tag
  methods        {"GET": n, "HEAD": n, ...}
  bytes          response body bytes written (http.response.written)
  max_concurrent most requests being served at once (start = end - duration)
  span_s         first request start to last request end
  busy_s         time at least one request was being served
  server_ms_median  median time the registry took per ranged GET
--since: only requests that ended at or after this UTC time (e.g. a
tracing timestamp from smr's log). --host: only requests whose Host header
is HOST:PORT (e.g. the shaping proxy's address).
"""
import datetime
import json
import re
import statistics
import sys

UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def ts(s):
    # 2026-11-23T17:22:09.899042446Z -> seconds (microsecond precision)
    s = s.rstrip("Z")
    if "." in s:
        head, frac = s.split(".", 1)
        s = f"{head}.{frac[:6]}"
    return datetime.datetime.fromisoformat(s).replace(tzinfo=datetime.timezone.utc).timestamp()


def duration(s):
    # Go durations: 4.9ms, 800.281µs, 1.2s, 1m2.5s
    total = 0.0
    for v, u in re.findall(r"([0-9.]+)(ns|µs|us|ms|s|m)", s):
        total += float(v) * UNITS[u]
    return total


def field(line, name):
    m = re.search(name + r'=("(?:[^"\\]|\\.)*"|\S+)', line)
    if not m:
        return None
    v = m.group(1)
    return v[1:-1] if v.startswith('"') else v


def main(argv):
    args = list(argv)
    since = host = None
    if "--since" in args:
        i = args.index("--since")
        since = ts(args[i + 1])
        del args[i:i + 2]
    if "--host" in args:
        i = args.index("--host")
        host = args[i + 1]
        del args[i:i + 2]
    if len(args) != 3:
        sys.exit(__doc__)
    path, first, last = args[0], int(args[1]), int(args[2])
    ev = []
    methods = {}
    pings = blob_gets = ranged = manifests = written = 0
    ranged_ms = []
    with open(path, errors="replace") as f:
        for n, line in enumerate(f, 1):
            if n < first:
                continue
            if n > last:
                break
            if 'msg="response completed' not in line:
                continue
            if host is not None and field(line, "http.request.host") != host:
                continue
            end = ts(field(line, "time"))
            if since is not None and end < since:
                continue
            d = duration(field(line, "http.response.duration") or "0s")
            method = field(line, "http.request.method") or "?"
            uri = field(line, "http.request.uri") or ""
            status = field(line, "http.response.status") or ""
            w = int(field(line, "http.response.written") or 0)
            ev.append((end - d, end))
            methods[method] = methods.get(method, 0) + 1
            written += w
            if uri == "/v2/":
                pings += 1
            elif "/blobs/sha256:" in uri and method == "GET" and status in ("200", "206"):
                blob_gets += 1
                if status == "206":
                    ranged += 1
                    ranged_ms.append(d * 1e3)
            elif "/manifests/" in uri:
                manifests += 1
    out = dict(requests=len(ev), pings=pings, blob_gets=blob_gets, ranged=ranged,
               manifests=manifests, methods=methods, bytes=written,
               max_concurrent=0, span_s=0.0, busy_s=0.0,
               server_ms_median=round(statistics.median(ranged_ms), 2) if ranged_ms else None)
    if ev:
        ev.sort()
        pts = sorted([(s, 1) for s, _ in ev] + [(e, -1) for _, e in ev], key=lambda p: (p[0], p[1]))
        cur = mx = 0
        for _, step in pts:
            cur += step
            mx = max(mx, cur)
        busy, until = 0.0, float("-inf")
        for s, e in ev:
            if e > until:
                busy += e - max(s, until)
                until = e
        out.update(max_concurrent=mx, span_s=round(max(e for _, e in ev) - ev[0][0], 3),
                   busy_s=round(busy, 3))
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
