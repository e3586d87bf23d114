#!/usr/bin/env bash
# Cold start from a registry (issue 4, "Performance"): debian-python running
# `python3 -c 'import numpy'`, smr's lazy start vs a full pull and run with
# containerd 1.6, on loopback and through a shaped link; plus the push side
# of the artifact layout decision (one blob per chunk vs packs). Needs root.
#
# Usage:
#   scripts/bench-registry.sh [ROUNDS]        (default 3; prints markdown)
#
# Setup (once per invocation): a throwaway docker-registry on 127.0.0.1
# (its own config, log level info: every request is logged with its
# timing and body size, which is where request and byte counts come from);
# smr is built (release) and copied aside, so that another build of the
# tree during the benchmark does not change the binary under test. The
# cached test image is copied with skopeo into one repository per variant,
# and `smr convert docker://ADDR/REPO:bookworm --push --key-file K` pushes:
#   debian-python        default packs (~4 MiB; containerd pulls this repo too)
#   debian-python-zstd   --compress zstd, default packs
#   debian-python-chunk  --pack-chunks 1: one registry blob per chunk
# Push side (once, not per round):
#   - the pushes above, timed (loopback), and the same two layouts pushed
#     again through the shaped link into fresh repositories (*-pushshaped);
#     the proxy limits only server->client bandwidth, so uploads there pay
#     the round trips, not the rate;
#   - second image into the same repository: debian, then debian-python,
#     then debian-python again (must upload nothing), for packs and for
#     blob per chunk (debian-incr, debian-incr-chunk).
#
# Links: "loopback" = straight to the registry; "shaped" = through
# scripts/bench/shape-proxy.py (default 100 Mbit/s server->client, 20 ms
# added per request round trip and per new connection), a fresh proxy per
# timed run.
#
# Per round, link and tool (page cache dropped before each timed command):
#   containerd  a private containerd (fresh --root/--state/--address under a
#               temp dir, own config, stopped and removed after the run), timed:
#               ctr images pull --plain-http REF && ctr run --rm REF ID CMD
#   smr         smr run --key-file K --cache-dir FRESH --stats S docker://REF -- CMD
#   smr-zstd    the same from the --compress zstd artifact
#   smr-chunk   the same from the --pack-chunks 1 artifact
#   snapshotter containerd (scripts/containerd.sh) with `smr daemon` as its
#               smr snapshotter, both fresh (empty node cache), timed:
#               smr pull --containerd SOCK docker://REF &&
#               ctr run --rm --snapshotter smr REF ID CMD
#   snapshotter-profile  the same from debian-python-prof (startup profile)
#   snapshotter-zstd, snapshotter-zstd-profile
#               the same from the --compress zstd artifacts
#   smr-profile, smr-zstd-profile
#               like smr and smr-zstd, from repositories (debian-python-prof,
#               debian-python-zstd-prof) converted with `--optimize-cmd CMD`:
#               the conversion ran the command once and pushed its startup
#               profile; the timed runs find it and replay it. The other
#               repositories are converted with `--no-optimize` (no profile).
#   smr-zstd-warm  smr-zstd-profile with a warm node cache: the same start
#               run once, untimed, with the cache the timed run then uses
# Bytes: response bodies written by the registry during the run (all of
# them: manifests, configs, layers, recipe, pack index, chunks); the shaped
# link's proxy count (with HTTP headers) and each tool's own count
# (containerd content store, smr --stats bytes_fetched) are kept in the
# results too.
#
# Environment:
#   SMR_BENCH_RATE=100mbit  SMR_BENCH_DELAY_MS=20   the shaped link
#   SMR_BENCH_LINKS="loopback shaped"
#   SMR_BENCH_TOOLS="containerd smr smr-zstd smr-chunk smr-profile smr-zstd-profile snapshotter snapshotter-profile snapshotter-zstd snapshotter-zstd-profile"
#   SMR_BENCH_PUSH=1        the push measurements (0: skip the shaped pushes
#                           and the second-image pushes)
#   SMR_BENCH_BUILD=1       cargo build --release -p smr first (0: use as is)
#   SMR_BENCH_KEEP=DIR      copy the results, registry log and smr outputs there
#   SMR_BIN                 the smr binary (default target/release/smr)
#   SMR_CONVERT_ARGS, SMR_RUN_ARGS   extra arguments for smr convert / run
#   SMR_RUN_LOG             SMR_LOG for the timed smr runs (default: warn;
#                           e.g. smr_registry::store=debug, kept with SMR_BENCH_KEEP)
#   SMR_IMAGE_CACHE         test images (default /var/cache/smr-test-images)
#   SMR_BENCH_IMAGE=LAYOUT:TAG  the image measured instead of debian-python
#                           (copied into the same repositories, whose names
#                           stay debian-python*; e.g. the debian-node image
#                           of scripts/bench/build-node-image.sh)
#   SMR_BENCH_CMD="WORDS"   its command, as shell words (default
#                           "python3 -c 'import numpy'")
# Exits 1 if a requested tool could not be measured; the rows that were
# measured are printed anyway.
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; fi
rounds=${1:-3}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "bench-registry: ROUNDS must be a positive number" >&2; exit 2; }
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${SMR_IMAGE_CACHE:-/var/cache/smr-test-images}
layout=$cache/oci
rate=${SMR_BENCH_RATE:-100mbit}
delay_ms=${SMR_BENCH_DELAY_MS:-20}
links=${SMR_BENCH_LINKS:-loopback shaped}
tools=${SMR_BENCH_TOOLS:-containerd smr smr-zstd smr-chunk smr-profile smr-zstd-profile snapshotter snapshotter-profile snapshotter-zstd snapshotter-zstd-profile}
bench_push=${SMR_BENCH_PUSH:-1}
keep=${SMR_BENCH_KEEP:-}
read -r -a convert_args <<<"${SMR_CONVERT_ARGS:-}"
read -r -a run_args <<<"${SMR_RUN_ARGS:-}"
# The image under test (an OCI layout and tag) and the command it runs.
bench_image=${SMR_BENCH_IMAGE:-$cache/oci:debian-python}
if [[ -n ${SMR_BENCH_CMD:-} ]]; then
  eval "pycmd=($SMR_BENCH_CMD)"
else
  pycmd=(python3 -c 'import numpy')
fi
smr_src=${SMR_BIN:-$here/target/release/smr}
proxy_py=$here/scripts/bench/shape-proxy.py
reglog_py=$here/scripts/bench/reglog.py
helper=$here/scripts/bench/registry_bench.py

log() { printf '[bench-registry %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }
want() { [[ " $tools " == *" $1 "* ]]; }
# Other compilers running right now (another engineer's cargo build).
builds_now() { pgrep -c -x rustc 2>/dev/null || true; }
load1() { cut -d' ' -f1 /proc/loadavg; }

[[ $(id -u) == 0 ]] || die "must run as root (containerd, smr run, drop_caches)"
need=(docker-registry skopeo python3 curl findmnt pgrep)
want containerd && need+=(containerd ctr runc containerd-shim-runc-v2)
for t in "${need[@]}"; do
  command -v "$t" >/dev/null || die "missing tool: $t (scripts/install-deps.sh)"
done
if want containerd; then
  containerd --version | grep -q ' 1\.6\.' || log "warning: not containerd 1.6: $(containerd --version)"
fi
"$here/scripts/build-test-images.sh" "$cache" >/dev/null

work=$(mktemp -d /var/tmp/smr-bench-registry.XXXXXX)
res=$work/results.jsonl
: >"$res"
proxy_pid="" ctd_pid="" ctd_dir="" reg_pid=""
failed=()   # "tool: reason" for tools that could not be measured
record() { python3 "$helper" record "$res" "$@"; }

# Unmount whatever is still mounted under $work, deepest first.
umount_under() {
  local m
  findmnt -rn -o TARGET | { grep -F -- "$1/" || true; } | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}

cleanup() {
  local rc=$?
  set +e
  [[ -n $proxy_pid ]] && kill "$proxy_pid" 2>/dev/null && wait "$proxy_pid" 2>/dev/null
  [[ -n $ctd_pid ]] && ctd_stop
  [[ -n ${snap_pid:-} || -d $work/snap ]] && snap_stop
  declare -F reg_stop >/dev/null && reg_stop
  umount_under "$work"
  if [[ -n $keep ]]; then
    mkdir -p "$keep" && cp -r "$work/results.jsonl" "$work/logs" "$work/registry/registry.log" "$keep/" 2>/dev/null
    log "results and logs kept in $keep"
  fi
  if findmnt -rn -o TARGET | grep -qF -- "$work/"; then
    log "mounts left under $work; not removing it"
  else
    rm -rf -- "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$work/logs"

# ---- registry ----------------------------------------------------------------
# A docker-registry of our own (not scripts/registry.sh: that one logs at
# "warn", and the request log is what counts requests and bytes here).
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
reglog=$work/registry/registry.log
# The registry logs at level info: every request with its timing and size.
reg_start() {
  addr=$("$here/scripts/registry.sh" start "$work/registry" 0 --log-level info) ||
    { tail -20 "$reglog" >&2; die "docker-registry did not start"; }
  reg_pid=$(cat "$work/registry/registry.pid")
}
reg_stop() {
  [[ -n $reg_pid ]] || return 0
  "$here/scripts/registry.sh" stop "$work/registry" >/dev/null 2>&1 || true
  reg_pid=""
}
# reg_mark: the registry log's line count once the last response is logged.
reg_mark() { sleep 0.3; wc -l <"$reglog"; }
# reg_window FROM TO OUT [reglog.py options]: summary of the requests logged
# after line FROM up to line TO.
reg_window() { python3 "$reglog_py" "$reglog" "$(($1 + 1))" "$2" "${@:4}" >"$3"; }

reg_start
log "registry at $addr; copying $bench_image into one repository per variant"
copy() { skopeo copy --quiet --dest-tls-verify=false "oci:$layout:$1" "docker://$addr/$2"; }
for repo in debian-python debian-python-zstd debian-python-chunk debian-python-prof debian-python-zstd-prof; do
  skopeo copy --quiet --dest-tls-verify=false "oci:$bench_image" "docker://$addr/$repo:bookworm"
done
# One port for every proxy instance, so image references stay the same.
proxy_addr=127.0.0.1:$(free_port)

# proxy_start: a fresh shaping proxy in front of the registry on $proxy_addr.
proxy_start() {
  rm -f "$work/proxy.json" "$work/proxy.addr"
  "$proxy_py" --listen "$proxy_addr" --upstream "$addr" --rate "$rate" --delay-ms "$delay_ms" \
    --stats "$work/proxy.json" --stats-interval 60 >"$work/proxy.addr" 2>"$work/proxy.err" &
  proxy_pid=$!
  local i
  for ((i = 0; i < 200; i++)); do
    [[ -s $work/proxy.addr ]] && return 0
    kill -0 "$proxy_pid" 2>/dev/null || break
    sleep 0.05
  done
  cat "$work/proxy.err" >&2
  die "shape-proxy did not start on $proxy_addr"
}
# proxy_stop: stop it; its final stats stay in $work/proxy.json.
# Not called in $(...): the proxy is a child of this shell.
proxy_stop() {
  kill -TERM "$proxy_pid"
  wait "$proxy_pid" || die "shape-proxy failed: $(cat "$work/proxy.err")"
  proxy_pid=""
  python3 -c 'import json, sys; assert json.load(open(sys.argv[1]))["final"]' "$work/proxy.json" \
    || die "shape-proxy wrote no final stats"
}

# ---- containerd --------------------------------------------------------------
# ctd_start DIR: a private containerd with everything under DIR and its own
# config (not /etc/containerd/config.toml); CRI off, overlayfs snapshotter.
ctd_start() {
  ctd_dir=$1
  mkdir -p "$ctd_dir"
  cat >"$ctd_dir/config.toml" <<EOF
version = 2
root = "$ctd_dir/root"
state = "$ctd_dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$ctd_dir/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$ctd_dir/opt"
EOF
  # setsid: a ^C of the script must not kill containerd before cleanup has
  # removed its containers (their shims would outlive it).
  setsid containerd --config "$ctd_dir/config.toml" --root "$ctd_dir/root" --state "$ctd_dir/state" \
    --address "$ctd_dir/containerd.sock" >"$ctd_dir/containerd.log" 2>&1 &
  ctd_pid=$!
  local i
  for ((i = 0; i < 200; i++)); do
    ctr -a "$ctd_dir/containerd.sock" version >/dev/null 2>&1 && return 0
    kill -0 "$ctd_pid" 2>/dev/null || break
    sleep 0.1
  done
  tail -20 "$ctd_dir/containerd.log" >&2
  die "containerd did not start"
}
# ctd_stop: kill leftover tasks (after an interrupt), stop containerd,
# unmount and remove its directory: the next run starts with no content
# and no snapshots.
ctd_stop() {
  local sock=$ctd_dir/containerd.sock id
  if kill -0 "$ctd_pid" 2>/dev/null; then
    for id in $(timeout 10 ctr -a "$sock" tasks ls -q 2>/dev/null); do
      timeout 10 ctr -a "$sock" tasks kill -s SIGKILL "$id" >/dev/null 2>&1
      timeout 10 ctr -a "$sock" tasks delete -f "$id" >/dev/null 2>&1
    done
    for id in $(timeout 10 ctr -a "$sock" containers ls -q 2>/dev/null); do
      timeout 10 ctr -a "$sock" containers delete "$id" >/dev/null 2>&1
    done
    kill -TERM "$ctd_pid" 2>/dev/null
  fi
  wait "$ctd_pid" 2>/dev/null || true
  ctd_pid=""
  umount_under "$ctd_dir"
  findmnt -rn -o TARGET | grep -qF -- "$ctd_dir/" || rm -rf -- "$ctd_dir"
}

# ctd_run LINK ROUND REGISTRY: records one run.
ctd_run() {
  local link=$1 r=$2 reg=$3 t0 t1 t2 sock bytes_tool m0 m1 b0 b1 l0
  local ref=$reg/debian-python:bookworm id=bench-$r-$link
  ctd_start "$work/ctd"
  sock=$ctd_dir/containerd.sock
  rm -f "$work/proxy.json"
  [[ $link == shaped ]] && proxy_start
  drop
  m0=$(reg_mark) b0=$(builds_now) l0=$(load1)
  t0=$(now)
  ctr -a "$sock" images pull --plain-http "$ref" >"$ctd_dir/pull.out" 2>&1 \
    || { tail -20 "$ctd_dir/pull.out" >&2; die "ctr images pull $ref failed"; }
  t1=$(now)
  ctr -a "$sock" run --rm "$ref" "$id" "${pycmd[@]}" >"$ctd_dir/run.out" 2>&1 \
    || { cat "$ctd_dir/run.out" >&2; die "ctr run $ref failed"; }
  t2=$(now)
  b1=$(builds_now)
  [[ $link == shaped ]] && proxy_stop
  m1=$(reg_mark)
  reg_window "$m0" "$m1" "$work/reg.json"
  bytes_tool=$(find "$ctd_dir/root/io.containerd.content.v1.content/blobs" -type f -printf '%s\n' |
    awk '{ s += $1 } END { print s + 0 }')
  record run link="$link" tool=containerd round="$r" wall="$(elapsed "$t0" "$t2")" \
    pull="$(elapsed "$t0" "$t1")" tool_bytes="$bytes_tool" builds="$((b0 > b1 ? b0 : b1))" load="$l0" \
    reg@="$work/reg.json" proxy@="$work/proxy.json"
  ctd_stop
}

# ---- containerd with the smr snapshotter ------------------------------------
# snap_run LINK ROUND REGISTRY TOOL: records one run, or returns 1.
snap_run() {
  local link=$1 r=$2 reg=$3 tool=$4 t0 t1 t2 m0 m1 b0 b1 l0 d=$work/snap rss
  local repo=debian-python
  case $tool in
    snapshotter-profile) repo=debian-python-prof ;;
    snapshotter-zstd) repo=debian-python-zstd ;;
    snapshotter-zstd-profile) repo=debian-python-zstd-prof ;;
  esac
  local ref=$reg/$repo:bookworm id=bench-snap-$r-$link
  rm -rf "$d" "$work/proxy.json"
  mkdir -p "$d"
  setsid "$smr" daemon --root "$d/smr" --snapshotter-socket "$d/snap.sock" --socket "$d/smr.sock" \
    --cache-dir "$d/cache" --key-file "$key" >"$d/daemon.log" 2>&1 &
  snap_pid=$!
  local i
  for ((i = 0; i < 200; i++)); do [[ -S $d/snap.sock ]] && break; sleep 0.05; done
  local sock
  sock=$("$here/scripts/containerd.sh" start "$d/ctd" "$d/snap.sock") || { snap_stop; return 1; }
  [[ $link == shaped ]] && proxy_start
  drop
  m0=$(reg_mark) b0=$(builds_now) l0=$(load1)
  t0=$(now)
  # As on a node where the daemon has the default socket: smr pull tells
  # it which image is coming.
  if ! SMR_DAEMON_SOCKET="$d/smr.sock" "$smr" pull --containerd "$sock" "docker://$ref" >"$d/pull.out" 2>&1; then
    [[ $link == shaped ]] && proxy_stop
    cat "$d/pull.out" >&2; record fail link="$link" tool="$tool" round="$r" error="smr pull failed"
    snap_stop; return 1
  fi
  t1=$(now)
  if ! ctr -a "$sock" run --rm --snapshotter smr "$ref" "$id" "${pycmd[@]}" >"$d/run.out" 2>&1; then
    [[ $link == shaped ]] && proxy_stop
    cat "$d/run.out" >&2; record fail link="$link" tool="$tool" round="$r" error="ctr run failed"
    snap_stop; return 1
  fi
  t2=$(now)
  b1=$(builds_now)
  [[ $link == shaped ]] && proxy_stop
  m1=$(reg_mark)
  rss=$(awk '/^VmHWM/ { print $2 }' "/proc/$snap_pid/status" 2>/dev/null || echo 0)
  reg_window "$m0" "$m1" "$work/reg.json"
  record run link="$link" tool="$tool" round="$r" wall="$(elapsed "$t0" "$t2")" \
    pull="$(elapsed "$t0" "$t1")" builds="$((b0 > b1 ? b0 : b1))" load="$l0" daemon_rss_kib="$rss" \
    reg@="$work/reg.json" proxy@="$work/proxy.json"
  mkdir -p "$work/logs" && cp "$d/daemon.log" "$work/logs/daemon-$tool-$link-$r.log" 2>/dev/null || true
  echo "bench: smr pull at $t0, ctr run at $t1, done at $t2 (seconds since the epoch)" >>"$work/logs/daemon-$tool-$link-$r.log"
  cp "$d/pull.out" "$work/logs/pull-$tool-$link-$r.out" 2>/dev/null || true
  local s n=0
  for s in "$d"/smr/mount-state/*/serve.log; do
    [[ -f $s ]] && cp "$s" "$work/logs/serve-$tool-$link-$r-$((n++)).log"
  done
  snap_stop
}
# snap_stop: containerd, then the daemon, then the image mounts it made.
snap_stop() {
  local d=$work/snap m
  "$here/scripts/containerd.sh" stop "$d/ctd" >/dev/null 2>&1 || true
  [[ -n ${snap_pid:-} ]] && { kill -TERM "$snap_pid" 2>/dev/null; wait "$snap_pid" 2>/dev/null || true; }
  snap_pid=""
  for m in "$d"/smr/images/*/rootfs; do
    [[ -d $m ]] && "$smr" umount "$m" --state-dir "$d/smr/mount-state" >/dev/null 2>&1 || true
  done
  umount_under "$d"
  findmnt -rn -o TARGET | grep -qF -- "$d/" || rm -rf -- "$d"
}

# ---- smr ---------------------------------------------------------------------
smr=$work/bin/smr
key=$work/owner.key
smr_ok=0
# smr_push VARIANT LINK REPO:TAG KIND [STEP] [convert args...]: converts and
# pushes, records what the push did. KIND: push or incr.
smr_push() {
  local variant=$1 link=$2 ref=$3 kind=$4 step=$5 reg=$addr t0 t1 m0 m1 out since host=()
  shift 5
  [[ $link == shaped ]] && { reg=$proxy_addr; host=(--host "$proxy_addr"); proxy_start; }
  out=$work/logs/convert-$variant-$link-${ref//[:\/]/_}-$step.out
  log "smr convert docker://$reg/$ref --push $* ($variant, $link)"
  m0=$(reg_mark)
  t0=$(now)
  if ! SMR_LOG=smr_registry::push=info "$smr" convert "docker://$reg/$ref" --push --key-file "$key" \
      "$@" "${convert_args[@]}" >"$out" 2>&1; then
    [[ $link == shaped ]] && proxy_stop
    cat "$out" >&2
    failed+=("$variant: smr convert docker://$reg/$ref --push $* failed (output above)")
    return 1
  fi
  t1=$(now)
  [[ $link == shaped ]] && proxy_stop
  m1=$(reg_mark)
  python3 "$helper" push "$out" >"$work/push.json" || { failed+=("$variant: no push summary in $out"); return 1; }
  since=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["push_started"] or "")' "$work/push.json")
  if [[ -n $since ]]; then
    reg_window "$m0" "$m1" "$work/reg.json" --since "$since" "${host[@]}"
  else
    reg_window "$m0" "$m1" "$work/reg.json" "${host[@]}"
  fi
  python3 - "$work/push.json" "$res" "$kind" "$variant" "$link" "$ref" "$step" "$(elapsed "$t0" "$t1")" \
    "$work/reg.json" <<'PY'
import json, sys
push, res, kind, variant, link, ref, step, wall, reg = sys.argv[1:]
d = dict(kind=kind, variant=variant, link=link, ref=ref, step=step, wall=float(wall))
d.update(json.load(open(push)))
d["reg"] = json.load(open(reg))
open(res, "a").write(json.dumps(d) + "\n")
PY
}

smr_prepare() {
  if [[ ${SMR_BENCH_BUILD:-1} == 1 ]]; then
    log "cargo build --release -p smr (may wait for the build lock)"
    (cd "$here" && cargo build --release -q -p smr) || { failed+=("smr: cargo build --release -p smr failed"); return 1; }
  fi
  [[ -x $smr_src ]] || { failed+=("smr: $smr_src not built"); return 1; }
  # A private copy: a rebuild of the tree during the benchmark must not
  # swap the binary under test.
  mkdir -p "$work/bin"
  cp "$smr_src" "$smr"
  (cd "$here" && git rev-parse HEAD && git diff --stat HEAD -- crates Cargo.lock) >"$work/logs/smr-build.txt" 2>&1 || true
  log "smr under test: $smr_src ($(cd "$here" && git rev-parse --short HEAD)$(cd "$here" && git diff --quiet HEAD -- crates Cargo.lock || echo ', with uncommitted changes in crates/'))"
  if ! "$smr" convert --help 2>/dev/null | grep -q -- '--pack-chunks'; then
    failed+=("smr: $smr has no 'smr convert docker://... --push --pack-chunks' (registry support is not built in); smr rows skipped")
    return 1
  fi
  "$smr" keygen -o "$key" >/dev/null
  smr_push packs loopback debian-python:bookworm push - --no-optimize || return 1
  smr_push zstd loopback debian-python-zstd:bookworm push - --compress zstd --no-optimize || return 1
  smr_push chunk loopback debian-python-chunk:bookworm push - --pack-chunks 1 --no-optimize || return 1
  # The startup profile is made by the conversion, from the benchmark's
  # command (`--optimize-cmd`), and pushed with the artifact.
  local optimize
  optimize=$(printf '%q ' "${pycmd[@]}")
  if want smr-profile || want snapshotter-profile; then
    smr_push packs-prof loopback debian-python-prof:bookworm push - --optimize-cmd "$optimize" || return 1
  fi
  if want smr-zstd-profile || want snapshotter-zstd-profile || want smr-zstd-warm; then
    smr_push zstd-prof loopback debian-python-zstd-prof:bookworm push - --compress zstd --optimize-cmd "$optimize" || return 1
  fi
  smr_ok=1
  [[ $bench_push == 1 ]] || return 0
  copy debian-python debian-python-pushshaped:bookworm
  copy debian-python debian-python-chunk-pushshaped:bookworm
  smr_push packs shaped debian-python-pushshaped:bookworm push - || true
  smr_push chunk shaped debian-python-chunk-pushshaped:bookworm push - --pack-chunks 1 || true
  local variant repo extra
  for variant in packs chunk; do
    repo=debian-incr extra=()
    [[ $variant == chunk ]] && repo=debian-incr-chunk extra=(--pack-chunks 1)
    copy debian "$repo:debian"
    copy debian-python "$repo:debian-python"
    smr_push "$variant" loopback "$repo:debian" incr debian "${extra[@]}" || continue
    smr_push "$variant" loopback "$repo:debian-python" incr debian-python "${extra[@]}" || continue
    smr_push "$variant" loopback "$repo:debian-python" incr "debian-python again" "${extra[@]}" || continue
  done
}

# smr_run LINK ROUND REGISTRY TOOL: records one run, or returns 1.
smr_run() {
  local link=$1 r=$2 reg=$3 tool=$4 t0 t1 m0 m1 b0 b1 l0 out
  local repo=debian-python
  case $tool in
    smr-zstd) repo=debian-python-zstd ;;
    smr-chunk) repo=debian-python-chunk ;;
    smr-profile) repo=debian-python-prof ;;
    smr-zstd-profile | smr-zstd-warm) repo=debian-python-zstd-prof ;;
  esac
  local ref=docker://$reg/$repo:bookworm c=$work/smr-cache stats=$work/smr-stats.json
  out=$work/logs/run-$tool-$link-$r.out
  rm -rf "$c" "$stats" "$work/proxy.json"
  if [[ $tool == *-warm ]]; then
    # The same start once, untimed, over loopback: the node cache then
    # holds what the timed one reads.
    "$smr" run --key-file "$key" --cache-dir "$c" "${run_args[@]}" "docker://$addr/$repo:bookworm" \
      -- "${pycmd[@]}" >"$out.warmup" 2>&1 || { tail -20 "$out.warmup" >&2; return 1; }
  fi
  [[ $link == shaped ]] && proxy_start
  drop
  m0=$(reg_mark) b0=$(builds_now) l0=$(load1)
  t0=$(now)
  if ! SMR_LOG=${SMR_RUN_LOG:-warn} "$smr" run --key-file "$key" --cache-dir "$c" --stats "$stats" \
      "${run_args[@]}" "$ref" -- "${pycmd[@]}" >"$out" 2>&1; then
    [[ $link == shaped ]] && proxy_stop
    tail -30 "$out" >&2
    record fail link="$link" tool="$tool" round="$r" error="$(tail -1 "$out" | sed 's/\x1b\[[0-9;]*m//g')"
    rm -rf "$c"
    return 1
  fi
  t1=$(now)
  b1=$(builds_now)
  [[ $link == shaped ]] && proxy_stop
  m1=$(reg_mark)
  reg_window "$m0" "$m1" "$work/reg.json"
  record run link="$link" tool="$tool" round="$r" wall="$(elapsed "$t0" "$t1")" pull=- \
    builds="$((b0 > b1 ? b0 : b1))" load="$l0" \
    reg@="$work/reg.json" proxy@="$work/proxy.json" smr@="$stats"
  rm -rf "$c"
}

if want smr || want smr-zstd || want smr-chunk || want smr-profile || want smr-zstd-profile || want smr-zstd-warm ||
   want snapshotter || want snapshotter-profile || want snapshotter-zstd || want snapshotter-zstd-profile; then
  smr_prepare || log "${failed[-1]}"
fi

# ---- rounds ------------------------------------------------------------------
declare -A fails=()
log "$rounds round(s); links: $links; tools: $tools; shaped = $rate, +${delay_ms} ms per round trip"
for r in $(seq "$rounds"); do
  for link in $links; do
    case $link in
      loopback) reg=$addr ;;
      shaped) reg=$proxy_addr ;;
      *) die "unknown link $link (loopback, shaped)" ;;
    esac
    for tool in $tools; do
      case $tool in
        containerd)
          log "round $r, $link: containerd pull + run"
          ctd_run "$link" "$r" "$reg" ;;
        smr | smr-zstd | smr-chunk | smr-profile | smr-zstd-profile | smr-zstd-warm)
          [[ $smr_ok == 1 ]] || continue
          # A failed run is recorded and reported; a tool that fails twice
          # is not run again.
          if ((${fails[$tool]:-0} >= 2)); then continue; fi
          log "round $r, $link: $tool run"
          if ! smr_run "$link" "$r" "$reg" "$tool"; then
            fails[$tool]=$((${fails[$tool]:-0} + 1))
            log "$tool: smr run failed on the $link link in round $r (output above; recorded)"
            ((fails[$tool] < 2)) || failed+=("$tool: smr run failed twice; not run again")
          fi ;;
        snapshotter | snapshotter-profile | snapshotter-zstd | snapshotter-zstd-profile)
          [[ $smr_ok == 1 ]] || continue
          if ((${fails[$tool]:-0} >= 2)); then continue; fi
          log "round $r, $link: $tool (smr pull --containerd + ctr run --snapshotter smr)"
          if ! snap_run "$link" "$r" "$reg" "$tool"; then
            fails[$tool]=$((${fails[$tool]:-0} + 1))
            ((fails[$tool] < 2)) || failed+=("$tool: failed twice; not run again")
          fi ;;
        *) die "unknown tool $tool (containerd, smr, smr-zstd, smr-chunk, smr-profile, smr-zstd-profile, smr-zstd-warm, snapshotter, snapshotter-profile, snapshotter-zstd, snapshotter-zstd-profile)" ;;
      esac
    done
  done
done

# ---- report ------------------------------------------------------------------
python3 "$helper" report "$res" "$rounds" "$rate" "$delay_ms" "$(containerd --version 2>/dev/null | awk '{print $3}')"

if ((${#failed[@]})); then
  for f in "${failed[@]}"; do log "NOT MEASURED: $f"; done
  exit 1
fi
