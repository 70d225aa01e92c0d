#!/bin/sh
# Start PostgreSQL on a replicated data directory; return once it accepts connections.
#
# The agent runs this on the node that becomes primary, in the module's cgroup, with its
# own environment plus TANDEM_MODULE and TANDEM_NODE. On the very first start (no
# PG_VERSION in PGDATA) the cluster is created with initdb; after a failover the server
# finds the mirrored data of a crashed primary and runs its usual crash recovery.
#
# Environment (all optional):
#   PGDATA            the data directory, inside a replicated directory
#                                                           (default /srv/tandem-pg/data)
#   PG_RUN_DIR        unix socket and server log: node-local, never replicated
#                                                           (default /run/tandem-pg)
#   PG_PORT           TCP port                              (default 5432)
#   PG_LISTEN         listen_addresses; '*' also works before the VIP is up (default *)
#   PG_USER           the OS user running the server        (default postgres)
#   PG_BIN            where initdb/pg_ctl/postgres live (default: the newest
#                     /usr/lib/postgresql/*/bin, else the directory of pg_ctl on PATH)
#   PG_START_TIMEOUT  seconds to wait for connections, crash recovery included;
#                     keep it below the module's service.start_timeout  (default 100)
#   PG_HBA_NETWORK    first start only: clients allowed over TCP   (default samenet)
#   PG_HBA_AUTH       first start only: their authentication method
#                                                           (default scram-sha-256)
#   PG_INITDB_OPTS    first start only: more initdb options, e.g. "--data-checksums"
set -eu

ACTION=start
. "$(dirname "$0")/common.sh"
PG_RUN_DIR="${PG_RUN_DIR:-/run/tandem-pg}"
PG_PORT="${PG_PORT:-5432}"
PG_LISTEN="${PG_LISTEN:-*}"
PG_START_TIMEOUT="${PG_START_TIMEOUT:-100}"
PG_HBA_NETWORK="${PG_HBA_NETWORK:-samenet}"
PG_HBA_AUTH="${PG_HBA_AUTH:-scram-sha-256}"
PG_INITDB_OPTS="${PG_INITDB_OPTS:-}"
LOGFILE="$PG_RUN_DIR/postgresql.log"
id "$PG_USER" >/dev/null 2>&1 || fail "no OS user $PG_USER; create it or set PG_USER"

as_pg() {
    runuser -u "$PG_USER" -- "$@"
}

mkdir -p "$PG_RUN_DIR"
chown "$PG_USER:" "$PG_RUN_DIR"
chmod 0755 "$PG_RUN_DIR"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -d "$PGDATA" ] && [ -n "$(ls -A "$PGDATA")" ]; then
        fail "$PGDATA is not empty but holds no PG_VERSION: not a PostgreSQL data directory; move it away or point PGDATA elsewhere"
    fi
    # initdb in a side directory renamed at the end: a crash half way through leaves no
    # half-made cluster at PGDATA for the next start to choke on.
    fresh="$PGDATA.initdb"
    rm -rf "$fresh"
    mkdir -p "$fresh"
    chown "$PG_USER:" "$fresh"
    chmod 0700 "$fresh"
    echo "postgresql start: no cluster in $PGDATA yet; running initdb"
    # shellcheck disable=SC2086
    as_pg "$PG_BIN/initdb" -D "$fresh" --auth-local=peer --auth-host="$PG_HBA_AUTH" \
        $PG_INITDB_OPTS >"$PG_RUN_DIR/initdb.log" 2>&1 \
        || { tail -n 20 "$PG_RUN_DIR/initdb.log" >&2; fail "initdb failed; see $PG_RUN_DIR/initdb.log"; }
    printf '%s\n' "host all all $PG_HBA_NETWORK $PG_HBA_AUTH" >>"$fresh/pg_hba.conf"
    rmdir "$PGDATA" 2>/dev/null || true
    mv "$fresh" "$PGDATA"
fi

# True if a process of this node works in PGDATA: a postmaster, or a backend that outlived
# it (backends run in PGDATA too). Zombies have no working directory and do not count.
busy_in_pgdata() {
    real="$(cd "$PGDATA" && pwd -P)"
    for cwd in $(find /proc/[0-9]*/cwd -maxdepth 0 -lname "$real" 2>/dev/null); do
        [ "$(readlink "${cwd%/cwd}/ns/net" 2>/dev/null)" = "$(readlink /proc/self/ns/net)" ] \
            && return 0
    done
    return 1
}

if pid="$(server_pid)"; then
    echo "postgresql already running (pid $pid)"
else
    # With no process of ours in PGDATA, a postmaster.pid is stale: a crash here, or the
    # peer's, mirrored. PostgreSQL would take its pid for a live postmaster if that pid is
    # in use here by chance (any process of PG_USER, or a zombie not yet reaped) and refuse
    # to start, so it goes. This also skips PostgreSQL's shared-memory check, which the
    # search for live processes in PGDATA stands in for.
    if [ -e "$PGDATA/postmaster.pid" ] && ! busy_in_pgdata; then
        echo "postgresql start: removing a stale postmaster.pid (pid $(head -n 1 "$PGDATA/postmaster.pid"))"
        rm -f "$PGDATA/postmaster.pid"
    fi
    # The same for the socket's lock (node-local) if its pid is no running postgres.
    lock="$PG_RUN_DIR/.s.PGSQL.$PG_PORT.lock"
    if [ -e "$lock" ]; then
        holder="$(head -n 1 "$lock" 2>/dev/null || true)"
        if ! { readlink "/proc/$holder/cwd" >/dev/null 2>&1 \
            && [ "$(cat "/proc/$holder/comm" 2>/dev/null)" = postgres ]; }; then
            echo "postgresql start: removing a stale socket lock (pid $holder)"
            rm -f "$lock" "$PG_RUN_DIR/.s.PGSQL.$PG_PORT"
        fi
    fi
    # listen_addresses is quoted for the shell pg_ctl starts the server through.
    as_pg "$PG_BIN/pg_ctl" start -D "$PGDATA" -l "$LOGFILE" -w -t "$PG_START_TIMEOUT" \
        -o "-c listen_addresses='$PG_LISTEN' -p $PG_PORT -k $PG_RUN_DIR" \
        || { tail -n 30 "$LOGFILE" >&2; fail "the server did not accept connections within ${PG_START_TIMEOUT} s; see $LOGFILE"; }
fi

as_pg "$PG_BIN/pg_isready" -q -h "$PG_RUN_DIR" -p "$PG_PORT" -t 10 \
    || { tail -n 30 "$LOGFILE" >&2; fail "pg_isready: the server does not accept connections; see $LOGFILE"; }
echo "postgresql accepts connections on port $PG_PORT (data $PGDATA)"
