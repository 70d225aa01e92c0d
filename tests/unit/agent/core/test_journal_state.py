"""The journal's replay plan rebuilds the end state from the start state, on a model file system.

A tiny in-memory file system (names → inodes, so hard links, renames of whole
directories and exchanges behave as on Linux) runs random valid operations: a
start state first, then a session "alone" fed to a JournalState. Replaying on a
copy of the start what the resync sends (the namespace operations, then each
dirty range's current bytes read from the end state, a truncate to the end
size and the metadata) must give the end state exactly. The same plan must come
out of the records the journal would write (only those that changed the state,
encoded and decoded) and out of the compacted `entries`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import mirror_ops as mo
from agent.core.journal_state import (
    OPEN_END,
    Dirty,
    Entry,
    JournalState,
    Touched,
    decode_entry,
    encode_entry,
)
from agent.core.ranges import RangeSet

Key = tuple[int, str]
PATHS = ["a", "b", "d", "e", "d/a", "d/b", "d/e", "e/a", "e/d", "d/e/a", "d/e/b"]
KEEP, PUNCH, COLLAPSE, ZERO, INSERT = 0x01, 0x02, 0x08, 0x10, 0x20
FALLOCATE_MODES = [0, KEEP, PUNCH | KEEP, ZERO, ZERO | KEEP, COLLAPSE, INSERT]


@dataclass
class Inode:
    kind: str  # file, dir, symlink, fifo
    data: bytearray = field(default_factory=bytearray)
    meta: dict[str, object] = field(default_factory=dict)


class ModelFS:
    """Names to inodes, with Linux's semantics for the operations the mirror sees."""

    def __init__(self) -> None:
        self.names: dict[Key, int] = {(0, ""): 0, (1, ""): 1}
        self.inodes: dict[int, Inode] = {0: Inode("dir"), 1: Inode("dir")}
        self.next = 2

    def copy(self) -> ModelFS:
        return copy.deepcopy(self)

    def kind(self, key: Key) -> str | None:
        ino = self.names.get(key)
        return None if ino is None else self.inodes[ino].kind

    def node(self, key: Key) -> Inode:
        return self.inodes[self.names[key]]

    def below(self, key: Key) -> list[Key]:
        root, path = key
        return [k for k in self.names if k[0] == root and k[1].startswith(path + "/")]

    def _new(self, key: Key, inode: Inode) -> None:
        self.names[key] = self.next
        self.inodes[self.next] = inode
        self.next += 1

    def apply(self, op: mo.Op) -> None:
        key = (op.root, op.path)
        if isinstance(op, mo.Write):
            data = self.node(key).data
            if len(data) < op.offset:
                data.extend(bytes(op.offset - len(data)))
            data[op.offset : op.offset + len(op.data)] = op.data
        elif isinstance(op, mo.Truncate):
            _resize(self.node(key).data, op.size)
        elif isinstance(op, mo.Fallocate):
            _fallocate(self.node(key).data, op)
        elif isinstance(op, mo.Create):
            meta = {"mode": op.mode, "owner": (op.uid, op.gid)}
            if self.kind(key) == "file":
                self.node(key).data.clear()
                self.node(key).meta.update(meta)
            else:
                self._new(key, Inode("file", meta=meta))
        elif isinstance(op, mo.Mkdir):
            self._new(key, Inode("dir", meta={"mode": op.mode}))
        elif isinstance(op, mo.Symlink):
            self._new(key, Inode("symlink", bytearray(op.target.encode()), {"owner": op.uid}))
        elif isinstance(op, mo.Mknod):
            self._new(key, Inode("fifo", meta={"mode": op.mode}))
        elif isinstance(op, mo.Unlink | mo.Rmdir):
            self.names.pop(key, None)  # as the peer's applier: a missing name is removed already
        elif isinstance(op, mo.Link):
            self.names[(op.root, op.new_path)] = self.names[key]
        elif isinstance(op, mo.Rename):
            self._rename(op)
        elif isinstance(op, mo.Chmod):
            self.node(key).meta["mode"] = op.mode
        elif isinstance(op, mo.Chown):
            self.node(key).meta["owner"] = (op.uid, op.gid)
        elif isinstance(op, mo.Utimens):
            self.node(key).meta["times"] = (op.atime_ns, op.mtime_ns)
        elif isinstance(op, mo.SetXattr):
            self.node(key).meta["x." + op.name] = op.value
        elif isinstance(op, mo.RemoveXattr):
            self.node(key).meta.pop("x." + op.name, None)

    def _rename(self, op: mo.Rename) -> None:
        old, new = (op.root, op.path), (op.root, op.new_path)
        if self.names.get(old) == self.names.get(new):
            return
        first = {k: self.names.pop(k) for k in [old, *self.below(old)]}
        second = {k: self.names.pop(k) for k in [new, *self.below(new)] if k in self.names}
        for k, ino in first.items():
            self.names[(new[0], new[1] + k[1][len(old[1]) :])] = ino
        if op.flags & 2:
            for k, ino in second.items():
                self.names[(old[0], old[1] + k[1][len(new[1]) :])] = ino

    def canonical(self) -> tuple[object, ...]:
        entries = sorted(
            (k, n.kind, bytes(n.data), sorted(n.meta.items(), key=str))
            for k, n in ((k, self.inodes[i]) for k, i in self.names.items())
        )
        groups: dict[int, list[Key]] = {}
        for k, ino in self.names.items():
            groups.setdefault(ino, []).append(k)
        links = sorted(sorted(g) for g in groups.values() if len(g) > 1)
        return (entries, links)


def _resize(data: bytearray, size: int) -> None:
    if size < len(data):
        del data[size:]
    else:
        data.extend(bytes(size - len(data)))


def _fallocate(data: bytearray, op: mo.Fallocate) -> None:
    start, end = op.offset, op.offset + op.length
    if op.mode & COLLAPSE:
        del data[start:end]
    elif op.mode & INSERT:
        data[start:start] = bytes(op.length)
    elif op.mode & (PUNCH | ZERO):
        stop = min(end, len(data)) if op.mode & KEEP else end
        if not op.mode & KEEP and len(data) < end:
            _resize(data, end)
        data[start:stop] = bytes(max(0, stop - start))
    elif not op.mode & KEEP and len(data) < end:
        _resize(data, end)


def _draw_op(draw: st.DrawFn, fs: ModelFS, *, links: bool) -> mo.Op:
    """One operation that succeeds on `fs` as it is (the mirror only records those)."""
    root = draw(st.sampled_from([0, 0, 0, 1]))
    free = [
        p
        for p in PATHS
        if (root, p) not in fs.names and fs.kind((root, p.rpartition("/")[0])) == "dir"
    ]
    files = [p for p in PATHS if fs.kind((root, p)) == "file"]
    present = [p for p in PATHS if (root, p) in fs.names]
    dirs = [p for p in PATHS if fs.kind((root, p)) == "dir"]
    empty_dirs = [p for p in dirs if not fs.below((root, p))]
    choices = ["create", "mkdir"] if free else []
    if files:
        choices += ["write"] * 6 + ["truncate", "truncate", "fallocate", "create", "fsync"]
        choices += ["link"] * links * bool(free) + ["unlink"]
    if present:
        choices += ["meta", "rename", "exchange", "symlink_or_fifo" * bool(free)]
    if empty_dirs:
        choices.append("rmdir")
    kind = draw(st.sampled_from([c for c in choices if c]))
    if kind == "write":
        path = draw(st.sampled_from(files))
        offset = draw(st.integers(0, 48))
        data = draw(st.binary(min_size=1, max_size=24))
        return mo.Write(root, path, offset, data)
    if kind == "truncate":
        return mo.Truncate(root, draw(st.sampled_from(files)), draw(st.integers(0, 64)))
    if kind == "fallocate":
        path = draw(st.sampled_from(files))
        size = len(fs.node((root, path)).data)
        mode = draw(st.sampled_from(FALLOCATE_MODES))
        offset, length = draw(st.integers(0, 48)), draw(st.integers(1, 24))
        if mode == COLLAPSE:
            if size < 2:
                return mo.Fsync(root, path)
            offset = draw(st.integers(0, size - 2))
            length = draw(st.integers(1, size - offset - 1))
        if mode == INSERT:
            offset = draw(st.integers(0, size))
        return mo.Fallocate(root, path, mode, offset, length)
    if kind == "fsync":
        return mo.Fsync(root, draw(st.sampled_from(files)))
    if kind == "create":
        path = draw(st.sampled_from(free + files))
        return mo.Create(root, path, draw(st.sampled_from([0o600, 0o644])), 0, 0)
    if kind == "mkdir":
        return mo.Mkdir(root, draw(st.sampled_from(free)), 0o755, 0, 0)
    if kind == "symlink_or_fifo":
        path = draw(st.sampled_from(free))
        if draw(st.booleans()):
            return mo.Symlink(root, path, draw(st.sampled_from(["a", "../x"])), 0, 0)
        return mo.Mknod(root, path, 0o10644, 0, 0, 0)
    if kind == "link":
        return mo.Link(root, draw(st.sampled_from(files)), draw(st.sampled_from(free)))
    if kind == "unlink":
        links_too = [p for p in present if fs.kind((root, p)) in ("symlink", "fifo")]
        return mo.Unlink(root, draw(st.sampled_from(files + links_too)))
    if kind == "rmdir":
        return mo.Rmdir(root, draw(st.sampled_from(empty_dirs)))
    if kind == "meta":
        path = draw(st.sampled_from(present))
        changes: list[mo.Op] = [
            mo.Chmod(root, path, 0o640),
            mo.Chown(root, path, 7, 8),
            mo.Utimens(root, path, 5, 6),
            mo.SetXattr(root, path, "user.k", b"v"),
            mo.RemoveXattr(root, path, "user.k"),
        ]
        return draw(st.sampled_from(changes))
    return _draw_rename(draw, fs, root, present, free, exchange=kind == "exchange")


def _draw_rename(
    draw: st.DrawFn, fs: ModelFS, root: int, present: list[str], free: list[str], *, exchange: bool
) -> mo.Op:
    old = draw(st.sampled_from(present))
    old_kind = fs.kind((root, old))

    def allowed(new: str) -> bool:
        if new == old or new.startswith(old + "/") or old.startswith(new + "/"):
            return False
        if (root, new) not in fs.names:
            return not exchange
        new_kind = fs.kind((root, new))
        if exchange:
            return True
        if old_kind == "dir":
            return new_kind == "dir" and not fs.below((root, new))
        return new_kind != "dir"

    targets = [p for p in free + present if allowed(p)]
    if not targets:
        return mo.Fsync(root, old)
    return mo.Rename(root, old, draw(st.sampled_from(targets)), 2 if exchange else 0)


@st.composite
def sessions(draw: st.DrawFn) -> tuple[ModelFS, list[mo.Op]]:
    """A start state (built without hard links: the pure state cannot know older ones), then
    the operations of a session alone."""
    fs = ModelFS()
    for _ in range(draw(st.integers(0, 12))):
        fs.apply(_draw_op(draw, fs, links=False))
    start = fs.copy()
    ops = []
    for _ in range(draw(st.integers(1, 30))):
        op = _draw_op(draw, fs, links=True)
        fs.apply(op)
        ops.append(op)
    return start, ops


def _replay(start: ModelFS, end: ModelFS, state: JournalState) -> ModelFS:
    """What the resync does to the peer, done on a copy of the start state."""
    peer = start.copy()
    namespace, ranges, metadata = state.replay_plan()
    for op in namespace:
        peer.apply(op)
    for key, spans in ranges.items():
        if end.kind(key) == "file":
            current = end.node(key).data
            for s, e in spans:
                if current[s:e]:
                    peer.apply(mo.Write(key[0], key[1], s, bytes(current[s:e])))
            peer.apply(mo.Truncate(key[0], key[1], len(current)))
        if key in end.names:
            peer.node(key).meta = dict(end.node(key).meta)
    for key in metadata:
        if key in end.names:
            peer.node(key).meta = dict(end.node(key).meta)
    return peer


@settings(max_examples=200, deadline=None)
@given(sessions())
def test_the_replay_plan_rebuilds_the_end_state_from_the_start(
    session: tuple[ModelFS, list[mo.Op]],
) -> None:
    start, ops = session
    end = start.copy()
    state = JournalState()
    written: list[bytes] = []
    for op in ops:
        end.apply(op)
        before = (state.replay_plan(), state.entries())
        if state.record(op):
            written.append(encode_entry(op))
        else:
            assert (state.replay_plan(), state.entries()) == before, f"{op} changed the state"
    assert _replay(start, end, state).canonical() == end.canonical()

    from_disk = JournalState()
    for raw in written:
        from_disk.record(decode_entry(raw))
    assert from_disk.replay_plan() == state.replay_plan()

    compacted = JournalState()
    for entry in state.entries():
        assert decode_entry(encode_entry(entry)) == entry
        compacted.record(entry)
    assert compacted.replay_plan() == state.replay_plan()
    assert len(compacted.entries()) == len(state.entries())


def _entry(fs: ModelFS, key: Key) -> tuple[object, ...] | None:
    if key not in fs.names:
        return None
    node = fs.node(key)
    return (node.kind, bytes(node.data), sorted(node.meta.items(), key=str))


@settings(max_examples=200, deadline=None)
@given(sessions())
def test_every_name_that_differs_from_the_start_is_one_the_state_names(
    session: tuple[ModelFS, list[mo.Op]],
) -> None:
    """What an interrupted resync resumes from: comparing the state's names (a directory with
    its subtree) by hashes finds every difference the session made."""
    start, ops = session
    end = start.copy()
    state = JournalState()
    for op in ops:
        end.apply(op)
        state.record(op)
    named = state.names()
    linked_before = {k for k in start.names if list(start.names.values()).count(start.names[k]) > 1}

    def covered(key: Key) -> bool:
        root, path = key
        parts = path.split("/") if path else []
        ancestors = {(root, "/".join(parts[:n])) for n in range(len(parts) + 1)}
        return bool(ancestors & named)

    for key in set(start.names) | set(end.names):
        if _entry(start, key) != _entry(end, key) and key not in linked_before and key[1]:
            assert covered(key), f"{key} changed but the state names neither it nor a parent"


def test_a_hot_range_changes_the_state_once() -> None:
    state = JournalState()
    assert state.record(mo.Write(0, "db", 4096, b"x" * 4096))
    for _ in range(100):
        assert not state.record(mo.Write(0, "db", 4096, b"y" * 4096))
    assert not state.record(mo.Write(0, "db", 5000, b"z"))
    assert not state.record(mo.Fsync(0, "db"))
    assert state.record(mo.Chmod(0, "db", 0o600))
    assert not state.record(mo.Utimens(0, "db", 1, 2))
    namespace, ranges, metadata = state.replay_plan()
    assert namespace == []
    assert ranges == {(0, "db"): RangeSet([(4096, 8192)])}
    assert metadata == []  # its metadata is sent with its ranges


def test_a_directory_rename_moves_every_range_below_it() -> None:
    state = JournalState()
    state.record(mo.Write(0, "d/e/f", 0, b"abc"))
    state.record(mo.Write(0, "d/g", 10, b"abc"))
    state.record(mo.Write(0, "dd", 0, b"x"))  # shares a prefix, not a parent
    state.record(mo.Chmod(1, "d/e/f", 0o600))  # another replicated directory
    state.record(mo.Rename(0, "d", "x"))
    _, ranges, metadata = state.replay_plan()
    assert set(ranges) == {(0, "x/e/f"), (0, "x/g"), (0, "dd")}
    assert metadata == [(1, "d/e/f")]


def test_a_temporary_file_leaves_only_its_removal() -> None:
    state = JournalState()
    state.record(mo.Create(0, "tmp", 0o600, 0, 0))
    state.record(mo.Write(0, "tmp", 0, b"scratch"))
    state.record(mo.Unlink(0, "tmp"))
    namespace, ranges, _ = state.replay_plan()
    assert namespace == [mo.Unlink(0, "tmp")]
    assert ranges == {}


def test_a_shrunk_file_is_cut_at_its_smallest_size_before_its_ranges() -> None:
    state = JournalState()
    state.record(mo.Truncate(0, "log", 100))
    state.record(mo.Truncate(0, "log", 10))
    state.record(mo.Write(0, "log", 0, b"z" * 50))
    assert not state.record(mo.Truncate(0, "log", 50))
    namespace, ranges, _ = state.replay_plan()
    assert namespace == [mo.Truncate(0, "log", 10)]
    assert ranges == {(0, "log"): RangeSet([(0, 50)])}


def test_collapse_range_resends_to_the_end_of_the_file() -> None:
    state = JournalState()
    state.record(mo.Fallocate(0, "v", COLLAPSE, 4096, 4096))
    _, ranges, _ = state.replay_plan()
    assert list(ranges[(0, "v")]) == [(4096, OPEN_END)]


def test_a_reservation_changes_no_byte() -> None:
    state = JournalState()
    assert not state.record(mo.Fallocate(0, "f", KEEP, 0, 1 << 30))
    assert state.record(mo.Fallocate(0, "f", 0, 0, 1 << 30))
    assert state.replay_plan().ranges == {(0, "f"): RangeSet()}  # truncated to its size


def test_the_memory_estimate_grows_with_what_is_held() -> None:
    state = JournalState()
    empty = state.bytes_estimate
    for i in range(100):
        state.record(mo.Write(0, f"f{i}", 0, b"x"))
    assert state.bytes_estimate > empty + 100 * 100


@pytest.mark.parametrize(
    "raw",
    [b"", bytes([Dirty.code]), bytes([Dirty.code]) + bytes(26) + b"x", bytes([0xEE])],
)
def test_garbage_is_not_an_entry(raw: bytes) -> None:
    with pytest.raises(mo.OpError):
        decode_entry(raw)


def test_entries_round_trip_through_bytes() -> None:
    samples: list[Entry] = [
        Dirty(1, "a/\udcff", 5, 9),
        Touched(0, "x", meta=True),
        Touched(0, "x", meta=False),
        mo.Rename(0, "a", "b", 2),
    ]
    for entry in samples:
        assert decode_entry(encode_entry(entry)) == entry
    assert decode_entry(encode_entry(mo.Write(0, "w", 3, b"abcd"))) == Dirty(0, "w", 3, 7)
