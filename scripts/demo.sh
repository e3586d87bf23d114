#!/usr/bin/env bash
# The README's demo, the whole story on one machine: starts an OCI registry on
# loopback, builds real Debian images (cached) and pushes them, converts them
# with `smr convert --push` (the smr artifact goes next to each image, which
# stays untouched; the conversion also runs the demo's command once and
# pushes its startup profile), then runs python3 + numpy lazily straight
# from the registry with an empty node cache, and prints time and bytes next
# to a full pull (skopeo copy + umoci unpack) of the same image: once
# without the profile (prefetching from the recipe's file map), once from
# another empty cache (a new node) that finds the profile and fetches the
# start's chunks ahead.
# Then the containerd path: a private containerd runs the same command
# after its own pull (overlayfs), and after `smr pull --containerd` with
# `smr daemon` as its snapshotter (lazy, no layer downloaded).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${SMR_IMAGE_CACHE:-/var/cache/smr-test-images}
work=${SMR_DEMO_DIR:-/var/tmp/smr-demo}
"$here/scripts/install-deps.sh" --demo
(cd "$here" && cargo build --release -q -p smr)
smr=$here/target/release/smr
"$here/scripts/build-test-images.sh" "$cache"
if [[ -f $work/registry/registry.pid ]]; then
    "$here/scripts/registry.sh" stop "$work/registry" || true
fi
rm -rf "$work"; mkdir -p "$work"
stop_all() {
    "$here/scripts/containerd.sh" stop "$work/containerd" >/dev/null 2>&1 || true
    [[ -n ${daemon_pid:-} ]] && { kill "$daemon_pid" 2>/dev/null; wait "$daemon_pid" 2>/dev/null || true; }
    for m in "$work"/smr/images/*/rootfs; do
        [[ -d $m ]] && "$smr" umount "$m" --state-dir "$work/smr/mount-state" >/dev/null 2>&1 || true
    done
    "$here/scripts/registry.sh" stop "$work/registry" >/dev/null 2>&1 || true
}
trap stop_all EXIT

echo "== start a registry on loopback and push debian and debian + python3 + numpy"
addr=$("$here/scripts/registry.sh" start "$work/registry" 0)
for tag in debian debian-python; do
    skopeo copy --quiet --dest-tls-verify=false --preserve-digests \
        "oci:$cache/oci:$tag" "docker://$addr/$tag:bookworm"
done
"$smr" keygen -o "$work/key"
export SMR_KEY_FILE=$work/key SMR_CACHE_DIR=$work/node-cache

image="docker://$addr/debian-python:bookworm"
cmd=(python3 -c 'import json, sqlite3, numpy; print("hello from python3 with numpy", numpy.__version__)')

echo "== convert both and push their smr artifacts next to them (with a startup profile of the demo's command)"
"$smr" convert "docker://$addr/debian:bookworm" --push 2>&1 | grep -E '^(converted|pushed|smr: startup profile of)'
"$smr" convert "$image" --push --optimize-cmd "$(printf '%q ' "${cmd[@]}")" 2>&1 |
    grep -E '^(converted|pushed|smr: (startup profile of|pushed startup))'
echo "== the source image is untouched; the artifact is listed by the referrers tag"
skopeo list-tags --tls-verify=false "docker://$addr/debian-python"

echo "== full pull: skopeo copy + umoci unpack"
sync; echo 3 > /proc/sys/vm/drop_caches
t0=$(date +%s.%N)
skopeo copy --quiet --src-tls-verify=false "$image" "oci:$work/pulled:x"
umoci unpack --image "$work/pulled:x" "$work/bundle" >/dev/null
t1=$(date +%s.%N)
pull_bytes=$(python3 - "$work/pulled" <<'PY'
import json, os, sys
root = sys.argv[1]
idx = json.load(open(os.path.join(root, "index.json")))
def blob(d):
    return os.path.join(root, "blobs", *d.split(":"))
man = json.load(open(blob(idx["manifests"][0]["digest"])))
print(sum(os.path.getsize(blob(l["digest"])) for l in man["layers"] + [man["config"]]))
PY
)

echo "== lazy: smr run straight from the registry, empty node cache, no startup profile (prefetch from the file map)"
sync; echo 3 > /proc/sys/vm/drop_caches
t2=$(date +%s.%N)
"$smr" run "$image" --no-profile --stats "$work/run.json" -- "${cmd[@]}"
t3=$(date +%s.%N)

echo "== a new node (empty cache) replays the startup profile the conversion pushed"
rm -rf "$SMR_CACHE_DIR"
sync; echo 3 > /proc/sys/vm/drop_caches
t4=$(date +%s.%N)
"$smr" run "$image" --stats "$work/run2.json" -- "${cmd[@]}"
t5=$(date +%s.%N)

python3 - "$work/run.json" "$work/run2.json" "$t0" "$t1" "$t2" "$t3" "$t4" "$t5" "$pull_bytes" <<'PY'
import json, sys
s, s2 = (json.load(open(f)) for f in sys.argv[1:3])
t0, t1, t2, t3, t4, t5 = map(float, sys.argv[3:9])
pull_bytes = int(sys.argv[9])
print()
print(f"{'':36} {'seconds':>8} {'MB transferred':>15}")
print(f"{'full pull (before any run)':36} {t1 - t0:8.2f} {pull_bytes / 1e6:15.1f}")
print(f"{'smr run, no profile':36} {t3 - t2:8.2f} {s['bytes_fetched'] / 1e6:15.1f}")
print(f"{'smr run with the startup profile':36} {t5 - t4:8.2f} {s2['bytes_fetched'] / 1e6:15.1f}")
print(f"with the profile smr fetched {s2['chunks_fetched']} chunks = {100 * s2['fetched_fraction']:.1f}% "
      f"of the image's {s2['image_bytes'] / 1e6:.1f} MB; container started in {s2['start_seconds']:.2f} s")
PY
"$smr" cache stats

echo
echo "== containerd: its own pull (overlayfs) next to smr daemon as its snapshotter"
setsid "$smr" daemon --root "$work/smr" --snapshotter-socket "$work/smr/snapshotter.sock" \
    --socket "$work/smr/smr.sock" --cache-dir "$work/smr-cache" >"$work/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 100); do [[ -S $work/smr/snapshotter.sock ]] && break; sleep 0.1; done
ctd=$("$here/scripts/containerd.sh" start "$work/containerd" "$work/smr/snapshotter.sock")
ref=$addr/debian-python:bookworm
sync; echo 3 > /proc/sys/vm/drop_caches
t6=$(date +%s.%N)
ctr -a "$ctd" image pull --plain-http "$ref" >/dev/null
ctr -a "$ctd" run --rm "$ref" demo-overlay "${cmd[@]}"
t7=$(date +%s.%N)
ctr -a "$ctd" image rm --sync "$ref" >/dev/null
sync; echo 3 > /proc/sys/vm/drop_caches
t8=$(date +%s.%N)
"$smr" pull --containerd "$ctd" "docker://$ref"
t9=$(date +%s.%N)
ctr -a "$ctd" run --rm --snapshotter smr "$ref" demo-smr "${cmd[@]}"
t10=$(date +%s.%N)
python3 - "$t6" "$t7" "$t8" "$t9" "$t10" <<'PY'
import sys
t6, t7, t8, t9, t10 = map(float, sys.argv[1:])
print()
print(f"{'':44} {'seconds':>8}")
print(f"{'containerd: ctr image pull + ctr run':44} {t7 - t6:8.2f}")
print(f"{'containerd + smr: smr pull --containerd':44} {t9 - t8:8.2f}")
print(f"{'containerd + smr: ctr run --snapshotter smr':44} {t10 - t9:8.2f}")
PY
"$smr" status --socket "$work/smr/smr.sock"
ctr -a "$ctd" image rm --sync "$ref" >/dev/null
