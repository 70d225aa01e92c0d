"""What an operation may leave on a primary that crashes before its peer has it: activity keys.

DRBD's activity log records, durably and before the first write to it, each
coarse extent a write may touch; a crashed primary that returns knows that only
those extents may hold writes its peer never got. A directory tree needs more
than extents: an operation in flight may also have changed a file's size, its
metadata, or a name. So each operation maps to keys of four kinds:
- EXTENT: bytes [index * extent, (index + 1) * extent) of a file;
- TAIL: every byte of a file from index * extent on (a shrink, a collapse);
- META: a file's metadata (mode, owner, times, xattrs);
- NAME: what exists at a name (created, removed, renamed, linked).

When the returning node becomes the target of a resync, its keys turn into
change-journal entries (extents and tails into dirty ranges, metadata into
metadata-dirty files) recorded BEFORE the new primary's own journal, so its
renames move them like any range; names are compared by block hashes after the
journal's replay. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Any

from agent.core.journal_state import (
    FALLOC_COLLAPSE_RANGE,
    FALLOC_INSERT_RANGE,
    OPEN_END,
    Differs,
    Dirty,
    Entry,
    JournalState,
    Key,
    Touched,
)
from agent.core.mirror_ops import (
    Chmod,
    Chown,
    Fallocate,
    Fsync,
    Op,
    RemoveXattr,
    SetXattr,
    Truncate,
    Utimens,
    Write,
    paths_of,
)

EXTENT_SIZE = 4 << 20


class Kind(IntEnum):
    EXTENT = 1
    TAIL = 2
    META = 3
    NAME = 4


ActivityKey = tuple[int, int, str, int]  # (kind, root, path, index)


def activity_keys(op: Op, extent_size: int = EXTENT_SIZE) -> list[ActivityKey]:
    """The keys `op` may leave changed on this copy before the peer has it."""
    if isinstance(op, Write):
        return _extents(op.root, op.path, op.offset, len(op.data), extent_size)
    if isinstance(op, Truncate):
        return [(Kind.TAIL, op.root, op.path, op.size // extent_size)]
    if isinstance(op, Fallocate):
        if op.mode & (FALLOC_COLLAPSE_RANGE | FALLOC_INSERT_RANGE):
            return [(Kind.TAIL, op.root, op.path, op.offset // extent_size)]
        return _extents(op.root, op.path, op.offset, op.length, extent_size)
    if isinstance(op, Chmod | Chown | Utimens | SetXattr | RemoveXattr):
        return [(Kind.META, op.root, op.path, 0)]
    if isinstance(op, Fsync):
        return []
    return [(Kind.NAME, op.root, path, 0) for path in paths_of(op)]


def _extents(root: int, path: str, offset: int, length: int, size: int) -> list[ActivityKey]:
    if length <= 0:
        return []
    first, last = offset // size, (offset + length - 1) // size
    return [(Kind.EXTENT, root, path, index) for index in range(first, last + 1)]


def journal_entries(keys: Sequence[ActivityKey], extent_size: int) -> list[Entry]:
    """The change-journal entries that stand for `keys` (recorded before the journal's own)."""
    entries: list[Entry] = []
    for kind, root, path, index in keys:
        if kind == Kind.EXTENT:
            entries.append(Dirty(root, path, index * extent_size, (index + 1) * extent_size))
        elif kind == Kind.TAIL:
            entries.append(Dirty(root, path, index * extent_size, OPEN_END))
            entries.append(Touched(root, path, meta=False))
        elif kind == Kind.META:
            entries.append(Touched(root, path, meta=True))
        elif kind == Kind.NAME:
            entries.append(Differs(root, path))
        else:
            raise ValueError(f"unknown activity key kind {kind}")
    return entries


def moved_ranges(
    entries: Sequence[Entry], namespace: Sequence[Op]
) -> dict[Key, list[tuple[int, int]]]:
    """The byte ranges `entries` (a returning peer's keys) name, under the names `namespace`
    (the new primary's journal since) moved them to: what the resync compares by digests, the
    rest of each file being sent exactly as its own journal says."""
    state = JournalState()
    for entry in entries:
        state.record(entry)
    for op in namespace:
        state.record(op)
    return {key: list(spans) for key, spans in state.replay_plan().ranges.items() if spans}


def given_back_entries(answer: dict[str, Any], roots: int) -> list[Entry]:
    """The journal entries for the keys a returning peer sent (its answer to `activity`, for a
    module of `roots` directories); ValueError saying what is wrong when its log cannot be
    used, so the resync compares everything instead."""
    if not answer.get("usable"):
        raise ValueError(f"the peer's activity log is not usable: {answer.get('reason') or '?'}")
    extent, raw = answer.get("extent"), answer.get("keys")
    if not isinstance(extent, int) or extent < 4096 or not isinstance(raw, list):
        raise ValueError("the peer's activity log answer is malformed (extent or keys)")
    keys: list[ActivityKey] = []
    for item in raw:
        if not (
            isinstance(item, list)
            and len(item) == 4
            and item[0] in tuple(Kind)
            and isinstance(item[1], int)
            and 0 <= item[1] < roots
            and isinstance(item[2], str)
            and _plain(item[2])
            and isinstance(item[3], int)
            and 0 <= item[3] * extent < OPEN_END
        ):
            raise ValueError(f"the peer's activity log holds a bad key: {item!r}")
        keys.append((int(item[0]), item[1], item[2], item[3]))
    return journal_entries(keys, extent)


def _plain(path: str) -> bool:
    """A path inside a replicated directory: relative, no '.', '..' or empty component."""
    return (
        bool(path) and "\0" not in path and all(p not in ("", ".", "..") for p in path.split("/"))
    )
