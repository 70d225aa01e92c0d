"""Replication operations survive encoding exactly; garbage only ever gives OpError."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.mirror_ops import (
    MAX_PATH_BYTES,
    OP_TYPES,
    Fsync,
    Link,
    Op,
    OpError,
    Rename,
    Write,
    decode_op,
    durable,
    encode_op,
    encode_op_parts,
    paths_of,
    payload_bytes,
    split_write,
)

# Any Linux file name: arbitrary bytes but NUL and "/", carried as surrogateescape text.
names = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b and b"/" not in b)
paths = st.lists(names, min_size=0, max_size=4).map(
    lambda parts: b"/".join(parts).decode("utf-8", "surrogateescape")
)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def op_strategy(op_type: type[Op]) -> st.SearchStrategy[Op]:
    fields = {}
    for f in dataclasses.fields(op_type):
        data = st.binary(max_size=300)
        kind = {"bool": st.booleans(), "int": int64, "str": paths, "bytes": data, "Buffer": data}
        fields[f.name] = kind[str(f.type)]
    return st.builds(op_type, **fields)


any_op = st.one_of(*(op_strategy(t) for t in OP_TYPES))


@given(any_op)
def test_every_operation_round_trips(op: Op) -> None:
    assert decode_op(encode_op(op)) == op


@given(any_op)
def test_the_parts_of_an_operation_are_its_encoding_and_data_is_lent_not_copied(op: Op) -> None:
    parts = encode_op_parts(op)
    assert b"".join(parts) == encode_op(op)
    if isinstance(op, Write):
        assert any(part is op.data for part in parts)
    raw = bytearray(encode_op(op))
    borrowed = decode_op(memoryview(raw), borrow=True)
    assert borrowed == op
    if isinstance(borrowed, Write) and isinstance(op, Write) and borrowed.data:
        # A view of the frame: valid while the frame is, which is why the receiver applies
        # an operation before it reads the next frame.
        raw[-2] ^= 0xFF
        assert borrowed.data != op.data


@given(st.binary(max_size=200))
def test_garbage_is_an_op_error_never_a_crash(raw: bytes) -> None:
    with contextlib.suppress(OpError):
        decode_op(raw)


@given(any_op, st.data())
def test_a_truncated_or_extended_operation_is_refused(op: Op, data: st.DataObject) -> None:
    raw = encode_op(op)
    cut = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    with pytest.raises(OpError):
        decode_op(raw[:cut])
    with pytest.raises(OpError, match="trailing"):
        decode_op(raw + b"\0")


def test_an_over_long_path_is_refused() -> None:
    raw = bytearray(encode_op(Fsync(0, "x" * 10)))
    raw[1 + 8 : 1 + 8 + 2] = (MAX_PATH_BYTES + 1).to_bytes(2, "big")
    with pytest.raises(OpError, match="not a valid string"):
        decode_op(bytes(raw))


def test_odd_file_names_keep_their_bytes() -> None:
    name = b"caf\xe9-\xff\xfe.txt".decode("utf-8", "surrogateescape")
    op = decode_op(encode_op(Write(0, f"dir/{name}", 0, b"x")))
    assert isinstance(op, Write)
    assert op.path.encode("utf-8", "surrogateescape") == b"dir/caf\xe9-\xff\xfe.txt"


def test_what_the_sender_needs_to_know_of_an_operation() -> None:
    assert durable(Fsync(0, "a")) and durable(Write(0, "a", 0, b"x", sync=True))
    assert not durable(Write(0, "a", 0, b"x"))
    assert paths_of(Rename(0, "a", "b")) == ("a", "b") == paths_of(Link(0, "a", "b"))
    assert payload_bytes(Write(0, "a", 0, b"xyz")) == 3 and payload_bytes(Fsync(0, "a")) == 0


@given(st.binary(max_size=3000), st.integers(0, 2**40), st.booleans(), st.integers(1, 700))
def test_a_write_split_into_frames_covers_it_exactly_and_is_durable_with_its_last(
    data: bytes, offset: int, sync: bool, limit: int
) -> None:
    pieces = split_write(0, "f", offset, data, sync, limit)
    assert b"".join(bytes(p.data) for p in pieces) == data
    assert all(0 < len(p.data) <= limit for p in pieces) or data == b""
    assert [p.offset for p in pieces] == [offset + i * limit for i in range(len(pieces))]
    assert [p.sync for p in pieces] == [False] * (len(pieces) - 1) + [sync]
