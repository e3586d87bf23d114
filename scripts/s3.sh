#!/usr/bin/env bash
# Run a throwaway S3-compatible server (s3s-fs, `cargo install s3s-fs@0.14.1
# --features binary --locked`; scripts/install-deps.sh installs it) for tests
# and demos.
#
# Usage:
#   scripts/s3.sh start DIR [PORT] [--keys ACCESS:SECRET] [--bucket NAME]...
#   scripts/s3.sh stop DIR
#
# start  stores objects under DIR/data (one directory per bucket; each
#        --bucket creates one), logs to DIR/s3s.log, listens on
#        127.0.0.1:PORT over plain HTTP (default PORT 8014; PORT 0 picks a
#        free port), waits until it answers, writes the pid to DIR/s3s.pid
#        and the address to DIR/s3s.addr, and prints the address (e.g.
#        127.0.0.1:8014) on stdout. --keys enables SigV4 authentication with
#        that key pair; without it the server accepts anonymous requests.
# stop   stops the server whose pid is in DIR/s3s.pid; the data stays.
#
# Clients: AWS_ENDPOINT_URL=http://ADDR AWS_ALLOW_HTTP=true
#          AWS_ACCESS_KEY_ID=ACCESS AWS_SECRET_ACCESS_KEY=SECRET
#          AWS_REGION=us-east-1, path-style requests.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
die() { echo "s3.sh: $*" >&2; exit 1; }

[[ $# -ge 2 ]] || usage
cmd=$1 dir=$2
shift 2
port=8014 keys="" buckets=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --keys) [[ $# -ge 2 ]] || usage; keys=$2; shift 2 ;;
        --keys=*) keys=${1#--keys=}; shift ;;
        --bucket) [[ $# -ge 2 ]] || usage; buckets+=("$2"); shift 2 ;;
        --bucket=*) buckets+=("${1#--bucket=}"); shift ;;
        [0-9]*) port=$1; shift ;;
        *) usage ;;
    esac
done
pidfile=$dir/s3s.pid

# shellcheck source=scripts/lib/daemon.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/daemon.sh"
alive() { alive_pidfile "$pidfile"; }

stop() {
    stop_pidfile "$pidfile" s3.sh
    rm -f "$dir/s3s.addr"
}

start() {
    command -v s3s-fs >/dev/null || die "s3s-fs not installed (scripts/install-deps.sh, or: cargo install s3s-fs@0.14.1 --features binary --locked)"
    command -v curl >/dev/null || die "curl not installed"
    mkdir -p "$dir/data"
    dir=$(realpath "$dir")
    pidfile=$dir/s3s.pid
    if alive; then die "already running (pid $(cat "$pidfile")); stop it first"; fi
    local b
    for b in "${buckets[@]}"; do
        [[ $b =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]] || die "invalid bucket name: $b"
        mkdir -p "$dir/data/$b"
    done
    local auth=()
    if [[ -n $keys ]]; then
        [[ $keys == *:* ]] || die "--keys wants ACCESS:SECRET"
        auth=(--access-key "${keys%%:*}" --secret-key "${keys#*:}")
    fi
    if [[ $port == 0 ]]; then
        port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    fi
    # Refuse a busy port: otherwise whoever holds it would answer.
    python3 -c 'import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", int(sys.argv[1])))' "$port" 2>/dev/null \
        || die "port $port on 127.0.0.1 is in use"
    local addr=127.0.0.1:$port
    # setsid: the server outlives the calling shell until "stop".
    RUST_LOG=${RUST_LOG:-warn} setsid s3s-fs --host 127.0.0.1 --port "$port" "${auth[@]}" "$dir/data" \
        >"$dir/s3s.log" 2>&1 </dev/null &
    local pid=$! i code=000
    echo "$pid" >"$pidfile"
    for ((i = 0; i < 200; i++)); do
        if ! running "$pid"; then
            rm -f "$pidfile"
            tail -20 "$dir/s3s.log" >&2
            die "s3s-fs exited during startup (port $port in use?)"
        fi
        # Any HTTP answer will do (403 when authentication is on).
        code=$(curl -s -o /dev/null -w '%{http_code}' "http://$addr/" || true)
        if [[ $code != 000 ]] && running "$pid"; then
            echo "$addr" >"$dir/s3s.addr"
            echo "$addr"
            return 0
        fi
        sleep 0.1
    done
    stop
    tail -20 "$dir/s3s.log" >&2
    die "s3s-fs at $addr did not answer within 20 s"
}

case $cmd in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
