#!/usr/bin/env bash
# Cold start from S3 against the same start from a registry, on the shaped
# link (issue: storage that scales with chunk count). debian-python is
# converted twice from the same source, default options: pushed to a local
# registry as an smr artifact (`--push --no-optimize`), and into a packed
# S3 store (s3s-fs) with its recipe. Each round then times, with an empty
# node cache and the page cache dropped, in alternating order:
#   registry: smr run docker://PROXY/debian-python:bookworm -- CMD
#   s3:       smr run py.recipe --store s3://smr/py -- CMD   (AWS_ENDPOINT_URL=http://PROXY)
# each through a fresh scripts/bench/shape-proxy.py in front of its server.
# Prints a markdown table: median wall time, bytes the proxy carried to the
# client and connections, and the ratio to the registry.
# Usage: scripts/bench-s3.sh [ROUNDS]
#   SMR_BIN      the smr binary (default target/release/smr; use a copy)
#   SMR_BENCH_RATE=100mbit SMR_BENCH_DELAY_MS=20   the shaped link
set -euo pipefail
rounds=${1:-5}
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${SMR_IMAGE_CACHE:-/var/cache/smr-test-images}
layout=$cache/oci
smr=${SMR_BIN:-$here/target/release/smr}
rate=${SMR_BENCH_RATE:-100mbit}
delay_ms=${SMR_BENCH_DELAY_MS:-20}
cmd=(python3 -c 'import numpy')
[ -x "$smr" ] || (cd "$here" && cargo build --release -q -p smr)
"$here/scripts/build-test-images.sh" "$cache" >/dev/null
work=$(mktemp -d /var/tmp/smr-bench-s3.XXXXXX)
proxy_pid=""
cleanup() {
  [[ -n $proxy_pid ]] && kill "$proxy_pid" 2>/dev/null && wait "$proxy_pid" 2>/dev/null
  "$here/scripts/registry.sh" stop "$work/reg" >/dev/null 2>&1 || true
  "$here/scripts/s3.sh" stop "$work/s3" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
log() { printf '[bench-s3 %s] %s\n' "$(date +%T)" "$*" >&2; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

reg=$("$here/scripts/registry.sh" start "$work/reg" 0)
s3=$("$here/scripts/s3.sh" start "$work/s3" 0 --keys smrbench:smrbenchsecret --bucket smr)
s3env() {
  AWS_ENDPOINT_URL=http://$1 AWS_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=smrbench \
    AWS_SECRET_ACCESS_KEY=smrbenchsecret AWS_REGION=us-east-1 "${@:2}"
}
skopeo copy --quiet --dest-tls-verify=false "oci:$layout:debian-python" "docker://$reg/debian-python:bookworm"
"$smr" keygen -o "$work/key" >/dev/null
log "converting: registry artifact, packed S3 store"
"$smr" convert "docker://$reg/debian-python:bookworm" --push --no-optimize --key-file "$work/key" 2>"$work/push.err" ||
  { cat "$work/push.err" >&2; exit 1; }
s3env "$s3" "$smr" convert "oci:$layout:debian-python" --store s3://smr/py -o "$work/py.recipe" \
  --key-file "$work/key" 2>"$work/s3.err" || { cat "$work/s3.err" >&2; exit 1; }
log "S3 store: $(find "$work/s3/data/smr/py/packs" -type f | wc -l) packs, $(find "$work/s3/data/smr/py/indexes" -type f | wc -l) index"

proxy_port=$(free_port)
# run_one TOOL: one timed start; appends "TOOL wall bytes_s2c connections".
run_one() {
  local tool=$1 upstream t0 t1
  case $tool in registry) upstream=$reg ;; s3) upstream=$s3 ;; esac
  rm -rf "$work/cache" "$work/proxy.json" "$work/proxy.addr"
  python3 "$here/scripts/bench/shape-proxy.py" --listen "127.0.0.1:$proxy_port" --upstream "$upstream" \
    --rate "$rate" --delay-ms "$delay_ms" --stats "$work/proxy.json" >"$work/proxy.addr" 2>"$work/proxy.err" &
  proxy_pid=$!
  for _ in $(seq 100); do [[ -s $work/proxy.addr ]] && break; sleep 0.05; done
  sync; echo 3 > /proc/sys/vm/drop_caches
  t0=$(date +%s.%N)
  case $tool in
    registry) "$smr" run --key-file "$work/key" --cache-dir "$work/cache" \
        "docker://127.0.0.1:$proxy_port/debian-python:bookworm" -- "${cmd[@]}" >"$work/run.out" 2>&1 ;;
    s3) s3env "127.0.0.1:$proxy_port" "$smr" run --key-file "$work/key" --cache-dir "$work/cache" \
        "$work/py.recipe" --store s3://smr/py -- "${cmd[@]}" >"$work/run.out" 2>&1 ;;
  esac || { cat "$work/run.out" >&2; exit 1; }
  t1=$(date +%s.%N)
  kill -TERM "$proxy_pid"; wait "$proxy_pid" || true; proxy_pid=""
  python3 - "$tool" "$t0" "$t1" "$work/proxy.json" >>"$work/times" <<'PY'
import json, sys
tool, t0, t1, stats = sys.argv[1:]
s = json.load(open(stats))
print(tool, round(float(t1) - float(t0), 3), s["bytes_s2c"], s["connections"])
PY
}
for r in $(seq "$rounds"); do
  if ((r % 2)); then order=(registry s3); else order=(s3 registry); fi
  for tool in "${order[@]}"; do
    log "round $r: $tool"
    run_one "$tool"
  done
done
python3 - "$work/times" "$rate" "$delay_ms" "$(cd "$here" && git rev-parse --short HEAD)" "$rounds" <<'PY'
import statistics, sys
path, rate, delay, commit, rounds = sys.argv[1:]
rows = {}
for line in open(path):
    tool, wall, b, conns = line.split()
    rows.setdefault(tool, []).append((float(wall), int(b), int(conns)))
base = statistics.median(w for w, _, _ in rows["registry"])
print(f"Shaped link {rate}, +{delay} ms per round trip; median of {rounds} (range).\n")
print("| store | wall s (median) | range | vs registry | MB to the node | connections |")
print("| --- | --- | --- | --- | --- | --- |")
for tool in ("registry", "s3"):
    r = rows[tool]
    walls = [w for w, _, _ in r]
    med = statistics.median(walls)
    mb = statistics.median(b for _, b, _ in r) / 1e6
    conns = statistics.median(c for _, _, c in r)
    print(f"| {tool} | {med:.2f} | {min(walls):.2f}-{max(walls):.2f} | {med / base:.2f}x | {mb:.1f} | {conns:.0f} |")
print(f"| commit | {commit} | | | | |")
PY
