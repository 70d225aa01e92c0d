#!/bin/sh
# Start the demo application in the background; return once it answers /health.
#
# Environment (all optional):
#   TANDEM_DEMO_DIR  the module directory            (default /srv/tandem-demo)
#   DATA_DIR         where records.log lives         (default $TANDEM_DEMO_DIR/data)
#   RUN_DIR          pidfile and log, node-local     (default $TANDEM_DEMO_DIR/run)
#   PORT, BIND       where it listens                (default 8080, 0.0.0.0)
#   PYTHON           the interpreter                 (default python3)
# Only DATA_DIR needs to be replicated; RUN_DIR is per node.
set -eu

DEMO_DIR="${TANDEM_DEMO_DIR:-/srv/tandem-demo}"
DATA_DIR="${DATA_DIR:-$DEMO_DIR/data}"
RUN_DIR="${RUN_DIR:-$DEMO_DIR/run}"
PORT="${PORT:-8080}"
BIND="${BIND:-0.0.0.0}"
PYTHON="${PYTHON:-python3}"
NODE="${TANDEM_NODE:-local}"
PIDFILE="$RUN_DIR/app-$NODE-$PORT.pid"
LOGFILE="$RUN_DIR/app-$NODE-$PORT.log"
APP="$(cd "$(dirname "$0")" && pwd)/app.py"

if [ "$BIND" = "0.0.0.0" ]; then HOST=127.0.0.1; else HOST="$BIND"; fi

# A pid from the pidfile is ours only if it runs app.py in this network namespace:
# the pid space is shared by every node of a lab, and the pidfile may be stale.
ours() {
    [ -r "/proc/$1/cmdline" ] || return 1
    [ "$(readlink "/proc/$1/ns/net" 2>/dev/null)" = "$(readlink /proc/self/ns/net)" ] || return 1
    tr '\0' ' ' <"/proc/$1/cmdline" | grep -q -- "$APP"
}

healthy() {
    "$PYTHON" - "$HOST" "$PORT" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://{sys.argv[1]}:{sys.argv[2]}/health", timeout=1) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError:
    sys.exit(1)
PY
}

mkdir -p "$DATA_DIR" "$RUN_DIR"
if [ -f "$PIDFILE" ] && ours "$(cat "$PIDFILE")"; then
    echo "demo app already running (pid $(cat "$PIDFILE"))"
else
    rm -f "$PIDFILE"
    setsid -f nohup "$PYTHON" "$APP" --data-dir "$DATA_DIR" --port "$PORT" --bind "$BIND" \
        --pidfile "$PIDFILE" >>"$LOGFILE" 2>&1 </dev/null
fi

# Poll for up to 10 s: the app writes its pidfile once the port is bound.
i=0
while [ "$i" -lt 100 ]; do
    if [ -f "$PIDFILE" ] && healthy; then
        echo "demo app answers on $HOST:$PORT (pid $(cat "$PIDFILE"))"
        exit 0
    fi
    i=$((i + 1))
    sleep 0.1
done
echo "demo app did not answer http://$HOST:$PORT/health within 10 s; see $LOGFILE" >&2
tail -n 20 "$LOGFILE" >&2 || true
exit 1
