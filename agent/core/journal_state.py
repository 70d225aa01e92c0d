"""What changed while a primary ran alone: the state the change journal rebuilds and replays.

Mirrored operations are applied in order. What the resync needs from them:
- the namespace operations (create, mkdir, unlink, rmdir, rename, link,
  symlink, mknod), in order, replayed first on the peer;
- per file, the byte ranges whose CURRENT data it must send (a RangeSet, so a
  hot range costs one interval), then a truncate to the current size and the
  file's metadata;
- the names whose metadata alone changed.

Ranges and flags belong to a file, not a name: a rename moves them (a
directory's rename moves everything below it), a hard link made while alone
shares them, an unlink forgets the name and the file when no name is left.
Hard links that existed before the journal started are not known here (the
pure state sees names only): a write through one name followed by the unlink
of that name loses the range for the other name; a full resync by hashes
covers that case.

A file shrunk while alone (truncate, COLLAPSE_RANGE) may grow again, leaving
zeros where the peer still holds old bytes: the plan therefore truncates such a
file to the smallest size it had, after the namespace operations and before
its ranges are sent, which makes every byte past that size either a zero or a
dirty range.

`record` says whether the state changed, so the journal writes a durable
record only then. `entries` gives a short list of entries that rebuilds an
equivalent state (what compaction writes). Pure: no I/O. Not thread-safe: the
caller serialises `record` and `replay_plan`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from agent.core.mirror_ops import (
    Chmod,
    Chown,
    Create,
    Fallocate,
    Fsync,
    Link,
    Mkdir,
    Mknod,
    Op,
    OpError,
    RemoveXattr,
    Rename,
    Rmdir,
    SetXattr,
    Symlink,
    Truncate,
    Unlink,
    Utimens,
    Write,
    decode_op,
    encode_op,
    paths_of,
)
from agent.core.ranges import RangeSet

Key = tuple[int, str]  # (index of the replicated directory, path relative to it)

# A range "to the end of the file" (COLLAPSE/INSERT_RANGE shift every byte past the offset):
# reading it stops at the end of the file.
OPEN_END = 1 << 62

RENAME_EXCHANGE = 2
FALLOC_KEEP_SIZE = 0x01
FALLOC_PUNCH_HOLE = 0x02
FALLOC_COLLAPSE_RANGE = 0x08
FALLOC_ZERO_RANGE = 0x10
FALLOC_INSERT_RANGE = 0x20

_NAMESPACE = (Create, Mkdir, Unlink, Rmdir, Rename, Link, Symlink, Mknod)
_METADATA = (Chmod, Chown, Utimens, SetXattr, RemoveXattr)
_MADE = {Create: Unlink, Symlink: Unlink, Mknod: Unlink, Mkdir: Rmdir}
_DIRTY = struct.Struct(">qqqH")
_TOUCHED = struct.Struct(">q?H")
_DIFFERS = struct.Struct(">qH")


@dataclass(frozen=True, slots=True)
class Dirty:
    """Bytes [start, end) of a file changed: what a Write leaves in the journal (no data)."""

    code: ClassVar[int] = 0x81
    root: int
    path: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Touched:
    """A file's metadata (`meta`) or size (not `meta`) changed; compaction writes these."""

    code: ClassVar[int] = 0x82
    root: int
    path: str
    meta: bool


@dataclass(frozen=True, slots=True)
class Differs:
    """What exists at this name may differ from the peer's (an operation on it was in flight
    when a primary crashed): compared by block hashes, with its subtree, after the replay."""

    code: ClassVar[int] = 0x83
    root: int
    path: str


Entry = Op | Dirty | Touched | Differs


class ReplayPlan(NamedTuple):
    """What an incremental resync sends, in this order."""

    namespace: list[Op]
    ranges: dict[Key, RangeSet]
    metadata: list[Key]


class _File:
    """What changed in one file (or directory, symlink...), shared by all its known names."""

    __slots__ = ("meta", "names", "ranges", "shrunk", "sized")

    def __init__(self) -> None:
        self.names: set[Key] = set()
        self.ranges = RangeSet()
        self.meta = False
        self.sized = False
        self.shrunk: int | None = None


class JournalState:
    """Dirty ranges, namespace log and metadata-dirty files, fed the mirrored ops in order."""

    def __init__(self) -> None:
        self.namespace: list[Op] = []
        self._files: dict[Key, _File] = {}
        self._below: dict[Key, int] = {}  # how many tracked names lie under each directory
        self.differs: set[Key] = set()  # names to compare by hashes (see Differs)

    # --- feeding ----------------------------------------------------------------------------

    def record(self, entry: Entry) -> bool:
        """Apply one op (or journal entry); False when it changed nothing (no record needed)."""
        if isinstance(entry, Write):
            end = entry.offset + len(entry.data)
            return self._dirty((entry.root, entry.path), entry.offset, end)
        if isinstance(entry, Dirty):
            return self._dirty((entry.root, entry.path), entry.start, entry.end)
        if isinstance(entry, Differs):
            key = (entry.root, entry.path)
            if key in self.differs:
                return False
            self.differs.add(key)
            return True
        if isinstance(entry, Touched):
            file = self._file((entry.root, entry.path))
            if entry.meta:
                return _set_meta(file)
            return _set_sized(file)
        if isinstance(entry, Truncate):
            return self._truncate((entry.root, entry.path), entry.size)
        if isinstance(entry, Fallocate):
            return self._fallocate(entry)
        if isinstance(entry, _METADATA):
            return _set_meta(self._file((entry.root, entry.path)))
        if isinstance(entry, Fsync):
            return False
        self._namespace_op(entry)
        return True

    def _dirty(self, key: Key, start: int, end: int) -> bool:
        if start >= end:
            return False
        return self._file(key).ranges.add(start, end)

    def _truncate(self, key: Key, size: int) -> bool:
        file = self._file(key)
        changed = file.ranges.discard_from(size)
        changed = _set_sized(file) or changed
        if file.shrunk is None or size < file.shrunk:
            file.shrunk = size
            changed = True
        return changed

    def _fallocate(self, op: Fallocate) -> bool:
        key = (op.root, op.path)
        if op.mode & (FALLOC_COLLAPSE_RANGE | FALLOC_INSERT_RANGE):
            # Every byte past the offset moved: resend them all, and cut the peer's copy there.
            changed = self._truncate(key, op.offset)
            return self._dirty(key, op.offset, OPEN_END) or changed
        if op.mode & (FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE):
            changed = self._dirty(key, op.offset, op.offset + op.length)
            if not op.mode & FALLOC_KEEP_SIZE:
                changed = _set_sized(self._file(key)) or changed
            return changed
        if op.mode & FALLOC_KEEP_SIZE:
            return False  # space reserved, no byte or size visible to a reader changed
        return _set_sized(self._file(key))

    def _namespace_op(self, op: Op) -> None:
        key = (op.root, op.path)
        if isinstance(op, Create):
            file = self._files.get(key)
            if file is not None:
                file.ranges.discard_from(0)  # O_TRUNC on the existing file
        elif isinstance(op, Unlink | Rmdir):
            file = self._files.get(key)
            alone = file is None or len(file.names) == 1
            for name in self._subtree(key):
                self._drop(name)
            # Made then removed with nothing between: the removal alone ends the same (the
            # peer's applier takes the removal of a missing name as done), unless another
            # name of the file saw what the making did (a Create on an existing file).
            while alone and self.namespace and _made_here(self.namespace[-1], op):
                self.namespace.pop()
        elif isinstance(op, Rename):
            self._rename(op)
        elif isinstance(op, Link):
            file = self._file(key)
            new = (op.root, op.new_path)
            if new in self._files:
                self._drop(new)
            self._add(new, file)
        self.namespace.append(op)

    def _rename(self, op: Rename) -> None:
        old, new = (op.root, op.path), (op.root, op.new_path)
        if old == new:
            return
        if op.flags & RENAME_EXCHANGE:
            first = [(name, self._files[name]) for name in self._subtree(old)]
            second = [(name, self._files[name]) for name in self._subtree(new)]
            for name, _ in first + second:
                self._drop(name)
            for name, file in first:
                self._add(_moved(name, old, new), file)
            for name, file in second:
                self._add(_moved(name, new, old), file)
            return
        source = self._files.get(old)
        if source is not None and source is self._files.get(new):
            return  # two links to one file: rename(2) does nothing
        for name in self._subtree(new):
            self._drop(name)
        moving = [(name, self._files[name]) for name in self._subtree(old)]
        for name, _ in moving:
            self._drop(name)
        for name, file in moving:
            self._add(_moved(name, old, new), file)

    # --- names ------------------------------------------------------------------------------

    def _file(self, key: Key) -> _File:
        file = self._files.get(key)
        if file is None:
            file = _File()
            self._add(key, file)
        return file

    def _add(self, key: Key, file: _File) -> None:
        self._files[key] = file
        file.names.add(key)
        for parent in _parents(key):
            self._below[parent] = self._below.get(parent, 0) + 1

    def _drop(self, key: Key) -> None:
        file = self._files.pop(key)
        file.names.discard(key)
        for parent in _parents(key):
            left = self._below[parent] - 1
            if left:
                self._below[parent] = left
            else:
                del self._below[parent]

    def _subtree(self, key: Key) -> list[Key]:
        """Tracked names at `key` or below it (a scan only when something lies below)."""
        names = [key] if key in self._files else []
        if self._below.get(key):
            root, path = key
            prefix = path + "/"
            names += [n for n in self._files if n[0] == root and n[1].startswith(prefix)]
        return names

    # --- reading ----------------------------------------------------------------------------

    def _distinct(self) -> Iterator[tuple[Key, _File]]:
        """Each tracked file once, under its smallest name, in name order (a stable plan)."""
        seen: set[int] = set()
        distinct: list[tuple[Key, _File]] = []
        for file in list(self._files.values()):
            if id(file) not in seen:
                seen.add(id(file))
                distinct.append((min(file.names), file))
        distinct.sort(key=lambda item: item[0])
        return iter(distinct)

    def replay_plan(self) -> ReplayPlan:
        """Namespace ops then truncates to the smallest sizes; ranges by file; metadata-only names.

        The resync sends, for each file of `ranges`, the current bytes of its ranges, a
        truncate to its current size and its metadata; `metadata` lists the files whose
        metadata alone changed. Everything returned is a copy.
        """
        namespace = list(self.namespace)
        ranges: dict[Key, RangeSet] = {}
        metadata: list[Key] = []
        for key, file in self._distinct():
            if file.shrunk is not None:
                namespace.append(Truncate(key[0], key[1], file.shrunk))
            if file.ranges or file.sized:
                ranges[key] = file.ranges.copy()
            elif file.meta:
                metadata.append(key)
        return ReplayPlan(namespace, ranges, metadata)

    def entries(self) -> list[Entry]:
        """A short list of entries that, recorded into an empty state, rebuilds this one."""
        out: list[Entry] = [Differs(root, path) for root, path in sorted(self.differs)]
        out.extend(self.namespace)
        for (root, path), file in self._distinct():
            if file.shrunk is not None:
                out.append(Truncate(root, path, file.shrunk))
            elif file.sized:
                out.append(Touched(root, path, meta=False))
            out.extend(Dirty(root, path, start, end) for start, end in file.ranges)
            if file.meta:
                out.append(Touched(root, path, meta=True))
        return out

    def names(self) -> set[Key]:
        """Every name this state knows changed: each namespace operation's paths and each
        tracked file's names. What differs from the peer lies at these names (or below them)."""
        out: set[Key] = set(self._files) | self.differs
        for op in self.namespace:
            out.update(_op_keys(op))
        return out

    def name_count(self, key: Key) -> int:
        """How many names of the file at `key` this state knows (1 when it tracks none)."""
        file = self._files.get(key)
        return len(file.names) if file is not None else 1

    def compare_names(self) -> set[Key]:
        """What a resync compares by hashes after the replay: each Differs name, and every name
        of a namespace operation that touched one (at, above or below it: a rename may have
        moved what differs there, or replaced the directory holding it), until none is left."""
        tainted = set(self.differs)
        above = {a for key in tainted for a in _self_and_parents(key)}
        changed = bool(tainted)
        while changed:
            changed = False
            for op in self.namespace:
                keys = _op_keys(op)
                if any(k in above or any(p in tainted for p in _self_and_parents(k)) for k in keys):
                    for key in keys:
                        if key not in tainted:
                            tainted.add(key)
                            above.update(_self_and_parents(key))
                            changed = True
        return tainted

    @property
    def empty(self) -> bool:
        plan = self.replay_plan()
        return not (plan.namespace or plan.ranges or plan.metadata or self.differs)

    @property
    def bytes_estimate(self) -> int:
        """Roughly the memory this state holds (CPython object sizes), for the journal's bound."""
        total = sum(120 + sum(len(p) for p in paths_of(op)) for op in self.namespace)
        total += sum(160 + len(path) for _, path in self._files)
        total += sum(250 + 64 * len(file.ranges) for _, file in self._distinct())
        return total + 100 * len(self._below)


def _made_here(last: Op, removal: Op) -> bool:
    return _MADE.get(type(last)) is type(removal) and (last.root, last.path) == (
        removal.root,
        removal.path,
    )


def _set_meta(file: _File) -> bool:
    if file.meta:
        return False
    file.meta = True
    return True


def _set_sized(file: _File) -> bool:
    if file.sized:
        return False
    file.sized = True
    return True


def _parents(key: Key) -> Iterator[Key]:
    root, path = key
    while "/" in path:
        path = path.rpartition("/")[0]
        yield (root, path)


def _moved(name: Key, old: Key, new: Key) -> Key:
    return (new[0], new[1] + name[1][len(old[1]) :])


def _op_keys(op: Op) -> list[Key]:
    return [(op.root, path) for path in paths_of(op)]


def _self_and_parents(key: Key) -> Iterator[Key]:
    yield key
    yield from _parents(key)


# --- the journal's record payloads ---------------------------------------------------------


def encode_entry(entry: Entry) -> bytes:
    """An entry as bytes; a Write is stored as the Dirty range it leaves (its data never is)."""
    if isinstance(entry, Write):
        end = entry.offset + len(entry.data)
        entry = Dirty(entry.root, entry.path, entry.offset, end)
    if isinstance(entry, Dirty):
        raw = entry.path.encode("utf-8", "surrogateescape")
        head = _DIRTY.pack(entry.root, entry.start, entry.end, len(raw))
        return bytes((Dirty.code,)) + head + raw
    if isinstance(entry, Touched):
        raw = entry.path.encode("utf-8", "surrogateescape")
        return bytes((Touched.code,)) + _TOUCHED.pack(entry.root, entry.meta, len(raw)) + raw
    if isinstance(entry, Differs):
        raw = entry.path.encode("utf-8", "surrogateescape")
        return bytes((Differs.code,)) + _DIFFERS.pack(entry.root, len(raw)) + raw
    return encode_op(entry)


def decode_entry(raw: bytes | memoryview) -> Entry:
    """The entry `encode_entry` made; OpError if the bytes are not one."""
    view = memoryview(raw)
    if not view:
        raise OpError("empty journal entry")
    if view[0] == Dirty.code:
        root, start, end, size = _unpack(_DIRTY, view, "Dirty")
        path = _path(view, 1 + _DIRTY.size, size, "Dirty")
        if not 0 <= start <= end:
            raise OpError(f"Dirty: [{start}, {end}) is not a byte range")
        return Dirty(root, path, start, end)
    if view[0] == Touched.code:
        root, meta, size = _unpack(_TOUCHED, view, "Touched")
        return Touched(root, _path(view, 1 + _TOUCHED.size, size, "Touched"), bool(meta))
    if view[0] == Differs.code:
        root, size = _unpack(_DIFFERS, view, "Differs")
        return Differs(root, _path(view, 1 + _DIFFERS.size, size, "Differs"))
    return decode_op(view)


def _unpack(layout: struct.Struct, view: memoryview, what: str) -> tuple[int, ...]:
    try:
        return tuple(layout.unpack_from(view, 1))
    except struct.error:
        raise OpError(f"{what}: truncated") from None


def _path(view: memoryview, pos: int, size: int, what: str) -> str:
    if pos + size != len(view):
        raise OpError(f"{what}: path of {size} bytes does not fill the entry")
    return bytes(view[pos:]).decode("utf-8", "surrogateescape")
