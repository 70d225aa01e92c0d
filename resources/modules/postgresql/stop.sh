#!/bin/sh
# Stop the PostgreSQL server that start.sh started: a fast shutdown (clients cut, a
# checkpoint written), then an immediate one (crash recovery at the next start), then
# SIGKILL. Uses the same environment as start.sh, plus:
#   PG_STOP_TIMEOUT  seconds for the fast shutdown; the immediate one gets 10 more, so keep
#                    their sum below the module's service.stop_timeout   (default 15)
set -eu

PGDATA="${PGDATA:-/srv/tandem-pg/data}"
PG_USER="${PG_USER:-postgres}"
PG_STOP_TIMEOUT="${PG_STOP_TIMEOUT:-15}"

if [ -z "${PG_BIN:-}" ]; then
    PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    if [ -z "$PG_BIN" ]; then
        found="$(command -v pg_ctl || true)"
        [ -n "$found" ] || { echo "postgresql stop: no PostgreSQL binaries found; set PG_BIN" >&2; exit 1; }
        PG_BIN="$(dirname "$found")"
    fi
fi
cd /

# As in start.sh: only a postgres process of this network namespace working in PGDATA.
server_pid() {
    [ -r "$PGDATA/postmaster.pid" ] || return 1
    found="$(head -n 1 "$PGDATA/postmaster.pid" 2>/dev/null || true)"
    case "$found" in '' | *[!0-9]*) return 1 ;; esac
    [ "$(cat "/proc/$found/comm" 2>/dev/null)" = postgres ] || return 1
    [ "$(readlink "/proc/$found/ns/net" 2>/dev/null)" = "$(readlink /proc/self/ns/net)" ] || return 1
    [ "$(readlink "/proc/$found/cwd" 2>/dev/null)" = "$(cd "$PGDATA" && pwd -P)" ] || return 1
    echo "$found"
}

if ! pid="$(server_pid)"; then
    echo "postgresql not running"
    exit 0
fi
for mode in fast immediate; do
    if [ "$mode" = fast ]; then wait="$PG_STOP_TIMEOUT"; else wait=10; fi
    if runuser -u "$PG_USER" -- "$PG_BIN/pg_ctl" stop -D "$PGDATA" -m "$mode" -w -t "$wait"; then
        echo "postgresql stopped ($mode shutdown)"
        exit 0
    fi
    server_pid >/dev/null || { echo "postgresql stopped"; exit 0; }
    echo "postgresql stop: $mode shutdown did not end within $wait s" >&2
done
# The agent kills what is left in the module's cgroup after this script anyway.
kill -KILL "$pid" 2>/dev/null || true
echo "postgresql stop: killed the postmaster (pid $pid)" >&2
exit 1
