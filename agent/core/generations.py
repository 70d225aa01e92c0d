"""Data generation ids, as DRBD keeps them: which copy is newer is decided from data, not guessed.

Each node keeps, per module, a `current` generation id, a `bitmap` id (the
generation it was in when it last lost its peer while serving, i.e. the base its
change journal is relative to) and a short `history` of older ids. A node that
starts serving without its peer opens a new generation; a resync makes the
target adopt the source's generations. On reconnect, comparing the two sets
tells: in sync, an incremental resync (the journal since the shared base
suffices) in one direction, a full resync in one direction, or a split brain
(both moved on from a shared base, or nothing shared at all).

Pure: new ids are passed in (the caller draws them at random), nothing is stored
here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Literal

EMPTY = 0  # no data history yet (a new cluster)
HISTORY_LENGTH = 4


class SyncVerdict(StrEnum):
    """What two nodes' generations say when they meet."""

    FIRST_START = "first_start"  # neither has history: the preferred node is the source
    IN_SYNC = "in_sync"
    INCREMENTAL_FROM_LOCAL = "incremental_from_local"
    INCREMENTAL_FROM_PEER = "incremental_from_peer"
    FULL_FROM_LOCAL = "full_from_local"
    FULL_FROM_PEER = "full_from_peer"
    SPLIT_BRAIN = "split_brain"  # both wrote since a shared generation
    UNRELATED = "unrelated"  # no shared generation at all: a split brain with no base


@dataclass(frozen=True)
class Generations:
    """One node's generation ids for one module."""

    current: int = EMPTY
    bitmap: int = EMPTY
    history: tuple[int, ...] = ()

    @property
    def is_empty(self) -> bool:
        return self.current == EMPTY

    def serving_alone(self, new_id: int) -> Generations:
        """This node starts serving without its peer: a new generation begins.

        The bitmap keeps the oldest base the peer may still be at, so several
        sessions alone in a row still resync incrementally from that base.
        """
        if new_id in (EMPTY, self.current):
            raise ValueError("a new generation needs a fresh non-zero id")
        bitmap = self.bitmap if self.bitmap != EMPTY else self.current
        history = self.history
        if self.bitmap != EMPTY and self.current != EMPTY:
            history = _push(history, self.current)
        return Generations(new_id, bitmap, history)

    def after_resync_as_source(self) -> Generations:
        """The peer now holds everything: the journal's base becomes history."""
        if self.bitmap == EMPTY:
            return self
        return Generations(self.current, EMPTY, _push(self.history, self.bitmap))

    def after_resync_as_target(self, source: Generations) -> Generations:
        """This node now holds exactly the source's data, so it takes its generations."""
        return replace(source.after_resync_as_source())

    def ancestors(self) -> frozenset[int]:
        """Every id this node's data descends from (its own current excluded)."""
        ids = {self.bitmap, *self.history} - {EMPTY}
        return frozenset(ids)


def _push(history: tuple[int, ...], generation: int) -> tuple[int, ...]:
    if generation == EMPTY or (history and history[0] == generation):
        return history
    return (generation, *history)[:HISTORY_LENGTH]


def compare(local: Generations, peer: Generations) -> SyncVerdict:
    """What to do when this node (`local`) meets its peer."""
    if local.is_empty and peer.is_empty:
        return SyncVerdict.FIRST_START
    if local.current == peer.current:
        return SyncVerdict.IN_SYNC
    if peer.is_empty:
        return SyncVerdict.FULL_FROM_LOCAL
    if local.is_empty:
        return SyncVerdict.FULL_FROM_PEER
    if local.bitmap != EMPTY and local.bitmap == peer.current:
        return SyncVerdict.INCREMENTAL_FROM_LOCAL
    if peer.bitmap != EMPTY and peer.bitmap == local.current:
        return SyncVerdict.INCREMENTAL_FROM_PEER
    if local.bitmap != EMPTY and local.bitmap == peer.bitmap:
        return SyncVerdict.SPLIT_BRAIN
    local_moved_on = peer.current in local.ancestors()
    peer_moved_on = local.current in peer.ancestors()
    if local_moved_on and not peer_moved_on and peer.bitmap == EMPTY:
        return SyncVerdict.FULL_FROM_LOCAL
    if peer_moved_on and not local_moved_on and local.bitmap == EMPTY:
        return SyncVerdict.FULL_FROM_PEER
    shared = (local.ancestors() | {local.current}) & (peer.ancestors() | {peer.current})
    return SyncVerdict.SPLIT_BRAIN if shared else SyncVerdict.UNRELATED


Resync = Literal["none", "incremental", "full"]


@dataclass(frozen=True)
class ConnectPlan:
    """How a primary starts mirroring to the peer it meets, or why it does not yet."""

    resync: Resync | None  # None: do not connect now
    quarantine: bool = False  # the peer's differing files are kept aside before the resync
    problem: str | None = None  # said in status when it does not connect
    activity: bool = False  # the peer's activity log adds what it may hold that we lack


def plan_connect(
    verdict: SyncVerdict,
    *,
    peer_empty: bool,
    here_pristine: bool,
    peer_pristine: bool,
    kept_here: bool,
    peer_covered: bool = False,
) -> ConnectPlan:
    """A primary meeting its peer: which resync, and whether the peer's files are quarantined.

    `*_pristine`: nothing changed that node's copy outside the mirror since its generation
    began (a crash while primary, a module stopped there, a step-down all may have), so its
    generation alone describes it. `kept_here`: an administrator or a split-brain policy
    chose this node's data. `peer_covered`: the peer is not pristine only because it crashed
    while primary, and its activity log names every place it may differ.
    """
    if verdict in (SyncVerdict.INCREMENTAL_FROM_PEER, SyncVerdict.FULL_FROM_PEER):
        return ConnectPlan(None, problem="the peer has newer data than this primary")
    if verdict in (SyncVerdict.SPLIT_BRAIN, SyncVerdict.UNRELATED):
        # Reported by the split-brain observer; nothing moves until one side is chosen.
        return ConnectPlan("full", quarantine=True) if kept_here else ConnectPlan(None)
    # Files found on a never-synced peer are kept, not lost.
    if verdict is SyncVerdict.IN_SYNC:
        return ConnectPlan("none", quarantine=peer_empty)
    if verdict is SyncVerdict.INCREMENTAL_FROM_LOCAL and here_pristine:
        if peer_pristine:
            return ConnectPlan("incremental", quarantine=peer_empty)
        if peer_covered:
            return ConnectPlan("incremental", quarantine=peer_empty, activity=True)
    return ConnectPlan("full", quarantine=peer_empty)


@dataclass(frozen=True)
class SplitSide:
    """What one node of a split brain tells about itself (its heartbeat's fields)."""

    node: str
    primary_since: float  # wall-clock time it last became primary; 0: unknown
    changes: int  # paths it changed since the split; -1: unknown (journal incomplete)


def policy_keeps(policy: str, here: SplitSide, peer: SplitSide) -> str | None:
    """The node whose data an automatic split-brain policy keeps; None: leave it to
    `tandemctl resolve` (the policy is manual, a figure is unknown, or it is a tie)."""
    if policy == "discard-younger-primary":
        # The node that became primary first served the clients longest: keep it.
        if not here.primary_since or not peer.primary_since:
            return None
        if here.primary_since == peer.primary_since:
            return None
        return here.node if here.primary_since < peer.primary_since else peer.node
    if policy == "discard-least-changes":
        if here.changes < 0 or peer.changes < 0 or here.changes == peer.changes:
            return None
        return here.node if here.changes > peer.changes else peer.node
    return None
