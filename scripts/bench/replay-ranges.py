#!/usr/bin/env python3
"""Replay the ranged pack reads of one `smr run` against a registry, to see
what the same bytes cost when fetched with more requests in flight.

Usage:
  replay-ranges.py LOG HOST:PORT REPO [--threads N] [--gap BYTES]

LOG is the stderr of `SMR_LOG=smr_registry::store=debug smr run docker://...`
(lines "ranged pack read pack=... offset=... len=..."). The reads are sent
as plain HTTP Range GETs of /v2/REPO/blobs/PACK (anonymous registry, no
/v2/ probe), N at once (default 1: in log order, one after the other) on
keep-alive connections. --gap B first merges the reads of each pack whose
holes are at most B bytes (then sends the largest first). Prints requests,
bytes and seconds. Point it at scripts/bench/shape-proxy.py for the shaped
link, and drop the page cache first for a cold registry.
"""
import argparse
import http.client
import queue
import re
import sys
import threading
import time

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("addr")
    ap.add_argument("repo")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gap", type=int, default=None)
    a = ap.parse_args()
    host, port = a.addr.rsplit(":", 1)
    reads = []
    with open(a.log, errors="replace") as f:
        for line in f:
            m = re.search(r"ranged pack read pack=(\S+) offset=(\d+) len=(\d+)", ANSI.sub("", line))
            if m:
                reads.append((m[1], int(m[2]), int(m[3])))
    if not reads:
        sys.exit(f"replay-ranges: no 'ranged pack read' lines in {a.log}")
    if a.gap is not None:
        by_pack = {}
        for d, o, n in reads:
            by_pack.setdefault(d, []).append((o, o + n))
        reads = []
        for d, spans in by_pack.items():
            spans.sort()
            cur = list(spans[0])
            for s, e in spans[1:]:
                if s <= cur[1] + a.gap:
                    cur[1] = max(cur[1], e)
                else:
                    reads.append((d, cur[0], cur[1] - cur[0]))
                    cur = [s, e]
            reads.append((d, cur[0], cur[1] - cur[0]))
        reads.sort(key=lambda r: -r[2])
    q = queue.Queue()
    for r in reads:
        q.put(r)
    lock = threading.Lock()
    total = [0]
    errors = []

    def worker():
        c = http.client.HTTPConnection(host, int(port), timeout=60)
        while True:
            try:
                d, o, n = q.get_nowait()
            except queue.Empty:
                return
            try:
                c.request("GET", f"/v2/{a.repo}/blobs/{d}", headers={"Range": f"bytes={o}-{o + n - 1}"})
                r = c.getresponse()
                body = r.read()
                if r.status != 206 or len(body) != n:
                    raise RuntimeError(f"{d} {o}+{n}: HTTP {r.status}, {len(body)} bytes")
                with lock:
                    total[0] += n
            except Exception as e:  # report, keep going
                errors.append(str(e))
                c.close()
                c = http.client.HTTPConnection(host, int(port), timeout=60)

    t0 = time.monotonic()
    ts = [threading.Thread(target=worker) for _ in range(max(1, a.threads))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.monotonic() - t0
    gap = "no merging" if a.gap is None else f"merged with gaps <= {a.gap} B"
    print(f"{len(reads)} requests ({gap}), {total[0] / 1e6:.1f} MB, {a.threads} at once: {dt:.2f} s")
    if errors:
        print(f"{len(errors)} failed, first: {errors[0]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
