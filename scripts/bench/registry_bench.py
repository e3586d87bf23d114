#!/usr/bin/env python3
"""Helpers of scripts/bench-registry.sh (results as JSON lines).

  registry_bench.py record RESULTS KIND [key=value ...] [key@=FILE.json ...]
      Appends one JSON object {"kind": KIND, ...} to RESULTS. Values that
      parse as numbers become numbers, "-" becomes null; key@=FILE embeds
      the JSON in FILE (null if FILE is missing or empty).
  registry_bench.py push OUTPUT
      Parses the output of `SMR_LOG=smr_registry::push=info smr convert
      ... --push` and prints JSON: blobs_uploaded, blobs_total,
      blobs_skipped, bytes_uploaded (exact, from the log line),
      bytes_skipped (as printed, rounded), packs, chunks, referrers,
      push_s (smr's own timing of the push), push_started (UTC timestamp
      of "pushing smr artifact", for reglog.py --since).
  registry_bench.py report RESULTS ROUNDS RATE DELAY_MS CONTAINERD_VERSION
      Prints the markdown report.
"""
import collections
import json
import re
import statistics
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def value(v):
    if v == "-" or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


def record(path, kind, args):
    d = {"kind": kind}
    for a in args:
        if "@=" in a:
            k, f = a.split("@=", 1)
            try:
                with open(f) as fh:
                    txt = fh.read().strip()
                d[k] = json.loads(txt) if txt else None
            except FileNotFoundError:
                d[k] = None
        else:
            k, v = a.split("=", 1)
            d[k] = value(v)
    with open(path, "a") as fh:
        fh.write(json.dumps(d) + "\n")


HUMAN = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def human_bytes(s):
    v, u = s.split()
    return int(float(v) * HUMAN[u])


def push(path):
    txt = ANSI.sub("", open(path, errors="replace").read())
    out = {}
    m = re.search(r"pushed smr artifact \S+ to \S+: uploaded (\d+) of (\d+) blobs \(([^)]*)\), "
                  r"(\d+) already there \(([^)]*)\); (\d+) packs of (\d+) chunks; referrers: (\S+); "
                  r"([0-9.]+)s", txt)
    if not m:
        sys.exit(f"registry_bench: no 'pushed smr artifact' summary in {path}")
    out.update(blobs_uploaded=int(m[1]), blobs_total=int(m[2]), bytes_uploaded=human_bytes(m[3]),
               blobs_skipped=int(m[4]), bytes_skipped=human_bytes(m[5]), packs=int(m[6]),
               chunks=int(m[7]), referrers=m[8], push_s=float(m[9]))
    m = re.search(r"smr_registry::push: pushed smr artifact .*? bytes=(\d+)", txt)
    if m:
        out["bytes_uploaded"] = int(m[1])
    m = re.search(r"^(\S+Z)\s+INFO .*pushing smr artifact", txt, re.M)
    out["push_started"] = m[1] if m else None
    print(json.dumps(out))


# ------------------------------------------------------------------ report

TOOLS = {
    "containerd": "containerd {v} (ctr pull + run)",
    "smr": "smr run (packs, default)",
    "smr-zstd": "smr run, `--compress zstd` (packs)",
    "smr-chunk": "smr run, `--pack-chunks 1` (blob per chunk)",
    "smr-profile": "smr run with its startup profile (packs)",
    "smr-zstd-profile": "smr run with its startup profile, `--compress zstd`",
    "smr-zstd-warm": "smr run with its startup profile, `--compress zstd`, warm node cache",
    "snapshotter": "containerd {v} + smr snapshotter (smr pull --containerd + ctr run)",
    "snapshotter-profile": "containerd {v} + smr snapshotter, with the startup profile",
    "snapshotter-zstd": "containerd {v} + smr snapshotter, `--compress zstd`",
    "snapshotter-zstd-profile": "containerd {v} + smr snapshotter, `--compress zstd`, startup profile",
}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rng(xs):
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return ""
    return f" ({min(xs):.2f}-{max(xs):.2f})"


def get(d, *path):
    for p in path:
        if d is None:
            return None
        d = d.get(p)
    return d


def pct(x, digits=0):
    return "-" if x is None else f"{x * 100:.{digits}f}%"


def mb(x):
    return "-" if x is None else f"{x / 1e6:.1f}"


def report(path, rounds, rate, delay, ctd_version):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    runs = collections.defaultdict(list)
    for r in rows:
        if r["kind"] == "run":
            runs[(r["link"], r["tool"])].append(r)
    builds = [r.get("builds") for r in rows if r["kind"] == "run" and r.get("builds") is not None]
    loads = [r.get("load") for r in rows if r["kind"] == "run" and r.get("load") is not None]
    print(f"Rounds: {rounds} (median of the successful runs; range in brackets). Bytes = response bodies the "
          f"registry wrote (its log), i.e. everything the tool downloaded: manifests, configs, "
          f"layers / recipe, pack index, chunks. Requests = HTTP requests the registry answered "
          f"(of them: blob GETs, and GET /v2/ probes).")
    if builds:
        print(f"Other compilers (rustc processes) running during the timed runs: "
              f"{sum(1 for b in builds if b > 0)} of {len(builds)} runs "
              f"(max {max(builds)} at once); load average 1 min at the runs: "
              f"{min(loads):.1f}-{max(loads):.1f}.")
    print()
    summary = {}
    for link in ("loopback", "shaped"):
        present = [t for t in TOOLS if (link, t) in runs]
        if not present:
            continue
        title = "loopback" if link == "loopback" else f"shaped link: {rate}, +{delay} ms per round trip"
        print(f"#### {title}\n")
        print("| tool | wall s | wall vs containerd | MB | bytes vs containerd | requests (blob GETs; /v2/ probes) "
              "| most at once at the registry | smr: chunks fetched, max in flight |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        base = runs.get((link, "containerd"))
        bw = med(r["wall"] for r in base) if base else None
        bb = med(get(r, "reg", "bytes") for r in base) if base else None
        for tool in present:
            v = runs[(link, tool)]
            w = med(r["wall"] for r in v)
            b = med(get(r, "reg", "bytes") for r in v)
            req = med(get(r, "reg", "requests") for r in v)
            bg = med(get(r, "reg", "blob_gets") for r in v)
            pg = med(get(r, "reg", "pings") for r in v)
            mc = max((get(r, "reg", "max_concurrent") or 0) for r in v)
            rw = w / bw if bw and tool != "containerd" else None
            rb = b / bb if bb and b is not None and tool != "containerd" else None
            summary[(link, tool)] = dict(wall=w, bytes=b, rw=rw, rb=rb, req=req)
            name = TOOLS[tool].format(v=ctd_version)
            if tool == "containerd" or tool.startswith("snapshotter"):
                p = med(r.get("pull") for r in v)
                name += f"; pull {p:.2f} s" if p is not None else ""
                smr = "-"
                if tool != "containerd":
                    rss = max((r.get("daemon_rss_kib") or 0) for r in v)
                    smr = f"daemon RSS {rss / 1024:.1f} MiB" if rss else "-"
            else:
                ch = med(get(r, "smr", "chunks_fetched") for r in v)
                mi = max((get(r, "smr", "max_inflight") or 0) for r in v)
                smr = "-" if ch is None else f"{ch:.0f}, {mi}"
            reqs = "-" if req is None else f"{req:.0f} ({bg:.0f}; {pg:.0f})"
            if len(v) < int(rounds):
                name += f" ({len(v)} of {rounds} runs succeeded)"
            print(f"| {name} | {w:.2f}{rng(r['wall'] for r in v)} | {pct(rw)} | {mb(b)} | {pct(rb, 1)} "
                  f"| {reqs} | {mc} | {smr} |")
        print()

    pushes = [r for r in rows if r["kind"] == "push"]
    if pushes:
        print("#### Push (`smr convert docker://... --push`, once per variant)\n")
        print("| variant | link | push s (smr's own timing) | convert + push wall s | blobs uploaded "
              "| MB uploaded | registry requests during the push |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in pushes:
            meth = get(r, "reg", "methods") or {}
            pings = get(r, "reg", "pings") or 0
            reqs = ", ".join(f"{k} {v}" + (f" incl. {pings} GET /v2/" if k == "GET" and pings else "")
                             for k, v in sorted(meth.items()))
            print(f"| {r['variant']} | {r['link']} | {r['push_s']:.2f} | {r['wall']:.2f} "
                  f"| {r['blobs_uploaded']} of {r['blobs_total']} ({r['packs']} packs of {r['chunks']} chunks) "
                  f"| {mb(r['bytes_uploaded'])} | {get(r, 'reg', 'requests')} ({reqs}) |")
        print()

    incr = [r for r in rows if r["kind"] == "incr"]
    if incr:
        print("#### Second image into the same repository (debian, then debian-python, then "
              "debian-python again)\n")
        print("| variant | image pushed | push s | blobs uploaded | MB uploaded | blobs already there (MB) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in incr:
            print(f"| {r['variant']} | {r['step']} | {r['push_s']:.2f} | {r['blobs_uploaded']} of "
                  f"{r['blobs_total']} | {mb(r['bytes_uploaded'])} | {r['blobs_skipped']} "
                  f"({mb(r['bytes_skipped'])}) |")
        print()

    fails = [r for r in rows if r["kind"] == "fail"]
    if fails:
        print("Failed runs (not in the medians):")
        for r in fails:
            print(f"- {r['tool']}, {r['link']}, round {r['round']}: {r.get('error')}")
        print()

    def target(what, key, field, limit, digits):
        x = summary.get(key, {}).get(field)
        verdict = "not measured" if x is None else f"{pct(x, digits)}: {'met' if x <= limit else 'MISSED'}"
        print(f"- Target: {what} <= {limit * 100:.0f}% of containerd's: {verdict}")

    target("smr wall time on the shaped link", ("shaped", "smr"), "rw", 0.25, 0)
    target("smr --compress zstd wall time on the shaped link", ("shaped", "smr-zstd"), "rw", 0.25, 0)
    target("smr --compress zstd bytes (shaped link)", ("shaped", "smr-zstd"), "rb", 0.15, 1)
    target("smr with its startup profile, wall time on the shaped link", ("shaped", "smr-profile"), "rw", 0.25, 0)
    target("smr with its startup profile, --compress zstd, wall time on the shaped link",
           ("shaped", "smr-zstd-profile"), "rw", 0.25, 0)
    target("smr with its startup profile, --compress zstd, bytes (shaped link)",
           ("shaped", "smr-zstd-profile"), "rb", 0.15, 1)
    target("containerd with the smr snapshotter, wall time on the shaped link", ("shaped", "snapshotter"), "rw", 0.25, 0)
    target("containerd with the smr snapshotter and a startup profile, wall time on the shaped link",
           ("shaped", "snapshotter-profile"), "rw", 0.15, 0)
    target("containerd with the smr snapshotter, bytes (shaped link)", ("shaped", "snapshotter"), "rb", 0.30, 1)
    target("containerd with the smr snapshotter, --compress zstd, wall time on the shaped link",
           ("shaped", "snapshotter-zstd"), "rw", 0.25, 0)
    target("containerd with the smr snapshotter, --compress zstd and a startup profile, wall time on the shaped link",
           ("shaped", "snapshotter-zstd-profile"), "rw", 0.15, 0)
    target("containerd with the smr snapshotter, --compress zstd, bytes (shaped link)",
           ("shaped", "snapshotter-zstd"), "rb", 0.30, 1)
    for link in ("loopback", "shaped"):
        p, c = summary.get((link, "smr")), summary.get((link, "smr-chunk"))
        if p and c:
            print(f"- Packs vs blob per chunk, {link}: wall {p['wall']:.2f} vs {c['wall']:.2f} s, "
                  f"{mb(p['bytes'])} vs {mb(c['bytes'])} MB, {p['req']:.0f} vs {c['req']:.0f} requests")


def main(argv):
    if len(argv) >= 3 and argv[0] == "record":
        record(argv[1], argv[2], argv[3:])
    elif len(argv) == 2 and argv[0] == "push":
        push(argv[1])
    elif len(argv) == 6 and argv[0] == "report":
        report(*argv[1:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
