#!/usr/bin/env bash
# Memory and restart figures of `smr daemon` as containerd's snapshotter.
#
# Usage: scripts/bench-daemon.sh [SMR_BIN]
#
# Starts a registry on loopback with four images (debian, debian-python and
# a variant of each with one more small layer, so four layer chains and four
# lazy mounts), converts and pushes them, then a private containerd
# (scripts/containerd.sh) with `smr daemon` as its snapshotter, and reports:
#   - the daemon's RSS idle (after start), then its peak (VmHWM) and the
#     image servers' RSS (one `smr __serve-fuse` per mounted image) while
#     10 containers of the 4 images run (`ctr run -d`, each reading files
#     of its image, then sleeping);
#   - the longest gap seen by a container that stats and reads files of its
#     image every 10 ms while the daemon is restarted 5 times (a new daemon
#     taking the socket over) and once killed with SIGKILL and started again.
# SMR_BIN defaults to target/release/smr (built if missing).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
smr=${1:-$here/target/release/smr}
cache=${SMR_IMAGE_CACHE:-/var/cache/smr-test-images}
work=$(mktemp -d /var/tmp/smr-bench-daemon.XXXXXX)
[[ -x $smr ]] || (cd "$here" && cargo build --release -q -p smr)
log() { printf '[bench-daemon %s] %s\n' "$(date +%T)" "$*" >&2; }

daemon_pid=""
start_daemon() {
    setsid "$smr" --log info daemon --root "$work/smr" --snapshotter-socket "$work/snap.sock" \
        --socket "$work/smr.sock" --cache-dir "$work/cache" --key-file "$work/key" \
        >>"$work/daemon.log" 2>&1 &
    daemon_pid=$!
    local i
    for ((i = 0; i < 200; i++)); do
        python3 -c 'import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])' \
            "$work/snap.sock" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "daemon did not start" >&2; tail "$work/daemon.log" >&2; exit 1
}
cleanup() {
    set +e
    "$here/scripts/containerd.sh" stop "$work/ctd" >/dev/null 2>&1
    pkill -f -- "--root $work/smr" 2>/dev/null
    sleep 0.5
    for m in "$work"/smr/images/*/rootfs; do
        [[ -d $m ]] && "$smr" umount "$m" --state-dir "$work/smr/mount-state" >/dev/null 2>&1
    done
    "$here/scripts/registry.sh" stop "$work/reg" >/dev/null 2>&1
    findmnt -rn -o TARGET | grep -qF -- "$work/" || rm -rf -- "$work"
}
trap cleanup EXIT
rss_kib() { awk "/^$2/ { print \$2 }" "/proc/$1/status" 2>/dev/null || echo 0; }
# Proportional set size: shared pages (the smr binary's text, mapped by
# every server) counted once across the processes that share them.
pss_kib() { awk '/^Pss:/ { print $2 }' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0; }

log "registry with four images"
addr=$("$here/scripts/registry.sh" start "$work/reg" 0)
cp -r "$cache/oci" "$work/layout"
for t in debian debian-python; do
    umoci unpack --image "$work/layout:$t" "$work/bundle-$t" >/dev/null
    echo "variant 2 of $t" >"$work/bundle-$t/rootfs/etc/smr-bench-variant"
    umoci repack --image "$work/layout:$t-v2" "$work/bundle-$t" >/dev/null
    rm -rf "$work/bundle-$t"
done
"$smr" keygen -o "$work/key" >/dev/null
images=()
for t in debian debian-python debian-v2 debian-python-v2; do
    skopeo copy --quiet --dest-tls-verify=false "oci:$work/layout:$t" "docker://$addr/$t:1"
    "$smr" convert "docker://$addr/$t:1" --push --key-file "$work/key" >/dev/null 2>&1
    images+=("$addr/$t:1")
done

start_daemon
sleep 1
idle=$(rss_kib "$daemon_pid" VmRSS)
ctd=$("$here/scripts/containerd.sh" start "$work/ctd" "$work/snap.sock")
for i in "${images[@]}"; do "$smr" pull --containerd "$ctd" "docker://$i" >/dev/null; done

log "10 containers of 4 images"
for n in $(seq 0 9); do
    img=${images[$((n % 4))]}
    ctr -a "$ctd" run -d --snapshotter smr "$img" "bench-$n" \
        sh -c 'cat /usr/bin/* > /dev/null 2>&1; sleep 1000' >/dev/null
done
sleep 5
peak=$(rss_kib "$daemon_pid" VmHWM)
now=$(rss_kib "$daemon_pid" VmRSS)
servers=0 nservers=0 pss=$(pss_kib "$daemon_pid")
for p in $(pgrep -f -- "__serve-fuse.*$work/smr" || true); do
    servers=$((servers + $(rss_kib "$p" VmRSS))); nservers=$((nservers + 1))
    pss=$((pss + $(pss_kib "$p")))
done
mounts=$(findmnt -rn -o TARGET | grep -c -- "$work/smr/images/" || true)
for n in $(seq 0 9); do
    ctr -a "$ctd" task kill -s SIGKILL "bench-$n" >/dev/null 2>&1 || true
done
sleep 1
for n in $(seq 0 9); do
    ctr -a "$ctd" task delete "bench-$n" >/dev/null 2>&1 || true
    ctr -a "$ctd" container delete "bench-$n" >/dev/null 2>&1 || true
done

log "restarts under a reading container"
reader_out=$work/reader.out
ctr -a "$ctd" run --rm --snapshotter smr "${images[1]}" bench-reader python3 -c '
import os, time
files = [os.path.join("/usr/lib/python3.11", f) for f in sorted(os.listdir("/usr/lib/python3.11")) if f.endswith(".py")]
worst, last, end, errors = 0.0, time.monotonic(), time.monotonic() + 25, 0
while time.monotonic() < end:
    for f in files[:50]:
        try:
            os.stat(f); open(f, "rb").read(4096)
        except OSError:
            errors += 1
    now = time.monotonic(); worst = max(worst, now - last); last = now
    time.sleep(0.01)
print(f"{worst:.3f} {errors}")
' >"$reader_out" 2>&1 &
reader=$!
sleep 3
for k in 1 2 3 4 5; do
    old=$daemon_pid
    start_daemon
    while kill -0 "$old" 2>/dev/null; do sleep 0.05; done
    sleep 1
done
kill -KILL "$daemon_pid"; sleep 0.5
start_daemon
wait "$reader" || true
read -r stall errors <"$reader_out" || { cat "$reader_out" >&2; stall=? errors=?; }
handovers=$(grep -c "took the snapshotter socket over" "$work/daemon.log" || true)

commit=$(cd "$here" && git rev-parse --short HEAD)
cat <<EOF

| measure | value |
| --- | --- |
| daemon RSS idle (after start, no image) | $(awk -v k="$idle" 'BEGIN { printf "%.1f MiB", k / 1024 }') |
| daemon peak RSS (VmHWM) with 10 containers of 4 images | $(awk -v k="$peak" 'BEGIN { printf "%.1f MiB", k / 1024 }') (now $(awk -v k="$now" 'BEGIN { printf "%.1f", k / 1024 }')) |
| image servers (\`smr __serve-fuse\`, one per image) RSS, sum | $(awk -v k="$servers" 'BEGIN { printf "%.1f MiB", k / 1024 }') in $nservers processes; $mounts image mounts |
| daemon + image servers, PSS (shared pages counted once) | $(awk -v k="$pss" 'BEGIN { printf "%.1f MiB", k / 1024 }') |
| longest gap between reads during 5 handovers and a SIGKILL | ${stall} s ($errors read errors; $handovers handovers logged) |
| commit | $commit |
| command | \`scripts/bench-daemon.sh\` |
EOF
