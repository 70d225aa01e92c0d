"""The operations a primary mirrors to its secondary, and their byte encoding.

Every mutation the mirror file system sees becomes one of these, applied in
order on the other node. Paths are relative to one replicated directory of the
module (`root` is its index in the module's `directories`), never absolute and
never leaving it; "" names the directory itself. Linux paths are bytes: they
travel as UTF-8 with surrogateescape, so any name round-trips.

The encoding is generic over the dataclass fields (int, bool, str, bytes), so a
new operation needs no codec code. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import struct
import typing
from dataclasses import dataclass
from typing import ClassVar

Buffer = bytes | memoryview
_I64 = struct.Struct(">q")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
MAX_PATH_BYTES = 4096
MAX_DATA_BYTES = 16 << 20


class OpError(ValueError):
    """Bytes that do not decode to an operation (a bug or a corrupted peer)."""


@dataclass(frozen=True, slots=True)
class Write:
    """Bytes written at an offset; `sync`: the application asked for O_SYNC/O_DSYNC."""

    code: ClassVar[int] = 1
    root: int
    path: str
    offset: int
    data: Buffer  # a memoryview while it is only borrowed (the FUSE request, a received frame)
    sync: bool = False


@dataclass(frozen=True, slots=True)
class Truncate:
    code: ClassVar[int] = 2
    root: int
    path: str
    size: int


@dataclass(frozen=True, slots=True)
class Create:
    """A new empty regular file (an existing one is truncated: O_CREAT|O_TRUNC semantics)."""

    code: ClassVar[int] = 3
    root: int
    path: str
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Mkdir:
    code: ClassVar[int] = 4
    root: int
    path: str
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Unlink:
    code: ClassVar[int] = 5
    root: int
    path: str


@dataclass(frozen=True, slots=True)
class Rmdir:
    code: ClassVar[int] = 6
    root: int
    path: str


@dataclass(frozen=True, slots=True)
class Rename:
    """rename(2) within one replicated directory; `flags` are renameat2's (NOREPLACE, EXCHANGE)."""

    code: ClassVar[int] = 7
    root: int
    path: str
    new_path: str
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Link:
    """A hard link `new_path` to the existing `path`."""

    code: ClassVar[int] = 8
    root: int
    path: str
    new_path: str


@dataclass(frozen=True, slots=True)
class Symlink:
    """A symbolic link at `path` whose text is `target` (stored, never followed)."""

    code: ClassVar[int] = 9
    root: int
    path: str
    target: str
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Chmod:
    code: ClassVar[int] = 10
    root: int
    path: str
    mode: int


@dataclass(frozen=True, slots=True)
class Chown:
    """-1 leaves the uid or gid as it is, as in chown(2)."""

    code: ClassVar[int] = 11
    root: int
    path: str
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Utimens:
    """Access and modification times in nanoseconds (symlinks themselves, not followed)."""

    code: ClassVar[int] = 12
    root: int
    path: str
    atime_ns: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class SetXattr:
    code: ClassVar[int] = 13
    root: int
    path: str
    name: str
    value: bytes
    flags: int = 0


@dataclass(frozen=True, slots=True)
class RemoveXattr:
    code: ClassVar[int] = 14
    root: int
    path: str
    name: str


@dataclass(frozen=True, slots=True)
class Fallocate:
    """fallocate(2): `mode` as given (0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE...)."""

    code: ClassVar[int] = 15
    root: int
    path: str
    mode: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Fsync:
    """Make `path` durable on the secondary before the ack (the primary's fsync/fdatasync)."""

    code: ClassVar[int] = 16
    root: int
    path: str
    datasync: bool = False


@dataclass(frozen=True, slots=True)
class Mknod:
    """A FIFO, socket or device node (`rdev` for devices)."""

    code: ClassVar[int] = 17
    root: int
    path: str
    mode: int
    rdev: int
    uid: int
    gid: int


Op = (
    Write
    | Truncate
    | Create
    | Mkdir
    | Unlink
    | Rmdir
    | Rename
    | Link
    | Symlink
    | Chmod
    | Chown
    | Utimens
    | SetXattr
    | RemoveXattr
    | Fallocate
    | Fsync
    | Mknod
)
OP_TYPES: tuple[type[Op], ...] = typing.get_args(Op)
_BY_CODE: dict[int, type[Op]] = {t.code: t for t in OP_TYPES}


def _fields(op_type: type[Op]) -> list[tuple[str, type]]:
    hints = typing.get_type_hints(op_type)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(op_type)]


_FIELDS: dict[type[Op], list[tuple[str, type]]] = {t: _fields(t) for t in OP_TYPES}


def durable(op: Op) -> bool:
    """The secondary must make this operation durable before it acks."""
    return isinstance(op, Fsync) or (isinstance(op, Write) and op.sync)


def split_write(
    root: int, path: str, offset: int, data: Buffer, sync: bool, limit: int
) -> list[Write]:
    """One application write as frames of at most `limit` bytes (at least one, even empty):
    the peer applies each while the next crosses the link. O_SYNC/O_DSYNC (`sync`): durable
    with the last one, which the peer applies after all the others."""
    starts = range(0, max(len(data), 1), limit)
    last = starts[-1]
    return [
        Write(root, path, offset + start, data[start : start + limit], sync and start == last)
        for start in starts
    ]


def paths_of(op: Op) -> tuple[str, ...]:
    """Every path an operation touches (both names of a rename or link)."""
    if isinstance(op, Rename | Link):
        return (op.path, op.new_path)
    return (op.path,)


def payload_bytes(op: Op) -> int:
    """The application data an operation carries (for throughput figures)."""
    return len(op.data) if isinstance(op, Write) else 0


def encode_op(op: Op) -> bytes:
    """The operation as bytes: its code, then each field in declaration order."""
    return b"".join(encode_op_parts(op))


def encode_op_parts(op: Op) -> list[Buffer]:
    """`encode_op` as consecutive parts, each data field a part of its own (never copied):
    a 1 MiB write goes to the socket from the buffer it arrived in."""
    parts: list[Buffer] = []
    head = bytearray((op.code,))
    for name, kind in _FIELDS[type(op)]:
        value = getattr(op, name)
        if kind is bool:
            head.append(1 if value else 0)
        elif kind is int:
            head += _I64.pack(value)
        elif kind is str:
            raw = value.encode("utf-8", "surrogateescape")
            head += _U16.pack(len(raw))
            head += raw
        else:
            head += _U32.pack(len(value))
            parts.append(bytes(head))
            parts.append(value)
            head = bytearray()
    if head:
        parts.append(bytes(head))
    return parts


def decode_op(raw: Buffer, *, borrow: bool = False) -> Op:
    """The operation `encode_op` made; OpError if the bytes are not one.

    `borrow`: data fields are views of `raw` (valid as long as it is), not copies.
    """
    view = memoryview(raw)
    if not view:
        raise OpError("empty operation")
    op_type = _BY_CODE.get(view[0])
    if op_type is None:
        raise OpError(f"unknown operation code {view[0]}")
    pos = 1
    values: dict[str, object] = {}
    try:
        for name, kind in _FIELDS[op_type]:
            if kind is bool:
                values[name] = _flag(view[pos])
                pos += 1
            elif kind is int:
                (values[name],) = _I64.unpack_from(view, pos)
                pos += 8
            elif kind is str:
                (size,) = _U16.unpack_from(view, pos)
                pos += 2
                if size > MAX_PATH_BYTES or pos + size > len(view):
                    raise OpError(f"{op_type.__name__}.{name}: {size} bytes is not a valid string")
                values[name] = bytes(view[pos : pos + size]).decode("utf-8", "surrogateescape")
                pos += size
            else:
                (size,) = _U32.unpack_from(view, pos)
                pos += 4
                if size > MAX_DATA_BYTES or pos + size > len(view):
                    raise OpError(f"{op_type.__name__}.{name}: {size} bytes overruns the frame")
                field = view[pos : pos + size]
                values[name] = field if borrow else bytes(field)
                pos += size
    except (struct.error, IndexError):
        raise OpError(f"{op_type.__name__}: truncated") from None
    if pos != len(view):
        raise OpError(f"{op_type.__name__}: {len(view) - pos} trailing bytes")
    return op_type(**values)  # type: ignore[arg-type]


def _flag(byte: int) -> bool:
    if byte not in (0, 1):
        raise OpError(f"flag byte {byte} is neither 0 nor 1")
    return byte == 1
