#!/usr/bin/env bash
# Lazy-serving benchmark (issue 3), side by side in one run:
#  1. cold start: `smr run` of debian-python, `python3 -c 'import numpy'`,
#     empty cache, for chunk sizes 64K..1M x loop read_ahead_kb 0/16/128 x
#     loop direct I/O off/on; vs the same runc container on a plain loop
#     mount of the extracted image (loop + ext4 ro + overlay + runc, as smr
#     run builds it);
#  2. fetch concurrency: max fetches in flight (`--stats` max_inflight);
#  3. warm read of every file (`tar -cf - . | wc -c`) over `smr mount` vs
#     the plain loop mount (recipe at the default chunk size);
#  4. warm NBD: nbdcopy of `smr serve-nbd` vs `qemu-nbd` of the image
#     (default chunk size), with the server's CPU seconds, with the page
#     cache dropped and with it warm;
#  5. memory: peak RSS (VmHWM) of ONE `smr serve-nbd` process serving 4
#     images (one store, one cache) under 4 concurrent nbdcopy (multi-conn),
#     cold then warm; and of the FUSE server of `smr mount`.
# Page cache dropped before every timed command (the warm NBD copies are
# also timed with it warm). Needs root.
# Usage: scripts/bench-lazy.sh [ROUNDS]   (prints markdown tables)
# Env: SMR_BENCH_SIZES (chunk sizes of the cold start, default 64K..1M;
#      `cdc` or `cdc-MIN:AVG:MAX` for content-defined chunks),
#      SMR_BENCH_RAS (loop read_ahead_kb values, default "0 16 128"),
#      SMR_BENCH_WARM_CS (chunk size of the warm and memory tests, default
#      64K, the default of `smr convert`),
#      SMR_BENCH_ONLY (sections to run, default "cold,tar,nbd,mem"),
#      SMR_BENCH_BEFORE_BIN (another smr binary: the warm tar also runs
#      over a mount of it, with a chunk cache of its own, in the same rounds),
#      SMR_BENCH_FUSE_RA (`--fuse-readahead-kb` of smr's runs and mounts).
set -euo pipefail
rounds=${1:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${SMR_IMAGE_CACHE:-/var/cache/smr-test-images}
layout=$cache/oci
tag=debian-python
sizes=${SMR_BENCH_SIZES:-64K 128K 256K 512K 1M}
ras=${SMR_BENCH_RAS:-0 16 128}
wcs=${SMR_BENCH_WARM_CS:-64K}
only=${SMR_BENCH_ONLY:-cold,tar,nbd,mem}
want() { [[ ",$only," == *",$1,"* ]]; }
pycmd=(python3 -c 'import numpy')
smr=${SMR_BIN:-$here/target/release/smr}   # SMR_BIN: a copy, safe from concurrent builds
before=${SMR_BENCH_BEFORE_BIN:-}
fra=(); [ -n "${SMR_BENCH_FUSE_RA:-}" ] && fra=(--fuse-readahead-kb "$SMR_BENCH_FUSE_RA")
[ -x "$smr" ] || (cd "$here" && cargo build --release -q -p smr)
floor=$here/target/release/examples/read_floor   # the disk floor of the NBD copies
if [[ ",$only," == *",nbd,"* ]] && [ ! -x "$floor" ]; then
  (cd "$here" && cargo build --release -q -p smr-node --example read_floor)
fi
"$here/scripts/build-test-images.sh" "$cache" >/dev/null
work=$(mktemp -d /var/tmp/smr-bench-lazy.XXXXXX)
res=$work/results
warm=$work/cache-warm   # the chunk cache of the warm tests
pids=()
smr_mnts=()
mnts=()
loops=()

cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  for m in "${smr_mnts[@]}"; do "$smr" umount "$m" --state-dir "$work/state" 2>/dev/null; done
  [ -n "$before" ] && "$before" umount "$work/m-before" --state-dir "$work/state-before" 2>/dev/null
  for m in "${mnts[@]}"; do umount "$m" 2>/dev/null; done
  for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }
log() { echo "bench-lazy: $*" >&2; }
# The convert flags of a "size": a chunk size (fixed chunks), `cdc` for
# content-defined chunks at the default sizes, `cdc-MIN:AVG:MAX` for others.
chunking() {
  case $1 in
    cdc) echo "--chunking cdc" ;;
    cdc-*) echo "--cdc-sizes ${1#cdc-}" ;;
    *) echo "--chunk-size $1" ;;
  esac
}

head -c 32 /dev/urandom > "$work/key"
log "converting $tag at chunk sizes $sizes (and $wcs)"
for cs in $sizes $wcs; do
  [ -f "$work/py-$cs.recipe" ] && continue
  "$smr" convert "oci:$layout:$tag" --store "$work/store-$cs" -o "$work/py-$cs.recipe" \
    --key-file "$work/key" $(chunking "$cs") 2>/dev/null
done
# The memory test's 4 images, in one store: debian-python and debian at
# the warm chunk size, debian at 512K and 1M.
mem_images=("py:$tag:$wcs" "deb:debian:$wcs" "deb512:debian:512K" "deb1m:debian:1M")
mkdir -p "$work/mem"
for spec in "${mem_images[@]}"; do
  IFS=: read -r name t cs <<<"$spec"
  "$smr" convert "oci:$layout:$t" --store "$work/store-mem" -o "$work/mem/$name.recipe" \
    --key-file "$work/key" $(chunking "$cs") 2>/dev/null
done
"$smr" extract "$work/py-$wcs.recipe" --store "$work/store-$wcs" --key-file "$work/key" \
  -o "$work/py.img" 2>/dev/null
img_bytes=$(stat -c %s "$work/py.img")

# ---- 1+2. cold start -------------------------------------------------------
if want cold; then
# base_run RA DIO: the same container from a plain loop mount of py.img;
# prints the wall time of attach + mount + overlay + runc run + teardown.
mkdir -p "$work/b/lower" "$work/b/upper" "$work/b/work" "$work/b/rootfs" "$work/b/bundle"
"$here/scripts/bench/runc-bundle.py" "$work/b/bundle" "$work/b/rootfs" "${pycmd[@]}"
base_run() {
  local ra=$1 dio=$2 t0 t1 dev
  drop
  t0=$(now)
  dev=$(losetup --find --show --read-only --direct-io="$dio" "$work/py.img")
  echo "$ra" > "/sys/block/${dev#/dev/}/queue/read_ahead_kb"
  mount -t ext4 -o ro,noload "$dev" "$work/b/lower"
  rm -rf "$work/b/upper" "$work/b/work"; mkdir "$work/b/upper" "$work/b/work"
  mount -t overlay overlay -o "lowerdir=$work/b/lower,upperdir=$work/b/upper,workdir=$work/b/work" "$work/b/rootfs"
  runc run --bundle "$work/b/bundle" "smr-bench-$$" >/dev/null
  umount "$work/b/rootfs"; umount "$work/b/lower"; losetup -d "$dev"
  t1=$(now)
  elapsed "$t0" "$t1"
}

log "cold start: $rounds rounds x sizes x read_ahead_kb {$ras} x direct-io {off,on} + baseline"
for r in $(seq "$rounds"); do
  for ra in $ras; do
    for dio in off on; do
      echo "coldbase $ra $dio $r $(base_run "$ra" "$dio")" >> "$res"
    done
  done
  for cs in $sizes; do
    for ra in $ras; do
      for dio in off on; do
        flag=(); [ "$dio" = on ] && flag=(--direct-io)
        rm -rf "$work/cache-cold"
        drop
        t0=$(now)
        "$smr" run "$work/py-$cs.recipe" --store "$work/store-$cs" --key-file "$work/key" \
          --cache-dir "$work/cache-cold" --readahead-kb "$ra" "${flag[@]}" "${fra[@]}" \
          --stats "$work/stats.json" -- "${pycmd[@]}" >/dev/null 2>"$work/run.err" || {
            cat "$work/run.err" >&2; exit 1; }
        t1=$(now)
        python3 - "$work/stats.json" "$cs" "$ra" "$dio" "$r" "$(elapsed "$t0" "$t1")" >> "$res" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print("cold", *sys.argv[2:], s["total_seconds"], s["bytes_fetched"], s["image_bytes"],
      s["chunks_fetched"], s["bytes_read"], s.get("max_inflight", -1))
PY
      done
    done
  done
done

fi

# ---- 3. warm tar over the mount vs the plain loop mount --------------------
if want tar; then
log "warm tar: smr mount (chunk cache warm) vs plain loop mount"
mkdir -p "$work/m-smr" "$work/m-smr-dio" "$work/m-loop" "$work/m-loop-dio" "$work/m-loop-kdef"
"$smr" mount "$work/py-$wcs.recipe" --store "$work/store-$wcs" --key-file "$work/key" \
  --cache-dir "$warm" --state-dir "$work/state" "${fra[@]}" "$work/m-smr" 2>/dev/null
smr_mnts+=("$work/m-smr")
"$smr" mount "$work/py-$wcs.recipe" --store "$work/store-$wcs" --key-file "$work/key" \
  --cache-dir "$warm" --state-dir "$work/state" --direct-io "${fra[@]}" "$work/m-smr-dio" 2>/dev/null
smr_mnts+=("$work/m-smr-dio")
tar_mnts=(m-smr m-smr-dio m-loop m-loop-dio m-loop-kdef)
if [ -n "$before" ]; then
  mkdir -p "$work/m-before"
  "$before" mount "$work/py-$wcs.recipe" --store "$work/store-$wcs" --key-file "$work/key" \
    --cache-dir "$work/cache-warm-before" --state-dir "$work/state-before" "$work/m-before" 2>/dev/null
  (cd "$work/m-before" && tar -cf - . | wc -c) > /dev/null
  tar_mnts=(m-before "${tar_mnts[@]}")
fi
smr_ra=$(cat "/sys/block/$(basename "$(findmnt -n -o SOURCE "$work/m-smr")")/queue/read_ahead_kb")
# Plain loop mounts: at smr's read_ahead_kb, with and without direct I/O,
# and at the kernel's default for a new loop device.
for v in m-loop:off:set m-loop-dio:on:set m-loop-kdef:off:kernel; do
  IFS=: read -r m dio ra <<<"$v"
  dev=$(losetup --find --show --read-only --direct-io="$dio" "$work/py.img")
  loops+=("$dev")
  [ "$ra" = set ] && echo "$smr_ra" > "/sys/block/${dev#/dev/}/queue/read_ahead_kb"
  mount -t ext4 -o ro,noload "$dev" "$work/$m"; mnts+=("$work/$m")
done
# Fill the chunk cache: a first full pass over the lazy mount.
(cd "$work/m-smr" && tar -cf - . | wc -c) > /dev/null
for m in "${tar_mnts[@]}"; do
  dev=$(findmnt -n -o SOURCE "$work/$m")
  echo "tarinfo $m $dev $(cat "/sys/block/${dev#/dev/}/queue/read_ahead_kb") $(cat "/sys/block/${dev#/dev/}/loop/dio")" >> "$res"
done
for r in $(seq "$rounds"); do
  for m in "${tar_mnts[@]}"; do
    drop
    t0=$(now)
    n=$(cd "$work/$m" && tar -cf - . | wc -c)
    t1=$(now)
    echo "tar $m $r $(elapsed "$t0" "$t1") $n" >> "$res"
  done
done
for stj in "$work"/state/*/state.json; do
  python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["server_pid"], s["mountpoint"].rsplit("/",1)[1])' "$stj" |
    while read -r pid name; do
      echo "mem fuse-server($name,after-tar) $(awk '/VmHWM/{h=$2} /RssAnon/{a=$2} /^Threads/{t=$2} END{print h, a, t}' "/proc/$pid/status")" >> "$res"
    done
done
for m in m-smr m-smr-dio; do "$smr" umount "$work/$m" --state-dir "$work/state" 2>/dev/null; done
for m in m-loop m-loop-dio m-loop-kdef; do umount "$work/$m"; done
for l in "${loops[@]}"; do losetup -d "$l"; done
smr_mnts=(); mnts=(); loops=()

fi

# ---- 4. warm NBD: smr serve-nbd vs qemu-nbd --------------------------------
if want nbd; then
log "warm NBD: nbdcopy of smr serve-nbd vs qemu-nbd"
"$smr" serve-nbd "$work/py-$wcs.recipe" --store "$work/store-$wcs" --key-file "$work/key" \
  --cache-dir "$warm" --socket "$work/smr.sock" --name py 2>"$work/serve.err" &
pids+=($!)
qemu-nbd -r -f raw --persistent -x py -k "$work/qemu.sock" "$work/py.img" 2>"$work/qemu.err" &
pids+=($!)
for s in smr qemu; do
  for _ in $(seq 100); do [ -S "$work/$s.sock" ] && break; sleep 0.1; done
done
cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # utime + stime, ticks
nbdcopy "nbd+unix:///py?socket=$work/smr.sock" null:   # fill the cache (first pass)
# Page cache dropped before each copy (disk reads included), and kept warm
# (the previous copy of the same server left it there: serving cost alone).
for r in $(seq "$rounds"); do
  for pc in dropped warm; do
    for conns in default 1; do
      opt=(); [ "$conns" = 1 ] && opt=(--connections=1)
      for s in smr qemu; do
        pid=${pids[0]}; [ "$s" = qemu ] && pid=${pids[1]}
        if [ "$pc" = dropped ]; then
          drop
        else
          nbdcopy "nbd+unix:///py?socket=$work/$s.sock" null:
        fi
        c0=$(cpu_of "$pid"); t0=$(now)
        nbdcopy "${opt[@]}" "nbd+unix:///py?socket=$work/$s.sock" null:
        t1=$(now); c1=$(cpu_of "$pid")
        echo "nbd $s $conns $pc $r $(elapsed "$t0" "$t1") $(( c1 - c0 ))" >> "$res"
      done
    done
  done
  # The disk's floor under the dropped copies: just reading smr's cache
  # segments (48 threads), and qemu-nbd's one image file.
  drop
  echo "floor entries $r $("$floor" "$warm/segments" 48 | awk '{print $3}')" >> "$res"
  drop
  t0=$(now); cat "$work/py.img" > /dev/null; t1=$(now)
  echo "floor image $r $(elapsed "$t0" "$t1")" >> "$res"
done
echo "mem serve-nbd(1-image,after-warm-nbdcopy) $(awk '/VmHWM/{h=$2} /RssAnon/{a=$2} /^Threads/{t=$2} END{print h, a, t}' "/proc/${pids[0]}/status")" >> "$res"
for p in "${pids[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done
pids=()

fi

# ---- 5. memory: 4 images served by one process under nbdcopy load ----------
if want mem; then
log "memory: one smr serve-nbd with 4 exports under 4 concurrent nbdcopy"
names=(); recipes=()
for spec in "${mem_images[@]}"; do
  IFS=: read -r name _ _ <<<"$spec"; names+=("$name"); recipes+=("$work/mem/$name.recipe")
done
"$smr" serve-nbd "${recipes[@]}" --store "$work/store-mem" --key-file "$work/key" \
  --cache-dir "$work/cache-mem" --socket "$work/mem.sock" 2>/dev/null &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/mem.sock" ] && break; sleep 0.1; done
for pass in cold warm; do
  cp=()
  for n in "${names[@]}"; do
    nbdcopy "nbd+unix:///$n?socket=$work/mem.sock" null: & cp+=($!)
  done
  for p in "${cp[@]}"; do wait "$p"; done
  echo "mem serve-nbd(4-images:$(IFS=,; echo "${names[*]}"),4-nbdcopy-at-once,after-$pass) $(awk '/VmHWM/{h=$2} /RssAnon/{a=$2} /^Threads/{t=$2} END{print h, a, t}' "/proc/${pids[0]}/status")" >> "$res"
done
kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true
pids=()

fi

# ---- report ----------------------------------------------------------------
python3 - "$res" "$img_bytes" "$rounds" <<'PY'
import sys, statistics as st, collections
res, img_bytes, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3]
med = st.median
L = [l.split() for l in open(res)]
MiB = 1 << 20
print(f"Rounds: {rounds} (median shown); image {img_bytes / MiB:.0f} MiB\n")


def cold_section():
    base = collections.defaultdict(list)
    for l in L:
        if l[0] == "coldbase":
            base[(l[1], l[2])].append(float(l[4]))
    print("### Cold start, `python3 -c 'import numpy'`, empty cache\n")
    print("Plain loop mount of the extracted image + overlay + runc (wall seconds):\n")
    print("| read_ahead_kb | direct-io | seconds |")
    print("| --- | --- | --- |")
    for (ra, dio), v in base.items():
        print(f"| {ra} | {dio} | {med(v):.2f} |")
    print()
    cold = collections.defaultdict(list)
    for l in L:
        if l[0] == "cold":
            cs, ra, dio, r, wall, tot, fetched, imgb, chunks, bread, infl = l[1:]
            cold[(cs, ra, dio)].append((float(wall), float(tot), int(fetched), int(imgb),
                                        int(chunks), int(bread), int(infl)))
    print("| chunk | read_ahead_kb | direct-io | fetched MiB | image_bytes MiB | fetched/image | chunks | kernel read MiB | max in flight | smr run s | baseline s | vs baseline |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (cs, ra, dio), v in cold.items():
        wall = med(x[0] for x in v)
        fetched = med(x[2] for x in v); imgb = v[0][3]
        b = med(base[(ra, dio)]) if (ra, dio) in base else float("nan")
        print(f"| {cs} | {ra} | {dio} | {fetched / MiB:.1f} | {imgb / MiB:.0f} | {fetched / imgb * 100:.1f}% "
              f"| {med(x[4] for x in v):.0f} | {med(x[5] for x in v) / MiB:.1f} | {max(x[6] for x in v)} "
              f"| {wall:.2f} | {b:.2f} | {wall / b:.2f}x |")
    print()


def tar_section():
    print("### Warm read of every file: `tar -cf - . | wc -c`, page cache dropped\n")
    info = {l[1]: l[2:] for l in L if l[0] == "tarinfo"}
    tar = collections.defaultdict(list)
    for l in L:
        if l[0] == "tar":
            tar[l[1]].append((float(l[3]), int(l[4])))
    names = {"m-before": "smr mount of SMR_BENCH_BEFORE_BIN", "m-smr": "smr mount (FUSE + loop)", "m-smr-dio": "smr mount --direct-io",
             "m-loop": "plain loop mount", "m-loop-dio": "plain loop mount, --direct-io=on",
             "m-loop-kdef": "plain loop mount, kernel's default read_ahead_kb"}
    print("| mount | loop read_ahead_kb | loop dio | seconds | MB/s | vs plain loop |")
    print("| --- | --- | --- | --- | --- | --- |")
    b = med(x[0] for x in tar["m-loop"])
    for m, v in tar.items():
        s = med(x[0] for x in v)
        print(f"| {names[m]} | {info[m][1]} | {info[m][2]} | {s:.2f} | {v[0][1] / s / 1e6:.0f} | {b / s:.2f}x |")
    print()


def nbd_section():
    nbd = collections.defaultdict(list)
    for l in L:
        if l[0] == "nbd":
            nbd[(l[3], l[1], l[2])].append((float(l[5]), int(l[6]) / 100))
    for pc in ("dropped", "warm"):
        what = ("page cache dropped before each copy" if pc == "dropped"
                else "page cache warm (a copy of the same server just before)")
        print(f"### Warm NBD: `nbdcopy nbd+unix:///... null:`, {what}\n")
        print("| server | nbdcopy connections | seconds | MB/s | server CPU s | vs qemu-nbd (1 conn) | vs qemu-nbd, same round (min-max) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        q1 = [x[0] for x in nbd[(pc, "qemu", "1")]]
        for (p, s, c), v in nbd.items():
            if p != pc:
                continue
            m = med(x[0] for x in v)
            cpu = med(x[1] for x in v)
            name = 'smr serve-nbd (chunk cache warm)' if s == 'smr' else 'qemu-nbd -r -f raw'
            cn = "default (4 if multi-conn)" if c == "default" else c
            per = [qv / sv for qv, sv in zip(q1, (x[0] for x in v))]
            print(f"| {name} | {cn} | {m:.2f} | {img_bytes / m / 1e6:.0f} | {cpu:.2f} | {med(q1) / m:.2f}x "
                  f"| {min(per):.2f}-{max(per):.2f}x |")
        print()
        floors = {k: [float(l[3]) for l in L if l[:2] == ["floor", k]] for k in ("entries", "image")}
        if pc == "dropped" and floors["entries"] and floors["image"]:
            print(f"Disk floor, page cache dropped (median): reading every cache entry, 48 threads, "
                  f"{med(floors['entries']):.2f} s; `cat` of the image file {med(floors['image']):.2f} s.\n")


def mem_section():
    print("### Memory: peak RSS (VmHWM)\n")
    print("| process | peak RSS (VmHWM) MiB | anon RSS at the end MiB | threads at the end |")
    print("| --- | --- | --- | --- |")
    for l in L:
        if l[0] == "mem":
            print(f"| {l[1]} | {int(l[2]) / 1024:.1f} | {int(l[3]) / 1024:.1f} | {l[4]} |")


for key, section in [("cold", cold_section), ("tar", tar_section), ("nbd", nbd_section),
                     ("mem", mem_section)]:
    if any(l[0] == key for l in L):
        section()
PY
