# Sourced by start.sh and stop.sh (set ACTION first): the settings both use, where the
# PostgreSQL binaries are, and which server is ours. Not meant to be run on its own.

PGDATA="${PGDATA:-/srv/tandem-pg/data}"
PG_USER="${PG_USER:-postgres}"

fail() {
    echo "postgresql $ACTION: $*" >&2
    exit 1
}

if [ -z "${PG_BIN:-}" ]; then
    PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    if [ -z "$PG_BIN" ]; then
        found="$(command -v pg_ctl || true)"
        [ -n "$found" ] || fail "no PostgreSQL binaries found; install PostgreSQL or set PG_BIN"
        PG_BIN="$(dirname "$found")"
    fi
fi
[ -x "$PG_BIN/pg_ctl" ] || fail "$PG_BIN/pg_ctl is not executable; set PG_BIN to PostgreSQL's bin directory"

# The pid in postmaster.pid is a live server only if it is a postgres process of this
# network namespace working in PGDATA: the file may come from the crashed peer (mirrored),
# and the pid may have been reused since.
server_pid() {
    [ -r "$PGDATA/postmaster.pid" ] || return 1
    found="$(head -n 1 "$PGDATA/postmaster.pid" 2>/dev/null || true)"
    case "$found" in '' | *[!0-9]*) return 1 ;; esac
    [ "$(cat "/proc/$found/comm" 2>/dev/null)" = postgres ] || return 1
    [ "$(readlink "/proc/$found/ns/net" 2>/dev/null)" = "$(readlink /proc/self/ns/net)" ] || return 1
    [ "$(readlink "/proc/$found/cwd" 2>/dev/null)" = "$(cd "$PGDATA" && pwd -P)" ] || return 1
    echo "$found"
}

# The server's own working directory is PGDATA; the caller's may be unreadable to PG_USER.
cd /
