#!/usr/bin/env bash
# Writable volumes, measured on debian (the test image):
#   writes   `qemu-img bench -w` through NBD: 4 KiB writes at a stride of
#            37 blocks (scattered over the image, 16 in flight, a FLUSH
#            every 256) and 1 MiB sequential writes (4 in flight, a FLUSH
#            every 32), each to a fresh volume
#            (`smr serve-nbd --volume`) and to a fresh qcow2 overlay on the
#            extracted image served by `qemu-nbd`, interleaved, median of
#            RUNS; ratio smr / qemu-nbd (> 1: smr faster).
#   commit   1% of the image's chunks written (one 4 KiB block each), then
#            `smr commit` against `smr convert` of the same image into an
#            empty store: time ratio, and bytes stored against the dirty
#            chunks' bytes.
#   gc       a store of 20 conversions (20 salts, so 20 disjoint chunk sets
#            of ~1,500 chunks, in packs), 10 kept as roots: `smr gc` time
#            and peak RSS, packs before and after.
# Prints markdown tables.
#
# Usage: scripts/bench-volume.sh [RUNS]   (default 5; root; SMR_BIN=path)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
runs=${1:-5}
smr=${SMR_BIN:-$here/target/release/smr}
cache=${SMR_TEST_IMAGES:-/var/cache/smr-test-images}
[[ -x $smr ]] || { echo "no smr binary at $smr (cargo build --release -p smr)" >&2; exit 1; }
[[ $(id -u) == 0 ]] || { echo "must run as root" >&2; exit 1; }
for t in qemu-img qemu-nbd nbdinfo; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }; done
"$here/scripts/build-test-images.sh" "$cache" >/dev/null

work=$(mktemp -d /var/tmp/smr-bench-volume.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  rm -rf -- "$work"
}
trap cleanup EXIT
log() { printf '[bench-volume %s] %s\n' "$(date +%T)" "$*" >&2; }
export SMR_ROOT=$work/root SMR_CACHE_DIR=$work/cache SMR_KEY_FILE=$work/key SMR_POLICY_DIR=$work/no-policy
"$smr" keygen -o "$work/key"
"$smr" convert "oci:$cache/oci:debian" --store "$work/store" -o "$work/deb.recipe" 2>/dev/null
"$smr" extract "$work/deb.recipe" --store "$work/store" -o "$work/base.img" 2>/dev/null
size=$(stat -c %s "$work/base.img")

wait_socket() { for _ in $(seq 200); do [[ -S $1 ]] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }
# bench URI ARGS...: seconds of `qemu-img bench -w ARGS` against URI.
bench() {
  local uri=$1 t0 t1; shift
  t0=$(date +%s.%N)
  qemu-img bench -w -f raw "$@" "$uri" >/dev/null
  t1=$(date +%s.%N)
  python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$t0" "$t1"
}
# serve_smr: a fresh volume served; sets $uri. (Not in $(...): the server
# would hold the substitution's pipe, and its pid would be lost.)
serve_smr() {
  "$smr" volume rm v >/dev/null 2>&1 || true
  "$smr" volume create v --from "$work/deb.recipe" --store "$work/store" --size base --no-journal 2>/dev/null
  rm -f "$work/smr.sock"
  "$smr" serve-nbd --volume v --socket "$work/smr.sock" >/dev/null 2>"$work/smr.log" &
  pids+=($!)
  wait_socket "$work/smr.sock"
  uri="nbd+unix:///v?socket=$work/smr.sock"
}
serve_qemu() {
  rm -f "$work/ov.qcow2" "$work/qemu.sock"
  qemu-img create -q -f qcow2 -b "$work/base.img" -F raw "$work/ov.qcow2"
  qemu-nbd --socket "$work/qemu.sock" -f qcow2 -x v -t --cache=writeback "$work/ov.qcow2" >/dev/null 2>"$work/qemu.log" &
  pids+=($!)
  wait_socket "$work/qemu.sock"
  uri="nbd+unix:///v?socket=$work/qemu.sock"
}
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; pids=(); }

count4k=$((size / 4096 / 2))
count1m=$((size / (1 << 20) - 1))
: >"$work/writes"
for i in $(seq "$runs"); do
  for server in smr qemu; do
    serve_$server
    r=$(bench "$uri" -c "$count4k" -s 4096 -S $((4096 * 37)) -d 16 --pattern 171 --flush-interval 256)
    stop_all
    serve_$server
    s=$(bench "$uri" -c "$count1m" -s $((1 << 20)) -d 4 --pattern 171 --flush-interval 32)
    stop_all
    echo "$server $r $s" >>"$work/writes"
    log "run $i $server: 4K ${r}s, 1M ${s}s"
  done
done

# commit: 1% of the chunks dirtied through the volume.
"$smr" volume rm v >/dev/null 2>&1 || true
"$smr" volume create v --from "$work/deb.recipe" --store "$work/store" --size base --no-journal 2>/dev/null
chunks=$((size / 65536))
dirty=$((chunks / 100))
serve_smr
qemu-img bench -w -f raw -c "$dirty" -s 4096 -S $((65536 * 97)) -d 8 --pattern 171 "$uri" >/dev/null
stop_all
t0=$(date +%s.%N)
"$smr" commit v -o "$work/new.recipe" 2>"$work/commit.log"
t1=$(date +%s.%N)
commit_s=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$t0" "$t1")
t0=$(date +%s.%N)
"$smr" convert "oci:$cache/oci:debian" --store "$work/store2" -o "$work/again.recipe" 2>/dev/null
t1=$(date +%s.%N)
convert_s=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$t0" "$t1")
commit_line=$(tail -1 "$work/commit.log")

# gc: 20 conversions, 10 roots.
mkdir -p "$work/gcroots"
for i in $(seq 20); do
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/salt$i"
  "$smr" convert "oci:$cache/oci:debian" --store "$work/gcstore" -o "$work/r$i.recipe" --salt-file "$work/salt$i" 2>/dev/null
  (( i <= 10 )) && cp "$work/r$i.recipe" "$work/gcroots/"
done
# Packs and chunk files (temp files aside).
stored() { find "$work/gcstore/packs" "$work/gcstore/chunks" -type f ! -name '.tmp-*' | wc -l; }
before=$(stored)
/usr/bin/time -f '%M %e' -o "$work/gc.time" "$smr" gc --store "$work/gcstore" --keep "$work/gcroots" --grace 0s 2>"$work/gc.log"
after=$(stored)
read -r gc_rss gc_s <"$work/gc.time"

python3 - "$work/writes" "$commit_s" "$convert_s" "$commit_line" "$dirty" "$chunks" "$before" "$after" "$gc_s" "$gc_rss" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    s, r, q = line.split()
    rows.setdefault(s, []).append((float(r), float(q)))
med = lambda s, i: statistics.median(x[i] for x in rows[s])
print("| writes through NBD | smr s | qemu-nbd (qcow2 overlay) s | smr / qemu-nbd throughput | runs |")
print("| --- | --- | --- | --- | --- |")
for i, what in [(0, "4 KiB, stride 37 blocks, 16 in flight, FLUSH every 256"), (1, "1 MiB sequential, 4 in flight, FLUSH every 32")]:
    a, b = med("smr", i), med("qemu", i)
    print(f"| {what} | {a:.3f} | {b:.3f} | {b / a:.2f}x | {len(rows['smr'])} |")
commit_s, convert_s, line, dirty, chunks = float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
print()
print("| commit of 1% dirty chunks | value |")
print("| --- | --- |")
print(f"| chunks dirtied | {dirty} of {chunks} |")
print(f"| `smr commit` | {commit_s:.3f} s |")
print(f"| `smr convert` of the image | {convert_s:.3f} s |")
print(f"| commit / convert | {commit_s / convert_s:.3f}x |")
print(f"| commit's report | {line} |")
before, after, gc_s, rss = sys.argv[7], sys.argv[8], float(sys.argv[9]), int(sys.argv[10])
print()
print("| gc of 20 images, 10 roots | value |")
print("| --- | --- |")
print(f"| packs (and chunk files) before / after | {before} / {after} |")
print(f"| time | {gc_s:.2f} s |")
print(f"| peak RSS | {rss / 1024:.1f} MiB |")
EOF
