#!/usr/bin/env bash
# Convert benchmark (issue: convert throughput): smr convert of the
# debian-python test image, side by side in one run with mkfs.ext4 -d and
# mkfs.erofs on the same unpacked tree and casync make on the resulting image.
# Usage: scripts/bench-convert.sh [ROUNDS]   (prints a markdown table)
set -euo pipefail
rounds=${1:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${SMR_IMAGE_CACHE:-/var/cache/smr-test-images}
layout=$cache/oci
tag=debian-python
smr=$here/target/release/smr
[ -x "$smr" ] || (cd "$here" && cargo build --release -q -p smr)
"$here/scripts/build-test-images.sh" "$cache" >/dev/null
work=$(mktemp -d /var/tmp/smr-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
umoci unpack --image "$layout:$tag" "$work/bundle" >/dev/null
rootfs=$work/bundle/rootfs
tree_mb=$(du -sm --apparent-size "$rootfs" | cut -f1)
head -c 32 /dev/urandom > "$work/key"

# time_cmd NAME CMD...: appends "NAME seconds maxrss_kb" to $work/times
time_cmd() {
  local name=$1; shift
  sync; echo 3 > /proc/sys/vm/drop_caches
  /usr/bin/time -f "$name %e %M" -a -o "$work/times" "$@" >/dev/null 2>"$work/last.err" || {
    cat "$work/last.err" >&2; exit 1; }
}

for r in $(seq "$rounds"); do
  rm -rf "$work/store"* "$work"/*.img "$work"/*.recipe "$work/casync"*
  time_cmd "smr-convert" "$smr" convert "oci:$layout:$tag" --store "$work/store" -o "$work/a.recipe" --key-file "$work/key"
  cp "$work/last.err" "$work/smr-summary.txt"
  time_cmd "smr-convert-zstd" "$smr" convert "oci:$layout:$tag" --store "$work/store-z" -o "$work/z.recipe" --key-file "$work/key" --compress zstd
  time_cmd "smr-convert-plain" "$smr" convert "oci:$layout:$tag" --store "$work/store-p" -o "$work/p.recipe" --no-encrypt
  size_mb=$(( tree_mb * 3 / 2 + 64 ))
  time_cmd "mkfs.ext4-d" mkfs.ext4 -q -F -b 4096 -I 256 -O ^has_journal -d "$rootfs" "$work/mkfs.img" "${size_mb}M"
  time_cmd "mkfs.erofs" mkfs.erofs --quiet "$work/erofs.img" "$rootfs"
  "$smr" extract "$work/a.recipe" --store "$work/store" --key-file "$work/key" -o "$work/smr.img" 2>/dev/null
  time_cmd "casync-make" casync make --store="$work/casync.castr" "$work/casync.caibx" "$work/smr.img"
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
echo "| tool | seconds (median) | MB/s of layer data | peak RSS MiB | vs mkfs.ext4 -d |"
echo "| --- | --- | --- | --- | --- |"
python3 - "$work/times" "$layer_bytes" <<'PY'
import sys, statistics, collections
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    name, secs, rss = line.split()
    rows.setdefault(name, []).append((float(secs), int(rss)))
lb = int(sys.argv[2])
base = statistics.median(s for s, _ in rows["mkfs.ext4-d"])
for name, v in rows.items():
    s = statistics.median(x for x, _ in v)
    rss = max(r for _, r in v) / 1024
    print(f"| {name} | {s:.2f} | {lb / s / 1e6:.0f} | {rss:.0f} | {s / base:.2f}x |")
PY
echo
echo "smr convert summary (last round):"
sed 's/^/    /' "$work/smr-summary.txt"
