#!/usr/bin/env bash
# Cold read of a whole image from a registry, two smr binaries side by side
# (the fetch path's target: CPU and throughput against the previous commit).
#
# Usage:
#   scripts/bench-fetch.sh BEFORE_BIN AFTER_BIN [ROUNDS]   (default 3 rounds)
#
# A throwaway docker-registry on 127.0.0.1; the cached debian-python test
# image (scripts/build-test-images.sh) copied into it with skopeo and
# converted with `AFTER_BIN convert --push` (the artifact format is the
# same for both binaries; SMR_BENCH_CONVERT_WITH=before converts with
# BEFORE_BIN instead, for a BEFORE_BIN that cannot read today's recipes,
# and SMR_BENCH_CONVERT_FLAGS adds convert flags).
# Per round and binary, in alternating order: an
# empty cache directory, `smr serve-nbd docker://REF --no-profile` on a
# UNIX socket, the page cache dropped, then `nbdcopy` of the whole export
# to /dev/null, timed; the server's CPU time (user + system, from
# /proc/PID/stat) is read once the copy is done. Prints a markdown table
# with medians and the after/before ratios. Needs root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ $# -ge 2 ]] || { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
before=$(realpath "$1") after=$(realpath "$2") rounds=${3:-3}
images=${SMR_IMAGE_CACHE:-/var/cache/smr-test-images}
[[ -d $images/oci ]] || { echo "no test images in $images (scripts/build-test-images.sh)" >&2; exit 1; }

work=$(mktemp -d /var/tmp/smr-bench-fetch.XXXXXX)
server=""
cleanup() {
    [[ -n $server ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    scripts/registry.sh stop "$work/registry" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

addr=$(scripts/registry.sh start "$work/registry" 0)
ref="$addr/debian-python:bookworm"
skopeo copy -q --dest-tls-verify=false "oci:$images/oci:debian-python" "docker://$ref" >&2
"$after" keygen -o "$work/key" >/dev/null
export SMR_KEY_FILE=$work/key
converter=$after
[[ ${SMR_BENCH_CONVERT_WITH:-after} == before ]] && converter=$before
# shellcheck disable=SC2086 # flags are words
"$converter" convert "docker://$ref" --push ${SMR_BENCH_CONVERT_FLAGS:-} >&2
tick=$(getconf CLK_TCK)

# One cold copy: prints "seconds cpu_seconds".
one() {
    local bin=$1 dir
    dir=$(mktemp -d "$work/run.XXXXXX")
    "$bin" serve-nbd "docker://$ref" --no-profile --cache-dir "$dir/cache" \
        --socket "$dir/sock" 2>"$dir/log" &
    server=$!
    for _ in $(seq 200); do [[ -S $dir/sock ]] && break; sleep 0.05; done
    [[ -S $dir/sock ]] || { cat "$dir/log" >&2; exit 1; }
    [[ -s $work/size ]] || nbdinfo --size "nbd+unix:///debian-python?socket=$dir/sock" >"$work/size"
    sync; echo 3 >/proc/sys/vm/drop_caches
    local t0 t1 cpu
    t0=$(date +%s.%N)
    nbdcopy "nbd+unix:///debian-python?socket=$dir/sock" null:
    t1=$(date +%s.%N)
    cpu=$(awk -v t="$tick" '{print ($14 + $15) / t}' "/proc/$server/stat")
    kill "$server"; wait "$server" 2>/dev/null || true; server=""
    rm -rf "$dir"
    echo "$(echo "$t1 - $t0" | bc -l) $cpu"
}

declare -a bs bc as ac
for r in $(seq "$rounds"); do
    if (( r % 2 )); then order=(before after); else order=(after before); fi
    for which in "${order[@]}"; do
        bin=$before; [[ $which == after ]] && bin=$after
        read -r s c < <(one "$bin")
        echo "round $r $which: ${s} s, ${c} CPU-s" >&2
        if [[ $which == before ]]; then bs+=("$s"); bc+=("$c"); else as+=("$s"); ac+=("$c"); fi
    done
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
mb=$(echo "$(cat "$work/size") / 1048576" | bc -l)
mbs=$(median "${bs[@]}") mcs=$(median "${bc[@]}") mas=$(median "${as[@]}") mac=$(median "${ac[@]}")
printf '| binary | wall s (median of %d) | image MiB/s | server CPU s |\n| --- | --- | --- | --- |\n' "$rounds"
printf '| before | %.2f | %.0f | %.2f |\n' "$mbs" "$(echo "$mb / $mbs" | bc -l)" "$mcs"
printf '| after | %.2f | %.0f | %.2f |\n' "$mas" "$(echo "$mb / $mas" | bc -l)" "$mac"
printf '| after/before | %.2fx time (%.2fx throughput) | | %.2fx CPU |\n' \
    "$(echo "$mas / $mbs" | bc -l)" "$(echo "$mbs / $mas" | bc -l)" "$(echo "$mac / $mcs" | bc -l)"
