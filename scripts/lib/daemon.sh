# shellcheck shell=bash
# Stopping the throwaway servers of scripts/registry.sh and scripts/s3.sh
# by their pid files. Sourced, not run.

# running PID: whether the process runs (a zombie waiting for a busy init
# to reap it does not: it has already released its port).
running() {
    kill -0 "$1" 2>/dev/null || return 1
    [[ $(sed -E 's/.*\) (.).*/\1/' "/proc/$1/stat" 2>/dev/null) != Z ]]
}

# alive_pidfile PIDFILE: whether the process named in PIDFILE runs.
alive_pidfile() { [[ -f $1 ]] && running "$(cat "$1")"; }

# stop_pidfile PIDFILE NAME: SIGTERM the process named in PIDFILE, SIGKILL
# it after 10 s, and remove PIDFILE. NAME goes in the note when nothing runs.
stop_pidfile() {
    local pidfile=$1 name=$2 pid i
    if ! [[ -f $pidfile ]]; then
        echo "$name: not running (no $pidfile)" >&2
        return 0
    fi
    pid=$(cat "$pidfile")
    if running "$pid"; then
        kill -TERM "$pid"
        for ((i = 0; i < 100; i++)); do
            running "$pid" || break
            sleep 0.1
        done
        if running "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}
