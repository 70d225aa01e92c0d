"""The datagram codec: round trips, forgery, version mismatch, malformed bodies, replays."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.frames import (
    MAX_DATAGRAM,
    PROTOCOL_VERSION,
    Frame,
    FrameError,
    Heartbeat,
    Kind,
    LeaseItem,
    LeaseReply,
    LeaseRequest,
    ReplayGuard,
    Verdict,
    decode,
    decode_any,
    encode,
)

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


def signed(body: bytes, kind: int = Kind.HEARTBEAT, version: int = PROTOCOL_VERSION) -> bytes:
    """A frame built by hand, so tests can sign bodies encode() would never produce."""
    data = struct.pack(">4sHB", b"TDM1", version, kind) + body
    return data + hmac.new(KEY, data, hashlib.sha256).digest()


def heartbeat(**changes: Any) -> Heartbeat:
    base: dict[str, Any] = {
        "cluster": "shop",
        "node": "node1",
        "incarnation": 1_732_000_000_123_456_789,
        "seq": 7,
        "link": 1,
        "config_hash": "ab" * 32,
        "payload": {"modules": {"web": {"state": "PRIM"}}},
    }
    base.update(changes)
    return Heartbeat(**base)


names = st.text(min_size=1, max_size=40)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
actions = st.sampled_from(["acquire", "renew", "release"])
frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(
        Heartbeat,
        names,
        names,
        st.integers(0, 2**64),
        st.integers(0, 2**64),
        st.integers(0, 7),
        st.text(max_size=64),
        st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    ),
    st.builds(
        LeaseRequest,
        names,
        names,
        st.integers(0, 2**64),
        st.integers(0, 2**64),
        st.floats(0.001, 3600),
        st.lists(st.builds(LeaseItem, names, actions), max_size=5).map(tuple),
    ),
    st.builds(
        LeaseReply,
        names,
        names,
        st.integers(0, 2**64),
        st.integers(0, 2**64),
        st.lists(
            st.builds(
                Verdict,
                names,
                st.booleans(),
                st.none() | names,
                st.floats(0, 3600).map(lambda f: round(f, 3)),
                st.text(max_size=60),
            ),
            max_size=5,
        ).map(tuple),
    ),
)


@given(frames)
def test_every_frame_survives_a_round_trip(frame: Frame) -> None:
    assert decode(KEY, encode(KEY, frame)) == frame


def test_header_is_magic_version_kind() -> None:
    data = encode(KEY, heartbeat())
    assert data[:4] == b"TDM1"
    assert struct.unpack(">HB", data[4:7]) == (PROTOCOL_VERSION, Kind.HEARTBEAT)
    assert data[-32:] == hmac.new(KEY, data[:-32], hashlib.sha256).digest()


def test_a_frame_signed_with_another_key_is_forged() -> None:
    with pytest.raises(FrameError) as err:
        decode(KEY, encode(OTHER, heartbeat()))
    assert err.value.kind == "forged"


@pytest.mark.parametrize("position", [4, 7, 20, -40, -1])
def test_any_changed_byte_is_forged(position: int) -> None:
    data = bytearray(encode(KEY, heartbeat()))
    data[position] ^= 0x01
    with pytest.raises(FrameError) as err:
        decode(KEY, bytes(data))
    assert err.value.kind == "forged"


@pytest.mark.parametrize("data", [b"", b"TDM1", b"HTTP/1.1 200 OK" + bytes(40), bytes(100)])
def test_what_is_not_a_frame_is_malformed(data: bytes) -> None:
    with pytest.raises(FrameError) as err:
        decode(KEY, data)
    assert err.value.kind == "malformed"


def test_another_protocol_version_is_reported_with_its_number() -> None:
    body = encode(KEY, heartbeat())[7:-32]
    with pytest.raises(FrameError) as err:
        decode(KEY, signed(body, version=PROTOCOL_VERSION + 1))
    assert err.value.kind == "version"
    assert f"version {PROTOCOL_VERSION + 1}" in err.value.reason
    assert f"speaks {PROTOCOL_VERSION}" in err.value.reason


def test_a_forged_frame_of_another_version_is_forged_not_version() -> None:
    data = bytearray(signed(b"{}", version=9))
    data[-1] ^= 0xFF
    with pytest.raises(FrameError) as err:
        decode(KEY, bytes(data))
    assert err.value.kind == "forged"


GOOD_HEARTBEAT = {"c": "shop", "n": "node1", "i": 1, "s": 1, "l": 0, "h": "x", "p": {}}


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        (Kind.HEARTBEAT, b"not json"),
        (Kind.HEARTBEAT, b"[1, 2]"),
        (Kind.HEARTBEAT, b"\xff\xfe"),
        (Kind.HEARTBEAT, json.dumps({**GOOD_HEARTBEAT, "s": True}).encode()),
        (Kind.HEARTBEAT, json.dumps({**GOOD_HEARTBEAT, "s": -1}).encode()),
        (Kind.HEARTBEAT, json.dumps({**GOOD_HEARTBEAT, "s": 1.5}).encode()),
        (Kind.HEARTBEAT, json.dumps({**GOOD_HEARTBEAT, "n": ""}).encode()),
        (Kind.HEARTBEAT, json.dumps({**GOOD_HEARTBEAT, "p": []}).encode()),
        (
            Kind.HEARTBEAT,
            json.dumps({k: v for k, v in GOOD_HEARTBEAT.items() if k != "h"}).encode(),
        ),
        (Kind.HEARTBEAT, b"[" * 100_000),
        (Kind.LEASE_REQUEST, b'{"c":"a","n":"b","i":1,"s":1,"d":NaN,"m":[]}'),
        (Kind.LEASE_REQUEST, b'{"c":"a","n":"b","i":1,"s":1,"d":0,"m":[]}'),
        (Kind.LEASE_REQUEST, b'{"c":"a","n":"b","i":1,"s":1,"d":1,"m":[["web","steal"]]}'),
        (Kind.LEASE_REQUEST, b'{"c":"a","n":"b","i":1,"s":1,"d":1,"m":[["web"]]}'),
        (Kind.LEASE_REPLY, b'{"c":"a","n":"b","i":1,"s":1,"v":[["web",1,null,1.0,"r"]]}'),
        (Kind.LEASE_REPLY, b'{"c":"a","n":"b","i":1,"s":1,"v":[["web",true,null,"1","r"]]}'),
        (9, json.dumps(GOOD_HEARTBEAT).encode()),
    ],
)
def test_authentic_but_malformed_bodies_are_malformed(kind: int, body: bytes) -> None:
    with pytest.raises(FrameError) as err:
        decode(KEY, signed(body, kind=kind))
    assert err.value.kind == "malformed"


@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_frame_error(data: bytes) -> None:
    with pytest.raises(FrameError):
        decode(KEY, data)


@given(st.binary(max_size=300), st.sampled_from(list(Kind)))
def test_random_signed_bodies_decode_or_raise_frame_error(body: bytes, kind: Kind) -> None:
    try:
        decode(KEY, signed(body, kind=kind))
    except FrameError as exc:
        assert exc.kind == "malformed"


def test_decode_any_names_the_key_that_authenticated() -> None:
    data = encode(OTHER, heartbeat())
    decoded = decode_any([KEY, OTHER], data)
    assert decoded.key == OTHER
    assert decoded.frame == heartbeat()
    with pytest.raises(FrameError) as err:
        decode_any([KEY], data)
    assert err.value.kind == "forged"


def test_a_cluster_of_32_modules_fits_the_datagram_budget() -> None:
    modules = [f"module-with-a-long-name-{i:02d}" for i in range(32)]
    payload = {
        "modules": {
            name: {
                "state": "SECOND",
                "data": "UP_TO_DATE",
                "generation": "0123456789abcdef",
                "resync": {"done_bytes": 2**40, "total_bytes": 2**41},
                "stopped": False,
            }
            for name in modules
        },
        "progress": 123456789,
    }
    beat = encode(KEY, heartbeat(payload=payload))
    request = encode(
        KEY,
        LeaseRequest(
            "shop", "node1", 2**62, 2**40, 1.5, tuple(LeaseItem(m, "renew") for m in modules)
        ),
    )
    reply = encode(
        KEY,
        LeaseReply(
            "shop",
            "node1",
            2**62,
            2**40,
            tuple(
                Verdict(m, False, "node2", 1.234, "lease held by node2 for another 1.2 s")
                for m in modules
            ),
        ),
    )
    assert max(len(beat), len(request), len(reply)) < MAX_DATAGRAM


def test_a_payload_that_is_not_json_is_refused_at_encode() -> None:
    with pytest.raises(ValueError, match="Out of range"):
        encode(KEY, heartbeat(payload={"x": float("nan")}))
    with pytest.raises(TypeError):
        encode(KEY, heartbeat(payload={"x": object()}))


class TestReplayGuard:
    def test_sequence_must_grow_per_sender_and_channel(self) -> None:
        guard = ReplayGuard()
        assert guard.check("node1", 0, 5, 1)
        assert guard.check("node1", 0, 5, 2)
        assert not guard.check("node1", 0, 5, 2)
        assert not guard.check("node1", 0, 5, 1)
        assert guard.check("node1", 0, 5, 10)  # gaps are losses, not attacks
        assert guard.check("node1", 1, 5, 2)  # the same seq on another link is its own copy
        assert guard.check("node2", 0, 5, 1)
        assert guard.replayed == 2

    def test_a_newer_incarnation_restarts_the_sequence(self) -> None:
        guard = ReplayGuard()
        assert guard.check("node1", 0, 5, 100)
        assert guard.check("node1", 0, 6, 1)
        assert not guard.check("node1", 0, 5, 101)  # the old incarnation is gone for good
        assert not guard.check("node1", 0, 6, 1)
        assert guard.replayed == 2

    def test_forget(self) -> None:
        guard = ReplayGuard()
        assert guard.check("node1", 0, 5, 100)
        guard.forget("node1")
        assert guard.check("node1", 0, 1, 1)

    @given(
        st.lists(
            st.tuples(
                st.sampled_from("ab"), st.integers(0, 1), st.integers(0, 3), st.integers(0, 6)
            )
        )
    )
    def test_accepted_frames_are_strictly_increasing_per_channel(
        self, frames: list[tuple[str, int, int, int]]
    ) -> None:
        guard = ReplayGuard()
        accepted: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for sender, channel, incarnation, seq in frames:
            if guard.check(sender, channel, incarnation, seq):
                accepted.setdefault((sender, channel), []).append((incarnation, seq))
        for history in accepted.values():
            assert history == sorted(set(history))
        assert guard.replayed == len(frames) - sum(map(len, accepted.values()))
