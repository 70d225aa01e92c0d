#!/bin/sh
# Stop the PostgreSQL server that start.sh started: a fast shutdown (clients cut, a
# checkpoint written), then an immediate one (crash recovery at the next start), then
# SIGKILL. Uses the same environment as start.sh, plus:
#   PG_STOP_TIMEOUT  seconds for the fast shutdown; the immediate one gets 10 more, so keep
#                    their sum below the module's service.stop_timeout   (default 15)
set -eu

ACTION=stop
. "$(dirname "$0")/common.sh"
PG_STOP_TIMEOUT="${PG_STOP_TIMEOUT:-15}"

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
