"""What the mirror file system needs from replication: ordering, tickets and wait points.

The file system says what it is about to change (`intend`), applies each
mutation locally and enqueues it while holding `ordered()`, so the stream's
order equals the local order; it then waits outside the lock at the point the
operation reached. How long a wait blocks is
the replication mode's business (sync: every op; flush: CLOSE and DURABLE;
async: rarely), not the file system's.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from enum import Enum
from typing import Protocol

from agent.core.mirror_ops import Op


class WaitPoint(Enum):
    """Why the file system waits: a plain mutation, a close, or a durability point."""

    WRITE = "write"
    CLOSE = "close"
    DURABLE = "durable"


class Replicator(Protocol):
    """The contract between MirrorFS and whatever carries its operations to the peer."""

    def ordered(self) -> AbstractContextManager[object]:
        """Held while applying locally and enqueueing, so stream order equals local order (a
        lock: reusable, nothing allocated per mutation on the hot path)."""
        ...

    def intend(self, op: Op, links: int = 1) -> None:
        """Before `op` changes this copy (inside ordered(), then `enqueue` it): what it may
        change is recorded durably where a crash could leave it unknown to the peer. `links`:
        how many names the file has (a data change reaches all of them)."""
        ...

    def enqueue(self, op: Op) -> int:
        """Queue `op` (inside ordered()); returns its ticket, increasing with each op.

        A Write's data may be a view of the FUSE request's buffer, lent until the request
        returns (after its `wait`): a replicator that keeps it longer keeps a copy.
        """
        ...

    def wait(self, ticket: int, point: WaitPoint) -> None:
        """Block as the mode demands (outside ordered()); OSError(EIO) if never acknowledged."""
        ...


class LocalReplicator:
    """No peer at all: ops are dropped, waits return at once (FUSE-alone figures, tests)."""

    def __init__(self) -> None:
        self._ordered = threading.Lock()
        self._seq = 0

    def ordered(self) -> AbstractContextManager[object]:
        return self._ordered

    def intend(self, op: Op, links: int = 1) -> None:
        return None

    def enqueue(self, op: Op) -> int:
        self._seq += 1
        return self._seq

    def wait(self, ticket: int, point: WaitPoint) -> None:
        return None
