"""SQLite in the state directory: the event log and the state that survives restarts."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    node TEXT NOT NULL,
    module TEXT,
    kind TEXT NOT NULL,
    state TEXT,
    reason TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_module ON events(module, id);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Event:
    """One line of the event log."""

    id: int
    ts: float
    node: str
    module: str | None
    kind: str
    state: str | None
    reason: str
    detail: dict[str, Any] | None


class Store:
    """The node's persistent memory: events (with a retention limit) and key/values.

    Writes are synchronous and small; the event log is what operators read after
    an incident, so a transition is on disk before the daemon acts on it.
    """

    def __init__(self, path: Path, node: str, retention: int = 20_000) -> None:
        self.path = path
        self.node = node
        self.retention = retention
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit never waits for fsync. The decision loop writes here,
        # and an fsync stuck behind a busy disk would stall heartbeats and fence the node.
        # What must survive a power loss exactly (data generations) gets files of its own.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._inserted = 0

    def close(self) -> None:
        self._db.close()

    def add_event(
        self,
        kind: str,
        reason: str,
        module: str | None = None,
        state: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> Event:
        ts = time.time()
        text = json.dumps(detail) if detail is not None else None
        cur = self._db.execute(
            "INSERT INTO events(ts, node, module, kind, state, reason, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (ts, self.node, module, kind, state, reason, text),
        )
        self._inserted += 1
        if self._inserted % 500 == 0:
            self._trim()
        event_id = cur.lastrowid
        assert event_id is not None
        return Event(event_id, ts, self.node, module, kind, state, reason, detail)

    def _trim(self) -> None:
        self._db.execute(
            "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?", (self.retention,)
        )

    def events(self, module: str | None = None, after: int = 0, limit: int = 200) -> list[Event]:
        """Events after id `after`, oldest first; the last `limit` when `after` is 0."""
        where = "id > ?"
        args: list[Any] = [after]
        if module is not None:
            where += " AND (module = ? OR module IS NULL)"
            args.append(module)
        if after == 0:
            inner = f"SELECT * FROM events WHERE {where} ORDER BY id DESC LIMIT ?"
            sql = f"SELECT * FROM ({inner}) ORDER BY id"
        else:
            sql = f"SELECT * FROM events WHERE {where} ORDER BY id LIMIT ?"
        rows = self._db.execute(sql, [*args, limit]).fetchall()
        return [
            Event(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]) if r[7] else None)
            for r in rows
        ]

    def get(self, key: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else default

    def put(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO kv(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )
