"""Framing of the replication stream: one authenticated, ordered TCP stream per module.

A frame is a 16-byte header (magic, version, kind, sequence number, payload
length), the payload, and a 16-byte keyed BLAKE3 MAC over header and payload.
The handshake frames are keyed with the cluster key; everything after with a
session key drawn from both sides' nonces, so a recorded session cannot be
replayed into a new one, and inside a session each direction's sequence
numbers must rise by exactly one (a dropped, repeated or reordered frame is
refused). BLAKE3 because it authenticates at several GB/s on one core where
HMAC-SHA256 manages about 1.4: the MAC must not be what limits mirroring.

Pure: the caller reads exact byte counts (header, then `length + MAC_BYTES`)
and hands them here.
"""

from __future__ import annotations

import hmac
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import blake3

Buffer = bytes | bytearray | memoryview

MIRROR_PROTOCOL = 2  # 2: activity and hashes requests
MAGIC = b"TM"
MAC_BYTES = 16
HEADER = struct.Struct(">2sBBQI")
HEADER_BYTES = HEADER.size
MAX_PAYLOAD = 17 << 20  # a 16 MiB write plus its operation header


class FrameKind(IntEnum):
    """What a frame carries."""

    HELLO = 1  # handshake, JSON, keyed with the cluster key
    OP = 2  # one encoded operation (mirror_ops)
    ACK = 3  # JSON: highest sequence applied (and made durable where asked)
    CONTROL = 4  # JSON: resync, verify and status messages
    ERROR = 5  # JSON: the receiver refuses the stream, with the reason
    MANIFEST = 6  # binary: a chunk of the receiver's tree manifest (empty: the last one)


class StreamError(Exception):
    """The stream cannot be trusted any more: forged, corrupted, out of order or another version."""


@dataclass(frozen=True, slots=True)
class Header:
    kind: FrameKind
    seq: int
    length: int


def base_key(cluster_key: bytes) -> bytes:
    """The handshake key: the cluster key, stretched to BLAKE3's 32 bytes for this use only."""
    return blake3.blake3(cluster_key, derive_key_context="tandem-ha mirror handshake v1").digest()


def session_key(cluster_key: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """The key of one session: both nonces, so neither side alone picks it."""
    material = cluster_key + client_nonce + server_nonce
    return blake3.blake3(material, derive_key_context="tandem-ha mirror session v1").digest()


def encode(key: bytes, kind: FrameKind, seq: int, payload: bytes) -> bytes:
    """One frame, ready to send."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    header = HEADER.pack(MAGIC, MIRROR_PROTOCOL, kind, seq, len(payload))
    mac = blake3.blake3(header, key=key)
    mac.update(payload)
    return header + payload + mac.digest(MAC_BYTES)


def encode_parts(
    key: bytes, kind: FrameKind, seq: int, payload: Sequence[Buffer]
) -> tuple[bytes, bytes]:
    """(header, mac) for a payload sent as consecutive parts: large writes are never copied
    into a frame."""
    length = sum(len(part) for part in payload)
    if length > MAX_PAYLOAD:
        raise ValueError(f"payload of {length} bytes exceeds {MAX_PAYLOAD}")
    header = HEADER.pack(MAGIC, MIRROR_PROTOCOL, kind, seq, length)
    mac = blake3.blake3(header, key=key)
    for part in payload:
        mac.update(part)
    return header, mac.digest(MAC_BYTES)


def parse_header(raw: Buffer) -> Header:
    """The header's fields; StreamError for another protocol or an impossible length."""
    try:
        magic, version, kind, seq, length = HEADER.unpack(raw)
    except struct.error:
        raise StreamError("truncated frame header") from None
    if magic != MAGIC:
        raise StreamError("not a Tandem replication stream (bad magic)")
    if version != MIRROR_PROTOCOL:
        raise StreamError(
            f"peer speaks replication protocol {version}, this node {MIRROR_PROTOCOL}; "
            "run the same Tandem release on both nodes"
        )
    try:
        frame_kind = FrameKind(kind)
    except ValueError:
        raise StreamError(f"unknown frame kind {kind}") from None
    if length > MAX_PAYLOAD:
        raise StreamError(f"frame of {length} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    return Header(frame_kind, seq, length)


def verify(
    key: bytes,
    header_raw: Buffer,
    header: Header,
    payload: Buffer,
    mac: Buffer,
    expected_seq: int,
) -> None:
    """Check a frame's MAC and sequence; StreamError says which check failed."""
    digest = blake3.blake3(header_raw, key=key)
    digest.update(payload)
    if not hmac.compare_digest(digest.digest(MAC_BYTES), bytes(mac)):
        raise StreamError(f"frame {header.seq} failed authentication (forged or corrupted)")
    if header.seq != expected_seq:
        raise StreamError(f"frame {header.seq} out of order (expected {expected_seq})")


def encode_json(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode()


def decode_json(payload: Buffer) -> dict[str, Any]:
    """A JSON object payload; StreamError if it is anything else."""
    try:
        value = json.loads(bytes(payload))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StreamError(f"malformed control payload: {exc}") from None
    if not isinstance(value, dict):
        raise StreamError("control payload is not a JSON object")
    return value
