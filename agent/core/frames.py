"""Authenticated datagram formats: heartbeats between peers, lease requests and replies.

A frame is a fixed header (magic, protocol version, kind), a JSON body and an
HMAC-SHA256 trailer over everything before it, keyed with the cluster key. The
header layout never changes between versions, so a peer running another
release is recognised and reported instead of being taken for an attacker.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal, NamedTuple, NoReturn

PROTOCOL_VERSION = 1
MAGIC = b"TDM1"
MAC_BYTES = 32
# What the heartbeat of a cluster with 32 modules must fit in (tested); below the
# ~9000-byte jumbo MTU and far below UDP's limit.
MAX_DATAGRAM = 8192
_UDP_LIMIT = 65507
_HEADER = struct.Struct(">4sHB")
_MAX_NAME = 255
_MAX_DURATION = 3600.0

Action = Literal["acquire", "renew", "release"]
_ACTIONS: dict[str, Action] = {"acquire": "acquire", "renew": "renew", "release": "release"}
ErrorKind = Literal["forged", "malformed", "version"]


class Kind(IntEnum):
    """What a frame carries."""

    HEARTBEAT = 1
    LEASE_REQUEST = 2
    LEASE_REPLY = 3


class FrameError(Exception):
    """A datagram that is not a good frame: forged (bad MAC), malformed, or another version."""

    def __init__(self, reason: str, kind: ErrorKind) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind: ErrorKind = kind


@dataclass(frozen=True)
class Heartbeat:
    """One heartbeat, sent on every link with the same seq; `link` is the sender's link index."""

    cluster: str
    node: str
    incarnation: int
    seq: int
    link: int
    config_hash: str
    payload: dict[str, Any] = field(hash=False)


@dataclass(frozen=True)
class LeaseItem:
    """One module's lease operation in a request to the witness.

    `generation`: the requester's current data generation (0: none, or `prim --force`);
    the witness remembers the holder's, so a node whose data is behind is not let in.
    """

    module: str
    action: Action
    generation: int = 0


@dataclass(frozen=True)
class LeaseRequest:
    """A node asking the witness to acquire, renew or release leases for `duration` seconds."""

    cluster: str
    node: str
    incarnation: int
    seq: int
    duration: float
    items: tuple[LeaseItem, ...]


@dataclass(frozen=True)
class Verdict:
    """The witness's answer for one module; expires_in is relative to its decision time."""

    module: str
    granted: bool
    holder: str | None
    expires_in: float
    reason: str
    generation: int = 0  # the data generation the witness last recorded for the module


@dataclass(frozen=True)
class LeaseReply:
    """The witness's answer to a LeaseRequest; node, incarnation and seq echo the request."""

    cluster: str
    node: str
    incarnation: int
    seq: int
    verdicts: tuple[Verdict, ...]


Frame = Heartbeat | LeaseRequest | LeaseReply


class Decoded(NamedTuple):
    """A frame decoded by decode_any, with the key that authenticated it (to sign the reply)."""

    key: bytes
    frame: Frame


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _body(msg: Frame) -> tuple[Kind, dict[str, Any]]:
    if isinstance(msg, Heartbeat):
        return Kind.HEARTBEAT, {
            "c": msg.cluster,
            "n": msg.node,
            "i": msg.incarnation,
            "s": msg.seq,
            "l": msg.link,
            "h": msg.config_hash,
            "p": msg.payload,
        }
    if isinstance(msg, LeaseRequest):
        return Kind.LEASE_REQUEST, {
            "c": msg.cluster,
            "n": msg.node,
            "i": msg.incarnation,
            "s": msg.seq,
            "d": msg.duration,
            "m": [[item.module, item.action, item.generation] for item in msg.items],
        }
    return Kind.LEASE_REPLY, {
        "c": msg.cluster,
        "n": msg.node,
        "i": msg.incarnation,
        "s": msg.seq,
        "v": [
            [v.module, v.granted, v.holder, round(v.expires_in, 3), v.reason, v.generation]
            for v in msg.verdicts
        ],
    }


def encode(key: bytes, msg: Frame) -> bytes:
    """Serialise and sign a frame with the cluster key."""
    kind, body = _body(msg)
    text = json.dumps(body, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    data = _HEADER.pack(MAGIC, PROTOCOL_VERSION, kind) + text.encode("utf-8")
    frame = data + _mac(key, data)
    if len(frame) > _UDP_LIMIT:
        raise ValueError(f"frame of {len(frame)} bytes does not fit in a UDP datagram")
    return frame


def _split(data: bytes) -> tuple[bytes, bytes]:
    if len(data) < _HEADER.size + MAC_BYTES or data[:4] != MAGIC:
        raise FrameError(f"not a Tandem frame ({len(data)} bytes)", "malformed")
    return data[:-MAC_BYTES], data[-MAC_BYTES:]


def _authentic(key: bytes, signed: bytes, mac: bytes) -> bool:
    return hmac.compare_digest(_mac(key, signed), mac)


def decode(key: bytes, data: bytes) -> Frame:
    """Check a datagram's MAC and version and return its frame, or raise FrameError."""
    signed, mac = _split(data)
    if not _authentic(key, signed, mac):
        raise FrameError("bad MAC: not signed with this cluster's key", "forged")
    return _parse(signed)


def decode_any(keys: Sequence[bytes], data: bytes) -> Decoded:
    """Decode with whichever key authenticates the datagram (a witness serves many clusters)."""
    signed, mac = _split(data)
    for key in keys:
        if _authentic(key, signed, mac):
            return Decoded(key, _parse(signed))
    raise FrameError("bad MAC: not signed with any configured key", "forged")


def _parse(signed: bytes) -> Frame:
    _, version, kind = _HEADER.unpack_from(signed)
    if version != PROTOCOL_VERSION:
        raise FrameError(
            f"peer speaks protocol version {version}, this node speaks {PROTOCOL_VERSION}; "
            "run the same Tandem release on every node and the witness",
            "version",
        )
    try:
        body = json.loads(signed[_HEADER.size :].decode("utf-8"), parse_constant=_no_constant)
        if not isinstance(body, dict):
            _bad("body is not an object")
        if kind == Kind.HEARTBEAT:
            return _heartbeat(body)
        if kind == Kind.LEASE_REQUEST:
            return _lease_request(body)
        if kind == Kind.LEASE_REPLY:
            return _lease_reply(body)
        _bad(f"unknown frame kind {kind}")
    except FrameError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        raise FrameError(f"bad body: {exc}", "malformed") from None


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not allowed")


def _bad(why: str) -> NoReturn:
    raise FrameError(why, "malformed")


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_NAME:
        _bad(f"{what} must be a non-empty string")
    return value


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _bad(f"{what} must be a non-negative integer")
    return value


def _seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        _bad(f"{what} must be a number")
    return float(value)


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        _bad(f"{what} must be a list")
    return value


def _heartbeat(body: dict[str, Any]) -> Heartbeat:
    config_hash = body["h"]
    payload = body["p"]
    if not isinstance(config_hash, str):
        _bad("config hash must be a string")
    if not isinstance(payload, dict):
        _bad("payload must be an object")
    return Heartbeat(
        cluster=_name(body["c"], "cluster"),
        node=_name(body["n"], "node"),
        incarnation=_count(body["i"], "incarnation"),
        seq=_count(body["s"], "seq"),
        link=_count(body["l"], "link"),
        config_hash=config_hash,
        payload=payload,
    )


def _lease_request(body: dict[str, Any]) -> LeaseRequest:
    duration = _seconds(body["d"], "duration")
    if not 0 < duration <= _MAX_DURATION:
        _bad(f"duration {duration} s is outside (0, {_MAX_DURATION:g}]")
    items = []
    for entry in _list(body["m"], "items"):
        fields = _list(entry, "item")
        if len(fields) not in (2, 3):
            _bad("a lease item is [module, action, generation]")
        module, action = fields[0], fields[1]
        if not isinstance(action, str) or action not in _ACTIONS:
            _bad(f"unknown lease action {action!r}")
        generation = _count(fields[2], "generation") if len(fields) == 3 else 0
        items.append(LeaseItem(_name(module, "module"), _ACTIONS[action], generation))
    return LeaseRequest(
        cluster=_name(body["c"], "cluster"),
        node=_name(body["n"], "node"),
        incarnation=_count(body["i"], "incarnation"),
        seq=_count(body["s"], "seq"),
        duration=duration,
        items=tuple(items),
    )


def _lease_reply(body: dict[str, Any]) -> LeaseReply:
    verdicts = []
    for entry in _list(body["v"], "verdicts"):
        fields = _list(entry, "verdict")
        if len(fields) not in (5, 6):
            _bad("a verdict is [module, granted, holder, expires_in, reason, generation]")
        module, granted, holder, expires_in, reason = fields[:5]
        generation = _count(fields[5], "generation") if len(fields) == 6 else 0
        if not isinstance(granted, bool):
            _bad("granted must be a boolean")
        if holder is not None:
            holder = _name(holder, "holder")
        if not isinstance(reason, str):
            _bad("reason must be a string")
        verdicts.append(
            Verdict(
                _name(module, "module"),
                granted,
                holder,
                _seconds(expires_in, "expires_in"),
                reason,
                generation,
            )
        )
    return LeaseReply(
        cluster=_name(body["c"], "cluster"),
        node=_name(body["n"], "node"),
        incarnation=_count(body["i"], "incarnation"),
        seq=_count(body["s"], "seq"),
        verdicts=tuple(verdicts),
    )


class ReplayGuard:
    """Rejects replayed frames: seq must grow per (sender, channel) within an incarnation.

    Agents take their start time in nanoseconds as incarnation, so a restarted
    sender has a greater one and starts its sequence again; a smaller
    incarnation is an old capture being replayed.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[str, int], tuple[int, int]] = {}
        self.replayed = 0

    def check(self, sender: str, channel: int, incarnation: int, seq: int) -> bool:
        """True (and remembered) if the frame is new; False (and counted) if it is a replay."""
        last = self._last.get((sender, channel))
        if last is not None and (incarnation, seq) <= last:
            self.replayed += 1
            return False
        self._last[(sender, channel)] = (incarnation, seq)
        return True

    def forget(self, sender: str) -> None:
        """Drop what is known of a sender (e.g. a node removed from the configuration)."""
        for key in [k for k in self._last if k[0] == sender]:
            del self._last[key]
