"""Demo application: a tiny HTTP service that appends numbered, fsynced records to a file.

It is what the demo makes highly available: every acknowledged record must survive a
failover, and numbering continues on the new primary from what the replicated file holds.

    python3 app.py --data-dir DIR [--port 8080] [--bind 0.0.0.0] [--pidfile FILE]

POST /records   body = the record's text; answers {"seq": n, "node": ...} once it is on disk
GET  /records   answers {"count": n, "last": {...} | null, "node": ...}
GET  /health    answers 200 {"status": "ok", "node": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

RECORDS_FILE = "records.log"
MAX_BODY = 64 * 1024


class RecordStore:
    """The records file: one JSON object per line, numbered from 1 without gaps."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / RECORDS_FILE
        self._lock = threading.Lock()
        data_dir.mkdir(parents=True, exist_ok=True)
        self._count, self._last = self._load()

    def _load(self) -> tuple[int, dict[str, Any] | None]:
        """Read the file; a torn last line (never acknowledged) is cut off so appends stay valid."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return 0, None
        end = raw.rfind(b"\n") + 1
        if end != len(raw):
            with self.path.open("r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        count = 0
        last: dict[str, Any] | None = None
        for number, line in enumerate(raw[:end].splitlines(), start=1):
            try:
                record = json.loads(line)
            except ValueError:
                raise SystemExit(
                    f"{self.path}:{number}: not a record line; fix or move the file"
                ) from None
            if not isinstance(record, dict) or record.get("seq") != count + 1:
                raise SystemExit(
                    f"{self.path}:{number}: expected record number {count + 1}; "
                    "the file was edited by hand, fix or move it"
                )
            count, last = count + 1, record
        return count, last

    def append(self, text: str, node: str | None) -> int:
        """Append one record and return its number once the file is fsynced."""
        with self._lock:
            seq = self._count + 1
            record = {"seq": seq, "time": time.time(), "node": node, "data": text}
            created = not self.path.exists()
            with self.path.open("ab") as f:
                f.write(json.dumps(record).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            if created:  # the new name must be durable too, not only the bytes
                dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            self._count, self._last = seq, record
            return seq

    def summary(self) -> tuple[int, dict[str, Any] | None]:
        """The number of records and the last one."""
        with self._lock:
            return self._count, self._last


class Handler(BaseHTTPRequestHandler):
    """Serves /records and /health for the store held by the server."""

    server: DemoServer
    protocol_version = "HTTP/1.1"

    def _reply(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        payload["node"] = self.server.node
        body = json.dumps(payload).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(HTTPStatus.OK, {"status": "ok"})
        elif self.path == "/records":
            count, last = self.server.store.summary()
            self._reply(HTTPStatus.OK, {"count": count, "last": last})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}"})

    def do_POST(self) -> None:
        if self.path != "/records":
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": f"Content-Length must be 0..{MAX_BODY}"})
            return
        text = self.rfile.read(length).decode("utf-8", "replace")
        try:
            seq = self.server.store.append(text, self.server.node)
        except OSError as exc:
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"cannot store: {exc}"})
            return
        self._reply(HTTPStatus.OK, {"seq": seq})

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: a request log line per record would drown the demo's output."""


class DemoServer(ThreadingHTTPServer):
    """A threaded HTTP server holding the record store and the serving node's name."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], store: RecordStore, node: str | None) -> None:
        super().__init__(address, Handler)
        self.store = store
        self.node = node


def _write_pidfile(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(path)


def _remove_own_pidfile(path: Path) -> None:
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tandem HA demo application")
    parser.add_argument("--data-dir", type=Path, required=True, help="where records.log lives")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--pidfile", type=Path, help="written once the port is bound")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port}: choose a port between 1 and 65535")
    try:
        store = RecordStore(args.data_dir)
        server = DemoServer((args.bind, args.port), store, os.environ.get("TANDEM_NODE"))
    except OSError as exc:
        print(f"demo app: cannot start: {exc}", file=sys.stderr)
        return 1

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever, which runs in this thread: ask from another.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.pidfile is not None:
        _write_pidfile(args.pidfile)
    count, _ = store.summary()
    print(f"demo app: serving {args.bind}:{args.port}, {count} record(s) in {store.path}")
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        if args.pidfile is not None:
            _remove_own_pidfile(args.pidfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
