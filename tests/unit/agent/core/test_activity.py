"""Activity keys: what an operation in flight may leave on a crashed primary, and how the new
primary's resync gives it back (the keys recorded before its own journal)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import mirror_ops as mo
from agent.core.activity import (
    Kind,
    activity_keys,
    given_back_entries,
    journal_entries,
    moved_ranges,
)
from agent.core.journal_state import OPEN_END, Differs, Dirty, Entry, JournalState, Touched
from agent.core.ranges import RangeSet
from tests.unit.agent.core.test_journal_state import Inode, Key, ModelFS, _draw_op

EXTENT = 16  # small extents, so the model's short files span several


def test_a_write_pins_every_extent_it_touches() -> None:
    keys = activity_keys(mo.Write(1, "db", 4090, b"x" * 10), extent_size=4096)
    assert keys == [(Kind.EXTENT, 1, "db", 0), (Kind.EXTENT, 1, "db", 1)]
    assert activity_keys(mo.Write(0, "db", 0, b""), extent_size=4096) == []


def test_each_kind_of_operation_pins_what_it_may_change() -> None:
    assert activity_keys(mo.Truncate(0, "f", 9000), 4096) == [(Kind.TAIL, 0, "f", 2)]
    collapse = mo.Fallocate(0, "f", 0x08, 8192, 4096)
    assert activity_keys(collapse, 4096) == [(Kind.TAIL, 0, "f", 2)]
    punch = mo.Fallocate(0, "f", 0x03, 4096, 8192)
    assert activity_keys(punch, 4096) == [(Kind.EXTENT, 0, "f", 1), (Kind.EXTENT, 0, "f", 2)]
    assert activity_keys(mo.Chmod(0, "f", 0o600)) == [(Kind.META, 0, "f", 0)]
    assert activity_keys(mo.Rename(0, "a", "b", 0)) == [
        (Kind.NAME, 0, "a", 0),
        (Kind.NAME, 0, "b", 0),
    ]
    assert activity_keys(mo.Create(0, "n", 0o644, 0, 0)) == [(Kind.NAME, 0, "n", 0)]
    assert activity_keys(mo.Fsync(0, "f", False)) == []


def test_keys_become_journal_entries() -> None:
    keys = [
        (Kind.EXTENT, 0, "f", 2),
        (Kind.TAIL, 0, "g", 1),
        (Kind.META, 1, "h", 0),
        (Kind.NAME, 0, "d", 0),
    ]
    assert journal_entries(keys, 4096) == [
        Dirty(0, "f", 8192, 12288),
        Dirty(0, "g", 4096, OPEN_END),
        Touched(0, "g", meta=False),
        Touched(1, "h", meta=True),
        Differs(0, "d"),
    ]


def _apply(fs: ModelFS, op: mo.Op) -> None:
    """As the target's applier during a resync: an operation on a name it lacks is skipped."""
    with contextlib.suppress(KeyError, IndexError):
        fs.apply(op)


def _copy_at(peer: ModelFS, end: ModelFS, key: Key) -> None:
    """A comparison by hashes of `key` and its subtree: the peer ends with `end`'s entries."""
    for k in [key, *peer.below(key)]:
        peer.names.pop(k, None)
    for k in [key, *end.below(key)]:
        if k in end.names:
            peer._new(k, _clone(end, k))


def _clone(fs: ModelFS, key: Key) -> Inode:
    node = fs.node(key)
    return Inode(node.kind, bytearray(node.data), dict(node.meta))


@st.composite
def crashes(
    draw: st.DrawFn,
) -> tuple[ModelFS, ModelFS, ModelFS, JournalState, list[Entry], list[mo.Op]]:
    """A crashed primary's copy, the new primary's base and end, and the journal it sends
    from: in-flight operations the old primary applied (the new one got a prefix of them),
    then the new primary's own session."""
    start = ModelFS()
    for _ in range(draw(st.integers(0, 12))):
        start.apply(_draw_op(draw, start, links=False))
    ahead = start.copy()  # the crashed primary with every operation it had begun
    in_flight = []
    for _ in range(draw(st.integers(1, 4))):
        op = _draw_op(draw, ahead, links=False)
        ahead.apply(op)
        in_flight.append(op)
    # A write is sent before it is made locally: the last one may have reached the peer and
    # not the crashed copy. The peer got a prefix of them, or all.
    crashed = start.copy()
    for op in in_flight[: len(in_flight) - draw(st.integers(0, 1))]:
        crashed.apply(op)
    got = draw(st.integers(0, len(in_flight)))
    base = start.copy()
    for op in in_flight[:got]:
        base.apply(op)
    end = base.copy()
    own = JournalState()
    session = []
    for _ in range(draw(st.integers(0, 20))):
        op = _draw_op(draw, end, links=False)
        end.apply(op)
        own.record(op)
        session.append(op)
    # As Journal.adopt builds it: the peer's keys first, then the journal's compacted entries.
    given_back = journal_entries([k for op in in_flight for k in activity_keys(op, EXTENT)], EXTENT)
    state = JournalState()
    for entry in [*given_back, *own.entries()]:
        state.record(entry)
    return crashed, base, end, state, given_back, session


@settings(max_examples=300, deadline=None)
@given(crashes())
def test_the_resync_gives_back_every_change_a_crashed_primary_made_in_flight(
    case: tuple[ModelFS, ModelFS, ModelFS, JournalState, list[Entry], list[mo.Op]],
) -> None:
    crashed, _base, end, state, given_back, session = case
    # The resync sends the new primary's own ranges exactly and compares the peer's, moved by
    # its renames, by digests: together they hold every range of the combined journal.
    own = JournalState()
    for op in session:
        own.record(op)
    own_plan = own.replay_plan()
    moved = moved_ranges(given_back, own_plan.namespace)
    for key, spans in state.replay_plan().ranges.items():
        both = RangeSet([*own_plan.ranges.get(key, RangeSet()), *moved.get(key, [])])
        assert all(both.covers(s, e) for s, e in spans), f"{key}: {spans} not all sent"
    peer = crashed.copy()
    namespace, ranges, metadata = state.replay_plan()
    for op in namespace:
        _apply(peer, op)
    for key, spans in ranges.items():
        if end.kind(key) == "file" and peer.kind(key) == "file":
            current = end.node(key).data
            for s, e in spans:
                if current[s:e]:
                    peer.apply(mo.Write(key[0], key[1], s, bytes(current[s:e])))
            peer.apply(mo.Truncate(key[0], key[1], len(current)))
            peer.node(key).meta = dict(end.node(key).meta)
    for key in metadata:
        if key in end.names and key in peer.names:
            peer.node(key).meta = dict(end.node(key).meta)
    for key in sorted(state.compare_names()):
        _copy_at(peer, end, key)
    assert peer.canonical()[0] == end.canonical()[0]


def test_a_shrink_in_flight_is_given_back_whole() -> None:
    state = JournalState()
    for entry in journal_entries(activity_keys(mo.Truncate(0, "f", 20), EXTENT), EXTENT):
        state.record(entry)
    _namespace, ranges, _metadata = state.replay_plan()
    # The new primary never got the shrink: everything it holds past byte 16 is sent back.
    assert list(ranges[(0, "f")]) == [(16, OPEN_END)]


GOOD = {"type": "activity", "usable": True, "extent": 4096, "keys": [[1, 0, "db", 2]]}


def test_a_returning_peers_keys_become_entries() -> None:
    assert given_back_entries(GOOD, roots=1) == [Dirty(0, "db", 8192, 12288)]


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        ({"usable": False, "reason": "written alone"}, "not usable: written alone"),
        ({**GOOD, "extent": 12}, "malformed"),
        ({**GOOD, "keys": "db"}, "malformed"),
        ({**GOOD, "keys": [[9, 0, "db", 0]]}, "bad key"),  # no such kind
        ({**GOOD, "keys": [[1, 1, "db", 0]]}, "bad key"),  # a directory the module lacks
        ({**GOOD, "keys": [[1, -1, "db", 0]]}, "bad key"),
        ({**GOOD, "keys": [[1, 0, "../etc/passwd", 0]]}, "bad key"),
        ({**GOOD, "keys": [[1, 0, "/etc/passwd", 0]]}, "bad key"),
        ({**GOOD, "keys": [[1, 0, "a//b", 0]]}, "bad key"),
        ({**GOOD, "keys": [[1, 0, "db", 1 << 60]]}, "bad key"),  # past any file
        ({**GOOD, "keys": [[1, 0, "db"]]}, "bad key"),
    ],
)
def test_a_malformed_answer_is_refused_with_its_reason(
    answer: dict[str, object], says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        given_back_entries(answer, roots=1)
