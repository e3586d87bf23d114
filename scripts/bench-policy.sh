#!/usr/bin/env bash
# What the node's trust policy costs a cold start, on the shaped link of the
# registry benchmark (scripts/bench/shape-proxy.py: 100 Mbit/s, 20 ms per
# round trip): the time until `smr mount docker://…` of debian has mounted
# the image and `cat /etc/os-release` has read through it, with an empty
# node cache, for each policy, interleaved, median of N runs:
#   open      no policy: the first artifact in digest order
#   owner     (a) the owner key opens the recipe's key table (encrypted artifact)
#   signed    (b) a cosign signature by a trusted key (--verify-key)
#   pinned    (c) the artifact's digest is pinned (--pin)
#   index     (b) through an --index tag: the artifact named by the image
#             index (no referrers lookup), signature checked
# Prints a markdown table: median seconds, the difference from `open`, and
# that difference in round trips of the link.
#
# Usage: scripts/bench-policy.sh [RUNS]   (default 5; root; SMR_BIN=path)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
runs=${1:-5}
smr=${SMR_BIN:-$here/target/release/smr}
rate=${SMR_BENCH_RATE:-100mbit}
delay_ms=${SMR_BENCH_DELAY_MS:-20}
cache=${SMR_TEST_IMAGES:-/var/cache/smr-test-images}
[[ -x $smr ]] || { echo "no smr binary at $smr (cargo build --release -p smr)" >&2; exit 1; }
[[ $(id -u) == 0 ]] || { echo "must run as root (mount, drop_caches)" >&2; exit 1; }
"$here/scripts/build-test-images.sh" "$cache" >/dev/null

work=$(mktemp -d /var/tmp/smr-bench-policy.XXXXXX)
proxy=""
cleanup() {
  set +e
  findmnt -rn -o TARGET | grep -F -- "$work/" | sort -r | xargs -r -n1 umount -l 2>/dev/null
  [[ -n $proxy ]] && kill "$proxy" 2>/dev/null && wait "$proxy" 2>/dev/null
  "$here/scripts/registry.sh" stop "$work/registry" >/dev/null 2>&1
  rm -rf -- "$work"
}
trap cleanup EXIT
log() { printf '[bench-policy %s] %s\n' "$(date +%T)" "$*" >&2; }

addr=$("$here/scripts/registry.sh" start "$work/registry" 0)
for repo in pub sec; do
  skopeo copy --quiet --dest-tls-verify=false "oci:$cache/oci:debian" "docker://$addr/$repo:1"
done
"$smr" keygen -o "$work/owner.key"
COSIGN_PASSWORD=bench "$smr" keygen --cosign -o "$work/signer" 2>/dev/null
export COSIGN_PASSWORD=bench SMR_POLICY_DIR=$work/no-policy
log "converting and pushing (public + signed + index tag; encrypted)"
pub_out=$("$smr" convert "docker://$addr/pub:1" --push --no-optimize --no-encrypt \
  --sign-key "$work/signer.key" --index --index-tag idx 2>&1)
pub_digest=$(grep -o 'pushed smr artifact sha256:[0-9a-f]*' <<<"$pub_out" | head -1 | cut -d' ' -f4)
"$smr" convert "docker://$addr/sec:1" --push --no-optimize --key-file "$work/owner.key" >/dev/null 2>&1

proxy_addr=127.0.0.1:$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$here/scripts/bench/shape-proxy.py" --listen "$proxy_addr" --upstream "$addr" \
  --rate "$rate" --delay-ms "$delay_ms" >"$work/proxy.addr" 2>"$work/proxy.err" &
proxy=$!
for _ in $(seq 100); do [[ -s $work/proxy.addr ]] && break; sleep 0.05; done

declare -A image args
image[open]=pub:1;   args[open]=""
image[owner]=sec:1;  args[owner]="--key-file $work/owner.key"
image[signed]=pub:1; args[signed]="--verify-key $work/signer.pub"
image[pinned]=pub:1; args[pinned]="--pin $pub_digest"
image[index]=pub:idx; args[index]="--verify-key $work/signer.pub"
variants=(open owner signed pinned index)

# one VARIANT: seconds until the image is mounted and a file read through it.
one() {
  local v=$1 mnt=$work/mnt-$1 t0 t1
  rm -rf "$work/cache" "$work/state"
  mkdir -p "$mnt"
  sync; echo 3 >/proc/sys/vm/drop_caches
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  "$smr" mount "docker://$proxy_addr/${image[$v]}" "$mnt" --cache-dir "$work/cache" \
    --state-dir "$work/state" ${args[$v]} >/dev/null 2>"$work/$v.err" ||
    { cat "$work/$v.err" >&2; exit 1; }
  cat "$mnt/etc/os-release" >/dev/null
  t1=$(date +%s.%N)
  "$smr" umount "$mnt" --state-dir "$work/state" >/dev/null 2>&1
  python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$t0" "$t1"
}

for i in $(seq "$runs"); do
  for v in "${variants[@]}"; do
    s=$(one "$v")
    echo "$v $s" >>"$work/times"
    log "run $i $v ${s}s"
  done
done

python3 - "$work/times" "$delay_ms" <<'EOF'
import statistics, sys
times = {}
for line in open(sys.argv[1]):
    v, s = line.split()
    times.setdefault(v, []).append(float(s))
rtt = float(sys.argv[2]) / 1000
base = statistics.median(times["open"])
print("| policy | median s | vs open s | vs open, round trips | runs |")
print("| --- | --- | --- | --- | --- |")
for v in ["open", "owner", "signed", "pinned", "index"]:
    m = statistics.median(times[v])
    print(f"| {v} | {m:.3f} | {m - base:+.3f} | {(m - base) / rtt:+.1f} | {len(times[v])} |")
EOF
