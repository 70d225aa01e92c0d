#!/bin/sh
# Stop the demo application started by start.sh: SIGTERM, wait up to 10 s, then SIGKILL.
# Uses the same environment variables as start.sh.
set -eu

DEMO_DIR="${TANDEM_DEMO_DIR:-/srv/tandem-demo}"
RUN_DIR="${RUN_DIR:-$DEMO_DIR/run}"
PORT="${PORT:-8080}"
NODE="${TANDEM_NODE:-local}"
PIDFILE="$RUN_DIR/app-$NODE-$PORT.pid"
APP="$(cd "$(dirname "$0")" && pwd)/app.py"

# See start.sh: never signal a pid that is not our app in this network namespace.
ours() {
    [ -r "/proc/$1/cmdline" ] || return 1
    [ "$(readlink "/proc/$1/ns/net" 2>/dev/null)" = "$(readlink /proc/self/ns/net)" ] || return 1
    tr '\0' ' ' <"/proc/$1/cmdline" | grep -q -- "$APP"
}

if [ ! -f "$PIDFILE" ]; then
    echo "demo app not running (no $PIDFILE)"
    exit 0
fi
PID="$(cat "$PIDFILE")"
if ! ours "$PID"; then
    echo "demo app not running (stale pidfile $PIDFILE)"
    rm -f "$PIDFILE"
    exit 0
fi
kill -TERM "$PID" 2>/dev/null || true
i=0
while ours "$PID"; do
    if [ "$i" -ge 100 ]; then
        echo "demo app (pid $PID) ignored SIGTERM for 10 s; killing it" >&2
        kill -KILL "$PID" 2>/dev/null || true
        break
    fi
    i=$((i + 1))
    sleep 0.1
done
rm -f "$PIDFILE"
echo "demo app stopped"
