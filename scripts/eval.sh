#!/usr/bin/env bash
# The evaluation of smr's storage against its peers on an image series
# built locally, written to docs/EVALUATION.md (tables and an SVG plot).
#
# Usage: scripts/eval.sh [OUT_DIR]
#   OUT_DIR (default docs/) receives EVALUATION.md and evaluation-*.svg.
#   Needs root, the test image cache (scripts/build-test-images.sh), casync,
#   and network access to the Debian mirror the first time (the series'
#   images are built with scripts/bench/build-image.sh into
#   $SMR_BENCH_IMAGES, default /var/cache/smr-bench-images, and kept).
#   SMR_BIN: the smr binary to measure (default: a release build, copied).
#
# The series, each the next version a node would pull:
#   debian                 debootstrap minbase bookworm (one layer)
#   debian-python-rebuilt  debian + python3 python3-numpy (one more layer)
#   debian-python-yaml     the same layer rebuilt with python3-yaml added:
#                          its files land in the middle of the layer
#   debian-node            debian + nodejs: a second runtime on the base
# Measured, each image in turn into one store (as a registry or store
# accumulates versions): bytes the store grows by, and bytes a node that
# holds the previous image fetches for a full read of the next; for smr's
# fixed 64 KiB chunks and its content-defined chunks (real conversions,
# plain and zstd; `--chunking cdc`), more CDC sizes from the chunking study
# (crates/smr-convert/examples/dedup_study.rs over the same ext4 images),
# and casync (its own CDC over the same images, zstd-compressed chunk
# files).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(realpath -m -- "${1:-$here/docs}")
images=${SMR_BENCH_IMAGES:-/var/cache/smr-bench-images}
cache=${SMR_IMAGE_CACHE:-/var/cache/smr-test-images}
log() { printf '[eval %s] %s\n' "$(date +%T)" "$*" >&2; }
work=$(mktemp -d /var/tmp/smr-eval.XXXXXX)
trap 'rm -rf "$work"' EXIT

for tool in casync umoci skopeo python3; do
  command -v "$tool" >/dev/null || { log "missing $tool"; exit 1; }
done
[[ -f $cache/COMPLETE ]] || { log "no test image cache: run scripts/build-test-images.sh"; exit 1; }
"$here/scripts/bench/build-image.sh" "$images" debian-python-rebuilt python3 python3 python3-numpy
"$here/scripts/bench/build-image.sh" "$images" debian-python-yaml python3 python3 python3-numpy python3-yaml
"$here/scripts/bench/build-image.sh" "$images" debian-node node nodejs

log "building smr and the chunking study (release)"
# Two builds: with --example, cargo builds only that example.
(cd "$here" && env -u CARGO_TARGET_DIR cargo build -q --release -p smr \
  && env -u CARGO_TARGET_DIR cargo build -q --release -p smr-convert --example dedup_study)
smr=${SMR_BIN:-}
if [[ -z $smr ]]; then
  cp "$here/target/release/smr" "$work/smr"
  smr=$work/smr
fi
study=$here/target/release/examples/dedup_study

series=(debian debian-python-rebuilt debian-python-yaml debian-node)
src() { if [[ $1 == debian ]]; then echo "oci:$cache/oci:debian"; else echo "oci:$images/oci:$1"; fi; }
bytes() { { find "$1" -type f ! -name '.*' -printf '%s\n' 2>/dev/null || true; } | awk '{s += $1} END {print s + 0}'; }
files() { { find "$1" -type f ! -name '.*' 2>/dev/null || true; } | wc -l; }

"$smr" keygen -o "$work/key" 2>/dev/null
: >"$work/rows"
prev=
for name in "${series[@]}"; do
  log "$name: smr convert (fixed and cdc, plain and zstd), extract, casync make"
  before=$(bytes "$work/store"); before_z=$(bytes "$work/store-zstd"); before_c=$(bytes "$work/casync.castr")
  before_d=$(bytes "$work/store-cdc"); before_dz=$(bytes "$work/store-cdc-zstd")
  chunks_c=$(files "$work/casync.castr")
  t0=$(date +%s.%N)
  "$smr" convert "$(src "$name")" --store "$work/store" -o "$work/$name.recipe" --key-file "$work/key" --chunking fixed 2>/dev/null
  t1=$(date +%s.%N)
  "$smr" convert "$(src "$name")" --store "$work/store-zstd" -o "$work/$name.z.recipe" --key-file "$work/key" --chunking fixed --compress zstd 2>/dev/null
  t4=$(date +%s.%N)
  "$smr" convert "$(src "$name")" --store "$work/store-cdc" -o "$work/$name.cdc.recipe" --key-file "$work/key" --chunking cdc 2>/dev/null
  t5=$(date +%s.%N)
  "$smr" convert "$(src "$name")" --store "$work/store-cdc-zstd" -o "$work/$name.cdc.z.recipe" --key-file "$work/key" --chunking cdc --compress zstd 2>/dev/null
  "$smr" extract "$work/$name.recipe" --store "$work/store" --key-file "$work/key" -o "$work/$name.img" 2>/dev/null
  t2=$(date +%s.%N)
  casync make --store="$work/casync.castr" "$work/$name.caibx" "$work/$name.img" >/dev/null
  t3=$(date +%s.%N)
  # Bytes (as stored) of the chunks of this image that the previous one
  # lacks: what a node holding the previous image fetches.
  fetch() { # RECIPE PREV_RECIPE
    if [[ -z $prev ]]; then echo 0; return; fi
    "$smr" inspect --json "$1" --compare "$2" | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["base_bytes"] - v["shared_bytes"])'
  }
  f_z=$(fetch "$work/$name.z.recipe" "$work/$prev.z.recipe")
  f_dz=$(fetch "$work/$name.cdc.z.recipe" "$work/$prev.cdc.z.recipe")
  echo "$name $(stat -c %s "$work/$name.img") $(( $(bytes "$work/store") - before )) $(( $(bytes "$work/store-zstd") - before_z )) $(( $(bytes "$work/casync.castr") - before_c )) $(( $(files "$work/casync.castr") - chunks_c )) $(python3 -c "print(f'{$t1 - $t0:.2f} {$t3 - $t2:.2f} {$t5 - $t4:.2f}')") $(( $(bytes "$work/store-cdc") - before_d )) $(( $(bytes "$work/store-cdc-zstd") - before_dz )) $f_z $f_dz" >>"$work/rows"
  prev=$name
done

log "chunking study"
imgs=(); for name in "${series[@]}"; do imgs+=("$work/$name.img"); done
"$study" --json --fixed 64K --cdc 16K:64K:256K --cdc 8K:32K:128K "${imgs[@]}" >"$work/study.json"

commit=$(cd "$here" && git rev-parse --short HEAD)
mkdir -p "$out"
python3 - "$work/rows" "$work/study.json" "$out" "$commit" <<'PY'
import json, os, sys
rows_path, study_path, out, commit = sys.argv[1:]
rows = [l.split() for l in open(rows_path)]
study = json.load(open(study_path))
mib = lambda b: f"{int(b) / 2**20:.1f}"
names = [r[0] for r in rows]
schemes = []
for r in study:
    if r["chunking"] not in schemes:
        schemes.append(r["chunking"])
by = {(r["chunking"], os.path.basename(r["image"])[:-4]): r for r in study}

lines = ["# Evaluation", "",
 "smr's storage against its peers on an image series built locally, "
 "each image the next version a node would pull. Reproduce with "
 f"`scripts/eval.sh` (commit {commit}); every image goes into one store "
 "after the ones before it.", "",
 "| image | ext4 image MiB | what it is |", "| --- | --- | --- |"]
what = {"debian": "debootstrap minbase bookworm",
        "debian-python-rebuilt": "debian + python3, python3-numpy (a second layer)",
        "debian-python-yaml": "the same layer rebuilt with python3-yaml added (files in the middle of the layer)",
        "debian-node": "debian + nodejs (a second runtime)"}
for r in rows:
    lines.append(f"| {r[0]} | {mib(r[1])} | {what.get(r[0], '')} |")

lines += ["", "## Bytes a node fetches for the next image", "",
 "A node holding the previous image of the series reads all of the next "
 "one: the bytes of chunks it does not hold (uncompressed, all-zero chunks "
 "never fetched), and as a ratio to smr's fixed 64 KiB chunks.", "",
 "| image | " + " | ".join(schemes) + " |", "| --- |" + " --- |" * len(schemes)]
for n in names[1:]:
    base = by[(schemes[0], n)]["new_to_node"]
    cells = []
    for s in schemes:
        v = by[(s, n)]["new_to_node"]
        cells.append(f"{mib(v)} MiB ({v / base:.2f}x)" if base else mib(v))
    lines.append(f"| {n} | " + " | ".join(cells) + " |")

mid = names[2] if len(names) > 2 else names[-1]
cdc = schemes[1] if len(schemes) > 1 else schemes[0]
fetch_ratio = by[(cdc, mid)]["new_to_node"] / max(1, by[(schemes[0], mid)]["new_to_node"])
store_ratio = sum(by[(cdc, n)]["new_to_store"] for n in names) / max(1, sum(by[(schemes[0], n)]["new_to_store"] for n in names))
lines += ["", f"For {mid}, content-defined chunks ({cdc}) fetch {fetch_ratio:.2f}x the "
 f"bytes of fixed 64 KiB chunks; over the whole series the store holds "
 f"{store_ratio:.2f}x. Fixed chunks lose whenever a layer changes in its "
 "middle: every file after the change moves by a length that is rarely a "
 "multiple of 64 KiB, and every chunk after it changes."]

lines += ["", "## Bytes a node fetches, as stored", "",
 "The same, from real conversions with `--compress zstd` (what the link "
 "carries): the stored bytes of the next image's chunks that the previous "
 "image's recipe does not list (`smr inspect --compare`), against casync's "
 "store growth for the same image (its zstd chunk files), as a ratio to "
 "casync.", "",
 "| image | smr fixed 64K zstd | smr cdc 16K:64K:256K zstd | casync (zstd) |",
 "| --- | --- | --- | --- |"]
for r in rows[1:]:
    c = max(1, int(r[4]))
    cells = [f"{mib(v)} MiB ({int(v) / c:.2f}x)" for v in (r[11], r[12])]
    lines.append(f"| {r[0]} | " + " | ".join(cells) + f" | {mib(r[4])} MiB (1.00x) |")

lines += ["", "## Bytes stored", "",
 "What the store grows by for each image. smr: real conversions into one "
 "directory store each (encrypted chunks; fixed 64 KiB and `--chunking "
 "cdc`, plain and `--compress zstd`); the study columns are its "
 "uncompressed chunk bytes; casync: its store (zstd chunk files) after "
 "`casync make` of the same ext4 images.", "",
 "| image | smr 64K | smr 64K zstd | smr cdc | smr cdc zstd | " + " | ".join(f"study {s}" for s in schemes) + " | casync (zstd) | casync new chunks |",
 "| --- |" + " --- |" * (6 + len(schemes))]
tot = [0] * (5 + len(schemes))
for r in rows:
    n = r[0]
    study_cells = [by[(s, n)]["new_to_store"] for s in schemes]
    vals = [int(r[2]), int(r[3]), int(r[9]), int(r[10])] + study_cells + [int(r[4])]
    tot = [a + b for a, b in zip(tot, vals)]
    lines.append(f"| {n} | " + " | ".join(mib(v) for v in vals) + f" | {r[5]} |")
lines.append("| **total** | " + " | ".join(f"**{mib(v)}**" for v in tot) + " | |")

lines += ["", "## Time", "",
 "| image | smr convert, fixed (s) | smr convert, cdc (s) | casync make on the image (s) |", "| --- | --- | --- | --- |"]
for r in rows:
    lines.append(f"| {r[0]} | {r[6]} | {r[8]} | {r[7]} |")

# A plot: bytes fetched for each next image, per chunking.
w, h, pad = 640, 300, 50
maxv = max(by[(s, n)]["new_to_node"] for s in schemes for n in names[1:]) or 1
colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
group = (w - 2 * pad) / max(1, len(names) - 1)
bar = group / (len(schemes) + 1)
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 60}" font-family="sans-serif" font-size="11">',
       f'<text x="{pad}" y="16">MiB a node fetches for the next image (lower is better)</text>']
for gi, n in enumerate(names[1:]):
    for si, s in enumerate(schemes):
        v = by[(s, n)]["new_to_node"]
        bh = (h - 2 * pad) * v / maxv
        x = pad + gi * group + si * bar
        svg.append(f'<rect x="{x:.1f}" y="{h - pad - bh:.1f}" width="{bar * 0.9:.1f}" height="{bh:.1f}" fill="{colors[si % 4]}"/>')
        svg.append(f'<text x="{x:.1f}" y="{h - pad - bh - 3:.1f}">{int(v) / 2**20:.0f}</text>')
    svg.append(f'<text x="{pad + gi * group:.1f}" y="{h - pad + 15}">{n}</text>')
for si, s in enumerate(schemes):
    svg.append(f'<rect x="{pad + si * 170}" y="{h + 20}" width="10" height="10" fill="{colors[si % 4]}"/><text x="{pad + si * 170 + 14}" y="{h + 29}">{s}</text>')
svg.append("</svg>")
open(os.path.join(out, "evaluation-fetch.svg"), "w").write("\n".join(svg) + "\n")
lines += ["", "![bytes fetched for the next image](evaluation-fetch.svg)", ""]
open(os.path.join(out, "EVALUATION.md"), "w").write("\n".join(lines) + "\n")
PY
log "wrote $out/EVALUATION.md"
