#!/usr/bin/env bash
# Interleaved A/B of smr binaries on a profiled start from a registry, on
# the shaped link: for changes whose effect is smaller than this machine's
# drift between the runs of scripts/bench-registry.sh. Needs root.
#
# Usage:
#   scripts/bench-ab.sh ROUNDS BIN_A BIN_B [BIN...]
#
# Each binary converts the image into a repository of its own in one
# throwaway registry (`smr convert --push --compress zstd --optimize-cmd
# CMD`: its own profile and startup pack), then every round runs, for each
# mode and each binary in turn, `smr run` of its repository through
# scripts/bench/shape-proxy.py (100 Mbit/s, 20 ms round trip), page cache
# dropped first:
#   cold  empty node cache;
#   warm  node cache filled by one untimed start over loopback.
# Prints one line per run, then per binary and mode the median wall time
# (range), bytes fetched and the runs that fetched more than the pack (a
# start that read a block its profile lacks).
#
# Environment:
#   SMR_AB_IMAGE=LAYOUT:TAG   OCI layout of the image (default: the node
#                             image of scripts/bench/build-node-image.sh)
#   SMR_AB_CMD="WORDS"        the start, as shell words (default: node
#                             loading http and crypto)
#   SMR_AB_MODES="cold warm"  which starts
#   SMR_AB_WORK=DIR           registry and logs (default: a temp dir,
#                             removed at the end)
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
die() { echo "bench-ab.sh: $*" >&2; exit 1; }
log() { echo "[bench-ab $(date +%H:%M:%S)] $*" >&2; }

[[ $# -ge 3 ]] || usage
rounds=$1
shift
bins=("$@")
[[ $(id -u) == 0 ]] || die "must run as root (smr run, drop_caches)"
for b in "${bins[@]}"; do [[ -x $b ]] || die "not an executable: $b"; done
names=()
for b in "${bins[@]}"; do names+=("$(basename "$b")"); done
[[ $(printf '%s\n' "${names[@]}" | sort -u | wc -l) == "${#bins[@]}" ]] \
  || die "the binaries need different file names (they name their repositories)"

here=$(cd "$(dirname "$0")" && pwd)
image=${SMR_AB_IMAGE:-/var/cache/smr-bench-images/oci:debian-node}
eval "cmd=(${SMR_AB_CMD:-node -e \"require('http'); require('crypto').createHash('sha256').update('x').digest('hex')\"})"
modes=${SMR_AB_MODES:-cold warm}
[[ -d ${image%:*} ]] || die "no OCI layout at ${image%:*} (scripts/bench/build-node-image.sh builds the default)"

if [[ -n ${SMR_AB_WORK:-} ]]; then
  work=$SMR_AB_WORK
  mkdir -p "$work"
else
  work=$(mktemp -d /var/tmp/smr-bench-ab.XXXXXX)
fi
proxy_pid=""
cleanup() {
  [[ -n $proxy_pid ]] && kill "$proxy_pid" 2>/dev/null
  "$here/registry.sh" stop "$work/registry" >/dev/null 2>&1 || true
  [[ -z ${SMR_AB_WORK:-} ]] && rm -rf "$work"
  return 0
}
trap cleanup EXIT

addr=$("$here/registry.sh" start "$work/registry" 0)
key=$work/key
"${bins[0]}" keygen -o "$key" >/dev/null
skopeo copy --quiet --dest-tls-verify=false "oci:$image" "docker://$addr/src:v1"
for i in "${!bins[@]}"; do
  repo=ab-${names[$i]}
  log "${names[$i]}: convert --push into $repo"
  skopeo copy --quiet --src-tls-verify=false --dest-tls-verify=false \
    "docker://$addr/src:v1" "docker://$addr/$repo:v1"
  "${bins[$i]}" convert "docker://$addr/$repo:v1" --push --key-file "$key" --compress zstd \
    --optimize-cmd "$(printf '%q ' "${cmd[@]}")" >"$work/convert-$repo.out" 2>&1 \
    || { tail -20 "$work/convert-$repo.out" >&2; die "converting with ${bins[$i]} failed"; }
  grep "pushed startup profile" "$work/convert-$repo.out" >&2 || die "${bins[$i]} pushed no startup profile"
done

now() { date +%s.%N; }
results=$work/results.tsv
: >"$results"
for ((r = 1; r <= rounds; r++)); do
  for mode in $modes; do
    for i in "${!bins[@]}"; do
      b=${bins[$i]} name=${names[$i]} repo=ab-${names[$i]}
      cache=$work/cache
      rm -rf "$cache" "$work/stats.json"
      if [[ $mode == warm ]]; then
        "$b" run --key-file "$key" --cache-dir "$cache" "docker://$addr/$repo:v1" -- "${cmd[@]}" \
          >"$work/warmup.out" 2>&1 || { tail -5 "$work/warmup.out" >&2; die "$name: warm-up start failed"; }
      fi
      python3 "$here/bench/shape-proxy.py" --listen 127.0.0.1:0 --upstream "$addr" --rate 100mbit --delay-ms 20 \
        >"$work/proxy.addr" 2>"$work/proxy.err" &
      proxy_pid=$!
      for _ in $(seq 200); do [[ -s $work/proxy.addr ]] && break; sleep 0.05; done
      [[ -s $work/proxy.addr ]] || die "shape-proxy did not start: $(cat "$work/proxy.err")"
      px=$(cat "$work/proxy.addr")
      sync
      echo 3 >/proc/sys/vm/drop_caches
      t0=$(now)
      "$b" run --key-file "$key" --cache-dir "$cache" --stats "$work/stats.json" \
        "docker://$px/$repo:v1" -- "${cmd[@]}" >"$work/run.out" 2>&1 \
        || { tail -5 "$work/run.out" >&2; die "$name: $mode start failed"; }
      t1=$(now)
      kill "$proxy_pid"
      wait "$proxy_pid" 2>/dev/null || true
      proxy_pid=""
      python3 - "$work/stats.json" "$name" "$mode" "$r" "$t0" "$t1" >>"$results" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
name, mode, r, t0, t1 = sys.argv[2:7]
print(f"{name}\t{mode}\t{r}\t{float(t1) - float(t0):.3f}\t{s['bytes_fetched']}\t{s['chunks_fetched']}")
PY
      tail -1 "$results" >&2
    done
  done
done

python3 - "$results" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines()]
print("| binary | start | wall s, median (range) | bytes fetched, median | runs with more chunks than the least |")
print("| --- | --- | --- | --- | --- |")
for key in dict.fromkeys((r[0], r[1]) for r in rows):
    sel = [r for r in rows if (r[0], r[1]) == key]
    walls = [float(r[3]) for r in sel]
    chunks = [int(r[5]) for r in sel]
    more = sum(c > min(chunks) for c in chunks)
    print(f"| {key[0]} | {key[1]} | {statistics.median(walls):.3f} ({min(walls):.3f}-{max(walls):.3f}) "
          f"| {int(statistics.median(int(r[4]) for r in sel))} | {more} of {len(sel)} |")
PY
