#!/usr/bin/env bash
# Peak memory of smr against a registry that streams an endless manifest
# (scripts/bench/endless-registry.py on 127.0.0.1): `smr convert
# docker://127.0.0.1:PORT/x/endless:latest` must fail with an error naming
# the URL and the limit, without retrying, in bounded memory (target:
# peak RSS < 64 MiB). Prints a markdown table: peak RSS (GNU time's
# "Maximum resident set size"), wall time, the requests the server
# answered, and the error.
#
# Usage: scripts/bench-hostile.sh [SMR_BIN]   (default target/release/smr)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
smr=$(realpath "${1:-${CARGO_TARGET_DIR:-target}/release/smr}")
[[ -x $smr ]] || { echo "no smr binary at $smr (cargo build --release -p smr)" >&2; exit 1; }
work=$(mktemp -d /var/tmp/smr-bench-hostile.XXXXXX)
server=""
cleanup() {
    [[ -n $server ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

python3 scripts/bench/endless-registry.py >"$work/port" 2>"$work/server.log" &
server=$!
for _ in $(seq 100); do [[ -s $work/port ]] && break; sleep 0.05; done
port=$(head -1 "$work/port")
"$smr" keygen -o "$work/key" >/dev/null
set +e
/usr/bin/time -f '%M %e' -o "$work/time" "$smr" convert "docker://127.0.0.1:$port/x/endless:latest" \
    --store "$work/store" -o "$work/r.recipe" --key-file "$work/key" 2>"$work/err"
rc=$?
set -e
read -r rss_kib wall < <(tail -1 "$work/time")
requests=$(grep -c '^endless' "$work/server.log" || true)
err=$(grep -v '^Command exited' "$work/err" | tr '\n' ' ' | sed 's/|/\\|/g')
left=$(find "$work" -maxdepth 1 -name 'r.recipe*' | wc -l)
echo "| peak RSS MiB | wall s | exit | endless answers | recipe files left | error |"
echo "| --- | --- | --- | --- | --- | --- |"
printf '| %s | %s | %s | %s | %s | %s |\n' "$(awk -v k="$rss_kib" 'BEGIN { printf "%.1f", k / 1024 }')" "$wall" "$rc" "$requests" "$left" "$err"
