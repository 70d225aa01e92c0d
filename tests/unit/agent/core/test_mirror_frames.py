"""Replication frames: authenticated, in order, and refused with a reason when they are not."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core import mirror_frames as mf

KEY = bytes(range(32))
SESSION = mf.session_key(KEY, b"c" * 16, b"s" * 16)


def split(frame: bytes) -> tuple[bytes, mf.Header, bytes, bytes]:
    header_raw = frame[: mf.HEADER_BYTES]
    header = mf.parse_header(header_raw)
    payload = frame[mf.HEADER_BYTES : mf.HEADER_BYTES + header.length]
    return header_raw, header, payload, frame[mf.HEADER_BYTES + header.length :]


def check(frame: bytes, expected_seq: int, key: bytes = SESSION) -> bytes:
    header_raw, header, payload, mac = split(frame)
    mf.verify(key, header_raw, header, payload, mac, expected_seq)
    return payload


@given(st.binary(max_size=5000), st.integers(min_value=0, max_value=2**64 - 1))
def test_a_frame_verifies_with_its_key_and_sequence(payload: bytes, seq: int) -> None:
    frame = mf.encode(SESSION, mf.FrameKind.OP, seq, payload)
    assert check(frame, seq) == payload


@given(st.binary(min_size=1, max_size=300), st.data())
def test_any_flipped_bit_is_detected(payload: bytes, data: st.DataObject) -> None:
    frame = bytearray(mf.encode(SESSION, mf.FrameKind.OP, 7, payload))
    position = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
    frame[position] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
    with pytest.raises(mf.StreamError):
        check(bytes(frame), 7)


def test_another_sessions_frame_is_refused_as_forged() -> None:
    other = mf.session_key(KEY, b"c" * 16, b"t" * 16)
    frame = mf.encode(other, mf.FrameKind.OP, 1, b"write")
    with pytest.raises(mf.StreamError, match="failed authentication"):
        check(frame, 1)


def test_a_repeated_or_skipped_frame_is_refused() -> None:
    frame = mf.encode(SESSION, mf.FrameKind.OP, 5, b"x")
    with pytest.raises(mf.StreamError, match="out of order"):
        check(frame, 6)


def test_headers_of_another_protocol_are_named() -> None:
    good = mf.encode(SESSION, mf.FrameKind.ACK, 1, b"{}")
    with pytest.raises(mf.StreamError, match="bad magic"):
        mf.parse_header(b"XX" + good[2 : mf.HEADER_BYTES])
    with pytest.raises(mf.StreamError, match="protocol 9"):
        mf.parse_header(good[:2] + bytes([9]) + good[3 : mf.HEADER_BYTES])
    with pytest.raises(mf.StreamError, match="unknown frame kind"):
        mf.parse_header(good[:3] + bytes([99]) + good[4 : mf.HEADER_BYTES])
    with pytest.raises(mf.StreamError, match="truncated"):
        mf.parse_header(good[:5])
    huge = mf.HEADER.pack(mf.MAGIC, mf.MIRROR_PROTOCOL, 2, 1, mf.MAX_PAYLOAD + 1)
    with pytest.raises(mf.StreamError, match="exceeds"):
        mf.parse_header(huge)


def test_session_keys_depend_on_both_nonces_and_the_cluster_key() -> None:
    a, b = os.urandom(16), os.urandom(16)
    keys = {
        mf.session_key(KEY, a, b),
        mf.session_key(KEY, b, a),
        mf.session_key(bytes(32), a, b),
        mf.base_key(KEY),
    }
    assert len(keys) == 4


def test_control_payloads_must_be_json_objects() -> None:
    assert mf.decode_json(mf.encode_json({"n": 3})) == {"n": 3}
    for bad in (b"[1]", b"{", b"\xff"):
        with pytest.raises(mf.StreamError):
            mf.decode_json(bad)
