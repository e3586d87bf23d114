#!/usr/bin/env bash
# Run a throwaway OCI registry (Debian's docker-registry, distribution 2.8)
# for tests and demos.
#
# Usage:
#   scripts/registry.sh start DIR [PORT] [--htpasswd USER:PASS] [--log-level LEVEL]
#   scripts/registry.sh stop DIR
#
# start  writes DIR/config.yml, stores blobs under DIR/data, logs to
#        DIR/registry.log, listens on 127.0.0.1:PORT over plain HTTP
#        (default PORT 5000; PORT 0 picks a free port), waits until /v2/
#        answers, writes the pid to DIR/registry.pid and the address to
#        DIR/registry.addr, and prints the address (e.g. 127.0.0.1:5000) on
#        stdout. --htpasswd enables basic auth (bcrypt, needs htpasswd from
#        apache2-utils). --log-level sets the registry log level (default
#        warn; info logs every request with its timing and size).
# stop   stops the registry whose pid is in DIR/registry.pid; the data stays.
#
# Clients need plain HTTP: skopeo --tls-verify=false / --dest-tls-verify=false.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
die() { echo "registry.sh: $*" >&2; exit 1; }

[[ $# -ge 2 ]] || usage
cmd=$1 dir=$2
shift 2
port=5000 auth="" level=warn
while [[ $# -gt 0 ]]; do
    case $1 in
        --log-level) [[ $# -ge 2 ]] || usage; level=$2; shift 2 ;;
        --log-level=*) level=${1#--log-level=}; shift ;;
        --htpasswd) [[ $# -ge 2 ]] || usage; auth=$2; shift 2 ;;
        --htpasswd=*) auth=${1#--htpasswd=}; shift ;;
        [0-9]*) port=$1; shift ;;
        *) usage ;;
    esac
done
pidfile=$dir/registry.pid

# shellcheck source=scripts/lib/daemon.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/daemon.sh"
alive() { alive_pidfile "$pidfile"; }

stop() {
    stop_pidfile "$pidfile" registry.sh
    rm -f "$dir/registry.addr"
}

start() {
    command -v docker-registry >/dev/null || die "docker-registry not installed (apt-get install docker-registry)"
    command -v curl >/dev/null || die "curl not installed"
    mkdir -p "$dir/data"
    dir=$(realpath "$dir")
    pidfile=$dir/registry.pid
    if alive; then die "already running (pid $(cat "$pidfile")); stop it first"; fi
    if [[ $port == 0 ]]; then
        port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    fi
    # Refuse a busy port: otherwise /v2/ of whoever holds it would answer.
    python3 -c 'import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", int(sys.argv[1])))' "$port" 2>/dev/null \
        || die "port $port on 127.0.0.1 is in use"
    local addr=127.0.0.1:$port auth_yaml="" curl_auth=()
    if [[ -n $auth ]]; then
        command -v htpasswd >/dev/null || die "htpasswd not installed (apt-get install apache2-utils)"
        [[ $auth == *:* ]] || die "--htpasswd wants USER:PASS"
        htpasswd -Bbc "$dir/htpasswd" "${auth%%:*}" "${auth#*:}" 2>/dev/null
        auth_yaml="auth:
  htpasswd:
    realm: smr-test
    path: $dir/htpasswd"
        curl_auth=(-u "$auth")
    fi
    cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: $level
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: $addr
  headers:
    X-Content-Type-Options: [nosniff]
$auth_yaml
EOF
    # setsid: the registry outlives the calling shell until "stop".
    setsid docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 </dev/null &
    local pid=$! i code
    echo "$pid" >"$pidfile"
    for ((i = 0; i < 200; i++)); do
        if ! running "$pid"; then
            rm -f "$pidfile"
            tail -20 "$dir/registry.log" >&2
            die "docker-registry exited during startup (port $port in use?)"
        fi
        code=$(curl -s -o /dev/null -w '%{http_code}' "${curl_auth[@]}" "http://$addr/v2/" || true)
        if [[ $code == 200 ]] && running "$pid"; then
            echo "$addr" >"$dir/registry.addr"
            echo "$addr"
            return 0
        fi
        sleep 0.1
    done
    stop
    tail -20 "$dir/registry.log" >&2
    die "registry at $addr did not answer /v2/ within 20 s (last HTTP code $code)"
}

case $cmd in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
