"""Where the local agent's API socket lives, and how `tandemctl` finds it (⚑ contract)."""

from __future__ import annotations

import os
from pathlib import Path

SOCKET_DIR_ENV = "TANDEM_SOCKET_DIR"


def socket_dir() -> Path:
    """`/run/tandem`, unless $TANDEM_SOCKET_DIR says otherwise (tests, non-root trials)."""
    return Path(os.environ.get(SOCKET_DIR_ENV, "/run/tandem"))


def default_socket_path(node: str) -> Path:
    return socket_dir() / f"{node}.sock"


class SocketNotFound(Exception):
    """No socket, or several and no way to choose: the message says what to pass."""

    def __init__(self, message: str, usage: bool) -> None:
        super().__init__(message)
        self.usage = usage


def find_socket(socket: str | None, node: str | None) -> Path:
    """`--socket`, else `--node`/$TANDEM_NODE, else the only socket there is."""
    if socket:
        return Path(socket)
    node = node or os.environ.get("TANDEM_NODE")
    if node:
        return default_socket_path(node)
    directory = socket_dir()
    found = sorted(directory.glob("*.sock")) if directory.is_dir() else []
    if not found:
        raise SocketNotFound(
            f"no agent socket in {directory}: is tandem-agent running on this server? "
            "(or pass --socket PATH)",
            usage=False,
        )
    if len(found) > 1:
        names = ", ".join(p.stem for p in found)
        raise SocketNotFound(
            f"several agents run here ({names}): choose one with --node NAME or --socket PATH",
            usage=True,
        )
    return found[0]
