#!/usr/bin/env bash
# Cold start from a registry (issue 4, "Performance"): debian-python running
# `python3 -c 'import numpy'`, smr's lazy start vs a full pull and run with
# containerd 1.6, on loopback and through a shaped link. Needs root.
#
# Usage:
#   scripts/bench-registry.sh [ROUNDS]        (default 3; prints markdown)
#
# Setup (once): a throwaway registry (scripts/registry.sh start DIR 0) with
# the cached test image pushed as ADDR/debian-python:bookworm and again as
# ADDR/debian-python-zstd:bookworm; `smr convert docker://ADDR/REPO:bookworm
# --push` converts both (the second with --compress zstd).
#
# Links: "loopback" = straight to the registry; "shaped" = through
# scripts/bench/shape-proxy.py (default 100 Mbit/s server->client, 20 ms
# added per request round trip and per new connection), a fresh proxy per
# timed run so its byte count is that run's.
#
# Per round, link and tool (page cache dropped before each timed command):
#   containerd  a private containerd (fresh --root/--state/--address under a
#               temp dir, own config, stopped and removed after the run), timed:
#               ctr images pull --plain-http REF && ctr run --rm REF ID CMD
#   smr         smr run --cache-dir FRESH docker://REF -- CMD
#   smr-zstd    the same from the --compress zstd artifact
# Bytes: shaped link = server->client bytes through the proxy (everything:
# HTTP, manifests, recipes, chunks); loopback = the tool's own count
# (containerd: blobs in its content store; smr: --stats bytes_fetched).
#
# Environment:
#   SMR_BENCH_RATE=100mbit  SMR_BENCH_DELAY_MS=20   the shaped link
#   SMR_BENCH_LINKS="loopback shaped"
#   SMR_BENCH_TOOLS="containerd smr smr-zstd"
#   SMR_BENCH_BUILD=1       cargo build --release -p smr first (0: use as is)
#   SMR_BIN                 the smr binary (default target/release/smr)
#   SMR_CONVERT_ARGS, SMR_RUN_ARGS   extra arguments for smr convert / run
#   SMR_IMAGE_CACHE         test images (default /var/cache/smr-test-images)
# Exits 1 if a requested tool could not be measured (e.g. this smr has no
# `convert --push` yet); the rows that were measured are printed anyway.
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; fi
rounds=${1:-3}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "bench-registry: ROUNDS must be a positive number" >&2; exit 2; }
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${SMR_IMAGE_CACHE:-/var/cache/smr-test-images}
layout=$cache/oci
rate=${SMR_BENCH_RATE:-100mbit}
delay_ms=${SMR_BENCH_DELAY_MS:-20}
links=${SMR_BENCH_LINKS:-loopback shaped}
tools=${SMR_BENCH_TOOLS:-containerd smr smr-zstd}
read -r -a convert_args <<<"${SMR_CONVERT_ARGS:-}"
read -r -a run_args <<<"${SMR_RUN_ARGS:-}"
pycmd=(python3 -c 'import numpy')
smr=${SMR_BIN:-$here/target/release/smr}
proxy_py=$here/scripts/bench/shape-proxy.py

log() { printf '[bench-registry %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }
want() { [[ " $tools " == *" $1 "* ]]; }

[[ $(id -u) == 0 ]] || die "must run as root (containerd, smr run, drop_caches)"
need=(docker-registry skopeo python3 curl findmnt)
want containerd && need+=(containerd ctr runc containerd-shim-runc-v2)
for t in "${need[@]}"; do
  command -v "$t" >/dev/null || die "missing tool: $t (scripts/install-deps.sh)"
done
if want containerd; then
  containerd --version | grep -q ' 1\.6\.' || log "warning: not containerd 1.6: $(containerd --version)"
fi
"$here/scripts/build-test-images.sh" "$cache" >/dev/null

work=$(mktemp -d /var/tmp/smr-bench-registry.XXXXXX)
res=$work/results
: >"$res"
proxy_pid="" ctd_pid="" ctd_dir=""
failed=()   # "tool: reason" for tools that could not be measured

# Unmount whatever is still mounted under $work, deepest first.
umount_under() {
  local m
  findmnt -rn -o TARGET | { grep -F -- "$1/" || true; } | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}

cleanup() {
  local rc=$?
  set +e
  [[ -n $proxy_pid ]] && kill "$proxy_pid" 2>/dev/null && wait "$proxy_pid" 2>/dev/null
  [[ -n $ctd_pid ]] && ctd_stop
  "$here/scripts/registry.sh" stop "$work/registry" 2>/dev/null
  umount_under "$work"
  if findmnt -rn -o TARGET | grep -qF -- "$work/"; then
    log "mounts left under $work; not removing it"
  else
    rm -rf -- "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- registry and images ---------------------------------------------------
addr=$("$here/scripts/registry.sh" start "$work/registry" 0)
log "registry at $addr; pushing debian-python (twice: plain and -zstd repos)"
for repo in debian-python debian-python-zstd; do
  skopeo copy --quiet --dest-tls-verify=false "oci:$layout:debian-python" \
    "docker://$addr/$repo:bookworm"
done
# One port for every proxy instance, so image references stay the same.
proxy_addr=127.0.0.1:$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# proxy_start: a fresh shaping proxy in front of the registry on $proxy_addr.
proxy_start() {
  rm -f "$work/proxy.json" "$work/proxy.addr"
  "$proxy_py" --listen "$proxy_addr" --upstream "$addr" --rate "$rate" --delay-ms "$delay_ms" \
    --stats "$work/proxy.json" --stats-interval 60 >"$work/proxy.addr" 2>"$work/proxy.err" &
  proxy_pid=$!
  local i
  for ((i = 0; i < 200; i++)); do
    [[ -s $work/proxy.addr ]] && return 0
    kill -0 "$proxy_pid" 2>/dev/null || break
    sleep 0.05
  done
  cat "$work/proxy.err" >&2
  die "shape-proxy did not start on $proxy_addr"
}
# proxy_stop: stop it; sets link_stats to "BYTES CONNECTIONS MAX_PARALLEL"
# (server->client bytes it carried, connections opened, most open at once).
# Not called in $(...): the proxy is a child of this shell.
link_stats="- - -"
proxy_stop() {
  kill -TERM "$proxy_pid"
  wait "$proxy_pid" || die "shape-proxy failed: $(cat "$work/proxy.err")"
  proxy_pid=""
  link_stats=$(python3 -c 'import json, sys; s = json.load(open(sys.argv[1])); assert s["final"]
print(s["bytes_s2c"], s["connections"], s["max_active"])' "$work/proxy.json")
}

# ---- containerd --------------------------------------------------------------
# ctd_start DIR: a private containerd with everything under DIR and its own
# config (not /etc/containerd/config.toml); CRI off, overlayfs snapshotter.
ctd_start() {
  ctd_dir=$1
  mkdir -p "$ctd_dir"
  cat >"$ctd_dir/config.toml" <<EOF
version = 2
root = "$ctd_dir/root"
state = "$ctd_dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$ctd_dir/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$ctd_dir/opt"
EOF
  # setsid: a ^C of the script must not kill containerd before cleanup has
  # removed its containers (their shims would outlive it).
  setsid containerd --config "$ctd_dir/config.toml" --root "$ctd_dir/root" --state "$ctd_dir/state" \
    --address "$ctd_dir/containerd.sock" >"$ctd_dir/containerd.log" 2>&1 &
  ctd_pid=$!
  local i
  for ((i = 0; i < 200; i++)); do
    ctr -a "$ctd_dir/containerd.sock" version >/dev/null 2>&1 && return 0
    kill -0 "$ctd_pid" 2>/dev/null || break
    sleep 0.1
  done
  tail -20 "$ctd_dir/containerd.log" >&2
  die "containerd did not start"
}
# ctd_stop: kill leftover tasks (after an interrupt), stop containerd,
# unmount and remove its directory: the next run starts with no content
# and no snapshots.
ctd_stop() {
  local sock=$ctd_dir/containerd.sock id
  if kill -0 "$ctd_pid" 2>/dev/null; then
    for id in $(timeout 10 ctr -a "$sock" tasks ls -q 2>/dev/null); do
      timeout 10 ctr -a "$sock" tasks kill -s SIGKILL "$id" >/dev/null 2>&1
      timeout 10 ctr -a "$sock" tasks delete -f "$id" >/dev/null 2>&1
    done
    for id in $(timeout 10 ctr -a "$sock" containers ls -q 2>/dev/null); do
      timeout 10 ctr -a "$sock" containers delete "$id" >/dev/null 2>&1
    done
    kill -TERM "$ctd_pid" 2>/dev/null
  fi
  wait "$ctd_pid" 2>/dev/null || true
  ctd_pid=""
  umount_under "$ctd_dir"
  findmnt -rn -o TARGET | grep -qF -- "$ctd_dir/" || rm -rf -- "$ctd_dir"
}

# ctd_run LINK ROUND REGISTRY: appends a result line.
ctd_run() {
  local link=$1 r=$2 reg=$3 t0 t1 t2 sock bytes_tool
  local ref=$reg/debian-python:bookworm id=bench-$r-$link
  ctd_start "$work/ctd"
  sock=$ctd_dir/containerd.sock
  [[ $link == shaped ]] && proxy_start
  drop
  t0=$(now)
  ctr -a "$sock" images pull --plain-http "$ref" >"$ctd_dir/pull.out" 2>&1 \
    || { tail -20 "$ctd_dir/pull.out" >&2; die "ctr images pull $ref failed"; }
  t1=$(now)
  ctr -a "$sock" run --rm "$ref" "$id" "${pycmd[@]}" >"$ctd_dir/run.out" 2>&1 \
    || { cat "$ctd_dir/run.out" >&2; die "ctr run $ref failed"; }
  t2=$(now)
  link_stats="- - -"
  [[ $link == shaped ]] && proxy_stop
  bytes_tool=$(find "$ctd_dir/root/io.containerd.content.v1.content/blobs" -type f -printf '%s\n' |
    awk '{ s += $1 } END { print s + 0 }')
  echo "run $link containerd $r $(elapsed "$t0" "$t2") $(elapsed "$t0" "$t1") $link_stats $bytes_tool" >>"$res"
  ctd_stop
}

# ---- smr ---------------------------------------------------------------------
smr_ok=0
smr_prepare() {
  if [[ ${SMR_BENCH_BUILD:-1} == 1 ]]; then
    log "cargo build --release -p smr (may wait for the build lock)"
    (cd "$here" && cargo build --release -q -p smr) || { failed+=("smr: cargo build --release -p smr failed"); return 1; }
  fi
  [[ -x $smr ]] || { failed+=("smr: $smr not built"); return 1; }
  if ! "$smr" convert --help 2>/dev/null | grep -q -- '--push'; then
    failed+=("smr: $smr has no 'smr convert docker://... --push' yet (registry support is not built in); smr rows skipped")
    return 1
  fi
  "$smr" keygen -o "$work/owner.key" >/dev/null
  export SMR_KEY_FILE=$work/owner.key
  local repo extra
  for repo in debian-python debian-python-zstd; do
    extra=(); [[ $repo == *-zstd ]] && extra=(--compress zstd)
    log "smr convert docker://$addr/$repo:bookworm --push ${extra[*]}"
    if ! "$smr" convert "docker://$addr/$repo:bookworm" --push "${extra[@]}" "${convert_args[@]}" \
        >"$work/convert-$repo.out" 2>&1; then
      cat "$work/convert-$repo.out" >&2
      failed+=("smr: smr convert docker://$addr/$repo:bookworm --push ${extra[*]} failed (output above)")
      return 1
    fi
  done
  smr_ok=1
}

# smr_run LINK ROUND REGISTRY TOOL: appends a result line, or returns 1.
smr_run() {
  local link=$1 r=$2 reg=$3 tool=$4 t0 t1 bytes_tool=- stats=()
  local repo=debian-python
  [[ $tool == smr-zstd ]] && repo=debian-python-zstd
  local ref=docker://$reg/$repo:bookworm c=$work/smr-cache
  rm -rf "$c" "$work/smr-stats.json"
  "$smr" run --help 2>/dev/null | grep -q -- '--stats' && stats=(--stats "$work/smr-stats.json")
  [[ $link == shaped ]] && proxy_start
  drop
  t0=$(now)
  if ! "$smr" run --cache-dir "$c" "${stats[@]}" "${run_args[@]}" "$ref" -- "${pycmd[@]}" \
      >"$work/smr-run.out" 2>&1; then
    cat "$work/smr-run.out" >&2
    [[ $link == shaped ]] && proxy_stop
    failed+=("$tool: smr run --cache-dir DIR $ref -- ${pycmd[*]} failed (output above)")
    return 1
  fi
  t1=$(now)
  link_stats="- - -"
  [[ $link == shaped ]] && proxy_stop
  if [[ -s $work/smr-stats.json ]]; then
    bytes_tool=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("bytes_fetched", "-"))' \
      "$work/smr-stats.json")
  fi
  rm -rf "$c"
  echo "run $link $tool $r $(elapsed "$t0" "$t1") - $link_stats $bytes_tool" >>"$res"
}

if want smr || want smr-zstd; then
  smr_prepare || log "${failed[-1]}"
fi

# ---- rounds ------------------------------------------------------------------
log "$rounds round(s); links: $links; tools: $tools; shaped = $rate, +${delay_ms} ms per round trip"
for r in $(seq "$rounds"); do
  for link in $links; do
    case $link in
      loopback) reg=$addr ;;
      shaped) reg=$proxy_addr ;;
      *) die "unknown link $link (loopback, shaped)" ;;
    esac
    for tool in $tools; do
      case $tool in
        containerd)
          log "round $r, $link: containerd pull + run"
          ctd_run "$link" "$r" "$reg" ;;
        smr | smr-zstd)
          [[ $smr_ok == 1 ]] || continue
          log "round $r, $link: $tool run"
          smr_run "$link" "$r" "$reg" "$tool" || { smr_ok=0; log "${failed[-1]}"; } ;;
        *) die "unknown tool $tool (containerd, smr, smr-zstd)" ;;
      esac
    done
  done
done

# ---- report ------------------------------------------------------------------
python3 - "$res" "$rounds" "$rate" "$delay_ms" "$(containerd --version 2>/dev/null | awk '{print $3}')" <<'PY'
import sys, statistics as st, collections
res, rounds, rate, delay, ctd_version = sys.argv[1:]
runs = collections.defaultdict(list)
for l in open(res):
    f = l.split()
    if f[0] == "run":
        link, tool, r, wall, pull, bl, conns, par, bt = f[1:]
        num = lambda x: None if x == "-" else float(x)
        runs[(link, tool)].append((float(wall), num(pull), num(bl), num(bt), num(conns), num(par)))

def med(xs):
    xs = [x for x in xs if x is not None]
    return st.median(xs) if xs else None

names = {"loopback": "loopback", "shaped": f"shaped {rate} + {delay} ms"}
tools = {"containerd": f"containerd {ctd_version} (ctr pull + run)",
         "smr": "smr run", "smr-zstd": "smr run (--compress zstd)"}
print(f"Rounds: {rounds} (median shown). Bytes: shaped link = server->client bytes through "
      f"the proxy; loopback = the tool's own count (containerd content store; smr --stats "
      f"bytes_fetched).\n")
print("| link | tool | wall s | of which pull s | MB | connections (max at once) | wall vs containerd | bytes vs containerd |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
summary = {}
for link in ("loopback", "shaped"):
    base = runs.get((link, "containerd"))
    bw = med(x[0] for x in base) if base else None
    bb = med((x[2] if link == "shaped" else x[3]) for x in base) if base else None
    for tool in ("containerd", "smr", "smr-zstd"):
        v = runs.get((link, tool))
        if not v:
            continue
        w = med(x[0] for x in v)
        p = med(x[1] for x in v)
        b = med((x[2] if link == "shaped" else x[3]) for x in v)
        c, par = med(x[4] for x in v), max((x[5] for x in v if x[5] is not None), default=None)
        conns = "-" if c is None else f"{c:.0f} ({par:.0f})"
        rw = w / bw if bw and tool != "containerd" else None
        rb = b / bb if bb and b is not None and tool != "containerd" else None
        summary[(link, tool)] = (rw, rb)
        pct = lambda x: "-" if x is None else f"{x * 100:.0f}%"
        print(f"| {names[link]} | {tools[tool]} | {w:.2f} | {'-' if p is None else f'{p:.2f}'} "
              f"| {'-' if b is None else f'{b / 1e6:.1f}'} | {conns} | {pct(rw)} | {pct(rb)} |")
print()

def target(what, key, i, limit):
    x = summary.get(key, (None, None))[i]
    verdict = "not measured" if x is None else f"{x * 100:.0f}%, {'met' if x <= limit else 'MISSED'}"
    print(f"- Target: {what} <= {limit * 100:.0f}% of containerd's: {verdict}")

target("smr wall time on the shaped link", ("shaped", "smr"), 0, 0.25)
target("smr with zstd chunks, bytes on the shaped link", ("shaped", "smr-zstd"), 1, 0.15)
PY

if ((${#failed[@]})); then
  for f in "${failed[@]}"; do log "NOT MEASURED: $f"; done
  exit 1
fi
