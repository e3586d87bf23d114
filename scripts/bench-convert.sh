#!/usr/bin/env bash
# Convert benchmark (issue: convert throughput): smr convert of the
# debian-python test image, side by side in one run with mkfs.ext4 -d and
# mkfs.erofs on the same unpacked tree and casync make on the resulting image.
# smr rows use the default chunking (content-defined, 16K:64K:256K) unless
# named otherwise (smr-convert-fixed: fixed 64 KiB chunks; -512K: fixed
# 512 KiB).
# Usage: scripts/bench-convert.sh [ROUNDS]   (prints a markdown table)
#   SMR_BENCH_CACHE=warm: keep the page cache between commands (the input
#   layout and tree stay cached after a first, untimed round); default:
#   dropped before every timed command.
#   SMR_BENCH_TOOLS: which rows (space-separated names, see `tools` below).
set -euo pipefail
rounds=${1:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${SMR_IMAGE_CACHE:-/var/cache/smr-test-images}
layout=$cache/oci
tag=debian-python
smr=${SMR_BIN:-$here/target/release/smr}   # SMR_BIN: a copy, safe from concurrent builds
[ -x "$smr" ] || (cd "$here" && cargo build --release -q -p smr)
"$here/scripts/build-test-images.sh" "$cache" >/dev/null
work=$(mktemp -d /var/tmp/smr-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
umoci unpack --image "$layout:$tag" "$work/bundle" >/dev/null
rootfs=$work/bundle/rootfs
tree_mb=$(du -sm --apparent-size "$rootfs" | cut -f1)
head -c 32 /dev/urandom > "$work/key"

# time_cmd NAME CMD...: appends "NAME seconds maxrss_kb" to $work/times
warm=${SMR_BENCH_CACHE:-dropped}
time_cmd() {
  local name=$1; shift
  sync
  [[ $warm == warm ]] || echo 3 > /proc/sys/vm/drop_caches
  /usr/bin/time -f "$name %e %M" -a -o "$work/times" "$@" >/dev/null 2>"$work/last.err" || {
    cat "$work/last.err" >&2; exit 1; }
}

size_mb=$(( tree_mb * 3 / 2 + 64 ))
# One timed command per tool; the order rotates every round, so that no
# tool always runs first after the previous round's files were deleted.
run_tool() {
  case $1 in
    smr-convert) time_cmd "$1" "$smr" convert "oci:$layout:$tag" --store "$work/store" -o "$work/a.recipe" --key-file "$work/key"
      cp "$work/last.err" "$work/smr-summary.txt" ;;
    smr-convert-512K) time_cmd "$1" "$smr" convert "oci:$layout:$tag" --store "$work/store-512" -o "$work/b.recipe" --key-file "$work/key" --chunk-size 512K ;;
    smr-convert-fixed) time_cmd "$1" "$smr" convert "oci:$layout:$tag" --store "$work/store-fixed" -o "$work/d.recipe" --key-file "$work/key" --chunking fixed ;;
    smr-convert-zstd) time_cmd "$1" "$smr" convert "oci:$layout:$tag" --store "$work/store-z" -o "$work/z.recipe" --key-file "$work/key" --compress zstd ;;
    smr-convert-plain) time_cmd "$1" "$smr" convert "oci:$layout:$tag" --store "$work/store-p" -o "$work/p.recipe" --no-encrypt ;;
    mkfs.ext4-d) time_cmd "$1" mkfs.ext4 -q -F -b 4096 -I 256 -O ^has_journal -d "$rootfs" "$work/mkfs.img" "${size_mb}M" ;;
    mkfs.erofs) time_cmd "$1" mkfs.erofs --quiet "$work/erofs.img" "$rootfs" ;;
    casync-make)   # on smr's image, made (untimed) in a store of its own
      "$smr" convert "oci:$layout:$tag" --store "$work/store-c" -o "$work/c.recipe" --key-file "$work/key" 2>/dev/null
      "$smr" extract "$work/c.recipe" --store "$work/store-c" --key-file "$work/key" -o "$work/smr.img" 2>/dev/null
      time_cmd "$1" casync make --store="$work/casync.castr" "$work/casync.caibx" "$work/smr.img" ;;
  esac
}
# SMR_BENCH_TOOLS: a subset (space-separated; mkfs.ext4-d is the baseline
# and always runs).
read -r -a tools <<<"${SMR_BENCH_TOOLS:-smr-convert smr-convert-fixed smr-convert-512K smr-convert-zstd smr-convert-plain mkfs.erofs casync-make}"
[[ " ${tools[*]} " == *" mkfs.ext4-d "* ]] || tools+=(mkfs.ext4-d)
if [[ $warm == warm ]]; then   # an untimed round fills the page cache
  for t in "${tools[@]}"; do run_tool "$t"; done
  : >"$work/times"
fi
for r in $(seq "$rounds"); do
  rm -rf "$work/store"* "$work"/*.img "$work"/*.recipe "$work/casync"*
  n=${#tools[@]}
  for i in $(seq 0 $((n - 1))); do
    run_tool "${tools[$(( (i + r - 1) % n ))]}"
  done
done

layer_bytes=$(python3 - "$layout" "$tag" <<'PY'
import json, sys, os
layout, tag = sys.argv[1], sys.argv[2]
idx = json.load(open(os.path.join(layout, "index.json")))
def blob(d): return os.path.join(layout, "blobs", *d.split(":"))
m = next(m for m in idx["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
man = json.load(open(blob(m["digest"])))
import gzip, zlib
total = 0
for l in man["layers"]:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS) if "gzip" in l["mediaType"] else None
    with open(blob(l["digest"]), "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b: break
            total += len(d.decompress(b)) if d else len(b)
print(total)
PY
)
echo "Unpacked tree: ${tree_mb} MiB; uncompressed layer data: $((layer_bytes / 1000000)) MB; ${rounds} rounds, median shown"
echo
echo "| tool | seconds (median) | min-max | MB/s of layer data | peak RSS MiB | vs mkfs.ext4 -d |"
echo "| --- | --- | --- | --- | --- | --- |"
python3 - "$work/times" "$layer_bytes" "${tools[@]}" <<'PY'
import sys, statistics, collections
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    name, secs, rss = line.split()
    rows.setdefault(name, []).append((float(secs), int(rss)))
lb = int(sys.argv[2])
base = statistics.median(s for s, _ in rows["mkfs.ext4-d"])
for name in sys.argv[3:]:
    v = rows[name]
    s = statistics.median(x for x, _ in v)
    lo, hi = min(x for x, _ in v), max(x for x, _ in v)
    rss = max(r for _, r in v) / 1024
    print(f"| {name} | {s:.2f} | {lo:.2f}-{hi:.2f} | {lb / s / 1e6:.0f} | {rss:.0f} | {s / base:.2f}x |")
PY
echo
echo "smr convert summary (last round):"
sed 's/^/    /' "$work/smr-summary.txt"
