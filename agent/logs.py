"""Structured one-line logs on stderr (journald keeps them): `ts=... level=INFO key=value ...`.

Fields given with log_event (module, node, event, ...) travel in the record's
`fields` attribute, so names that LogRecord reserves (such as `module`) can be
used; any other `extra=` attribute is rendered too.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "fields",
    "taskName",
}
_FIRST = ("component", "node", "module")
_BARE_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@+,%[]")


def _quoted(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped.replace("\r", "\\r").replace("\t", "\\t") + '"'


def _value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if text and set(text) <= _BARE_OK else _quoted(text)


class KeyValueFormatter(logging.Formatter):
    """Renders a record as `ts= level= component= node= module= msg="..." key=value`."""

    def __init__(self, component: str, node: str | None) -> None:
        super().__init__()
        self.component = component
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {"component": self.component}
        if self.node is not None:
            fields["node"] = self.node
        fields.update(getattr(record, "fields", None) or {})
        fields.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        parts = [f"ts={ts.replace('+00:00', 'Z')}", f"level={record.levelname}"]
        parts += [f"{k}={_value(fields.pop(k))}" for k in _FIRST if fields.get(k) is not None]
        parts.append(f"msg={_quoted(record.getMessage())}")
        parts += [f"{k}={_value(v)}" for k, v in fields.items() if v is not None]
        if record.name and record.name != "root":
            parts.append(f"logger={record.name}")
        if record.exc_info:
            parts.append(f"exc={_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup_logging(component: str, node: str | None, level: int = logging.INFO) -> None:
    """Send every log record of this process to stderr as one structured line."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_tandem", False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter(component, node))
    handler._tandem = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)


def log_event(
    logger: logging.Logger, msg: str, *, level: int = logging.INFO, **fields: Any
) -> None:
    """Log `msg` with key=value fields (module=, event=, ...); None values are left out."""
    logger.log(level, msg, extra={"fields": fields})
