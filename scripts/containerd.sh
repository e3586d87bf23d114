#!/usr/bin/env bash
# Run a throwaway containerd (Debian's containerd 1.6) with smr as a proxy
# snapshotter, for tests and demos.
#
# Usage:
#   scripts/containerd.sh start DIR SNAPSHOTTER_SOCKET [--cri SANDBOX_IMAGE] [--plain-http HOST:PORT]
#   scripts/containerd.sh stop DIR
#
# start  writes DIR/config.toml (root DIR/root, state DIR/state, socket
#        DIR/containerd.sock, the proxy plugin "smr" at SNAPSHOTTER_SOCKET),
#        logs to DIR/containerd.log, waits until `ctr version` answers,
#        writes the pid to DIR/containerd.pid and prints the socket path.
#        Without --cri the CRI plugin is disabled; with it, CRI uses the smr
#        snapshotter with snapshot annotations on (the cri.* labels) and
#        SANDBOX_IMAGE as its pause image. --plain-http: CRI reaches that
#        registry over HTTP.
# stop   stops it (SIGTERM, then SIGKILL after 10 s), unmounts what is left
#        under DIR/state and DIR/root; the data stays.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
die() { echo "containerd.sh: $*" >&2; exit 1; }

[[ $# -ge 2 ]] || usage
cmd=$1 dir=$2
shift 2
sock="" cri=0 sandbox="" plain=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --cri) [[ $# -ge 2 ]] || usage; cri=1; sandbox=$2; shift 2 ;;
        --plain-http) [[ $# -ge 2 ]] || usage; plain=$2; shift 2 ;;
        -*) usage ;;
        *) sock=$1; shift ;;
    esac
done
pidfile=$dir/containerd.pid

# shellcheck source=scripts/lib/daemon.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/daemon.sh"

stop() {
    stop_pidfile "$pidfile" containerd.sh
    # Shims and their mounts outlive containerd: take them down too.
    local d
    d=$(realpath -m "$dir")
    pkill -f "containerd-shim-runc-v2 .*-address $d/containerd.sock" 2>/dev/null || true
    awk -v d="$d/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done
}

start() {
    command -v containerd >/dev/null || die "containerd not installed (apt-get install containerd)"
    [[ -n $sock ]] || usage
    mkdir -p "$dir"
    dir=$(realpath "$dir")
    pidfile=$dir/containerd.pid
    if alive_pidfile "$pidfile"; then die "already running (pid $(cat "$pidfile")); stop it first"; fi
    local cri_toml
    if [[ $cri == 1 ]]; then
        cri_toml="[plugins.\"io.containerd.grpc.v1.cri\"]
  sandbox_image = \"$sandbox\"
  # Some machines (nested or sandboxed kernels) refuse a negative
  # oom_score_adj, which CRI gives pause containers: keep it at containerd's.
  restrict_oom_score_adj = true
  [plugins.\"io.containerd.grpc.v1.cri\".containerd]
    snapshotter = \"smr\"
    disable_snapshot_annotations = false
  [plugins.\"io.containerd.grpc.v1.cri\".cni]
    bin_dir = \"$dir/cni-bin\"
    conf_dir = \"$dir/cni-conf\""
        if [[ -n $plain ]]; then
            cri_toml+="
  [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"$plain\"]
    endpoint = [\"http://$plain\"]"
        fi
    else
        cri_toml='disabled_plugins = ["io.containerd.grpc.v1.cri"]'
    fi
    cat >"$dir/config.toml" <<EOF
version = 2
root = "$dir/root"
state = "$dir/state"
$( [[ $cri == 1 ]] || echo "$cri_toml" )

[grpc]
  address = "$dir/containerd.sock"

[debug]
  level = "${CONTAINERD_LOG_LEVEL:-info}"

[proxy_plugins]
  [proxy_plugins.smr]
    type = "snapshot"
    address = "$sock"

$( [[ $cri == 1 ]] && echo "$cri_toml" )
EOF
    setsid containerd --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 </dev/null &
    local pid=$! i
    echo "$pid" >"$pidfile"
    for ((i = 0; i < 200; i++)); do
        if ! running "$pid"; then
            rm -f "$pidfile"
            tail -20 "$dir/containerd.log" >&2
            die "containerd exited during startup"
        fi
        if ctr -a "$dir/containerd.sock" version >/dev/null 2>&1; then
            echo "$dir/containerd.sock"
            return 0
        fi
        sleep 0.1
    done
    stop
    tail -20 "$dir/containerd.log" >&2
    die "containerd did not answer within 20 s"
}

case $cmd in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
