"""One authenticated replication stream over a connected TCP socket (blocking, thread-safe sends).

The primary's mirror connects to the peer agent's `peer` port; the first frame
(HELLO) names the cluster, module and node and carries the client's nonce. The
peer agent reads that frame, checks it with the cluster key, and hands the
socket to the module's receiver, which answers with its own HELLO. From then on
both directions use the session key (mirror_frames.session_key).

Sends go out as header + payload + MAC in one sendmsg, so a 1 MiB write is
never copied into a frame; receives read exact sizes into a reused buffer.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.core import mirror_frames as mf
from agent.core.mirror_ops import Buffer, Op, encode_op_parts

HANDSHAKE_TIMEOUT = 5.0
IOV_MAX = 1024
SEND_FLUSH_BYTES = 128 << 10
RECEIVE_BUFFER = 4 << 20  # holds the largest frames (a 1 MiB write) several times over


class LinkClosed(Exception):
    """The peer closed the stream or the socket failed; the reason says which."""


@dataclass(frozen=True)
class Hello:
    """The client's opening frame, as the accepting side reads it."""

    cluster: str
    module: str
    node: str
    nonce: bytes
    raw: bytes  # the whole frame, handed on to the receiver with the socket


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    size = len(view)
    while got < size:
        try:
            n = sock.recv_into(view[got:], size - got)
        except OSError as exc:
            raise LinkClosed(f"replication link failed: {exc.strerror or exc}") from None
        if n == 0:
            raise LinkClosed("replication link closed by the peer")
        got += n


def read_frame(sock: socket.socket, key: bytes, expected_seq: int) -> tuple[mf.Header, bytes]:
    """One verified frame (small payloads: handshake and control)."""
    header_raw = bytearray(mf.HEADER_BYTES)
    _recv_exact(sock, memoryview(header_raw))
    header = mf.parse_header(header_raw)
    rest = bytearray(header.length + mf.MAC_BYTES)
    _recv_exact(sock, memoryview(rest))
    payload = bytes(rest[: header.length])
    mf.verify(key, header_raw, header, payload, rest[header.length :], expected_seq)
    return header, payload


def read_hello(sock: socket.socket, cluster_key: bytes) -> Hello:
    """The opening frame of an incoming stream; StreamError/LinkClosed if it is not a good one."""
    sock.settimeout(HANDSHAKE_TIMEOUT)
    header_raw = bytearray(mf.HEADER_BYTES)
    _recv_exact(sock, memoryview(header_raw))
    header = mf.parse_header(header_raw)
    if header.kind is not mf.FrameKind.HELLO or header.length > 4096:
        raise mf.StreamError("stream does not open with a HELLO frame")
    rest = bytearray(header.length + mf.MAC_BYTES)
    _recv_exact(sock, memoryview(rest))
    payload = bytes(rest[: header.length])
    mf.verify(mf.base_key(cluster_key), header_raw, header, payload, rest[header.length :], 0)
    body = mf.decode_json(payload)
    try:
        hello = Hello(
            cluster=str(body["cluster"]),
            module=str(body["module"]),
            node=str(body["node"]),
            nonce=bytes.fromhex(str(body["nonce"])),
            raw=bytes(header_raw) + bytes(rest),
        )
    except (KeyError, ValueError) as exc:
        raise mf.StreamError(f"malformed HELLO: {exc}") from None
    if len(hello.nonce) != 16:
        raise mf.StreamError("malformed HELLO: nonce must be 16 bytes")
    return hello


def parse_hello_frame(raw: bytes, cluster_key: bytes) -> Hello:
    """A HELLO frame handed over with a socket (checked again: the receiver trusts no one)."""
    header = mf.parse_header(raw[: mf.HEADER_BYTES])
    payload = raw[mf.HEADER_BYTES : mf.HEADER_BYTES + header.length]
    mac = raw[mf.HEADER_BYTES + header.length :]
    key = mf.base_key(cluster_key)
    mf.verify(key, raw[: mf.HEADER_BYTES], header, payload, mac, 0)
    body = mf.decode_json(payload)
    return Hello(
        str(body["cluster"]),
        str(body["module"]),
        str(body["node"]),
        bytes.fromhex(body["nonce"]),
        raw,
    )


class Stream:
    """Both directions of an established session: sequenced sends and verified receives."""

    def __init__(self, sock: socket.socket, key: bytes, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self._key = key
        self._send_seq = 1
        self._recv_seq = 1
        self._send_lock = threading.Lock()
        # Receives read as much as the socket holds into one buffer and frames are cut from
        # it: a burst of small frames costs one recv, not two per frame.
        self._buffer = bytearray(RECEIVE_BUFFER)
        self._view = memoryview(self._buffer)
        self._start = 0  # first byte not yet handed out
        self._end = 0  # end of the bytes received
        self.sent_bytes = 0

    def send(self, kind: mf.FrameKind, payload: Buffer) -> int:
        """Send one frame; returns its sequence number."""
        return self.send_frames([(kind, [payload])])

    def send_op(self, op: Op) -> int:
        return self.send_frames([(mf.FrameKind.OP, encode_op_parts(op))])

    def send_json(self, kind: mf.FrameKind, message: dict[str, Any]) -> int:
        return self.send(kind, mf.encode_json(message))

    def send_frames(self, frames: Sequence[tuple[mf.FrameKind, Sequence[Buffer]]]) -> int:
        """Send frames (each a payload in parts) in one go; returns the last one's sequence."""
        with self._send_lock:
            seq = self._send_seq - 1
            parts: list[Buffer] = []
            size = 0
            for kind, payload in frames:
                seq += 1
                header, mac = mf.encode_parts(self._key, kind, seq, payload)
                parts.append(header)
                parts.extend(payload)
                parts.append(mac)
                size += len(header) + sum(len(part) for part in payload) + len(mac)
                if size >= SEND_FLUSH_BYTES:
                    # Large frames leave as soon as each is authenticated: the peer starts on
                    # one while the next is hashed.
                    self._sendall(parts)
                    self.sent_bytes += size
                    parts, size = [], 0
            self._sendall(parts)
            self._send_seq = seq + 1
            self.sent_bytes += size
            return seq

    def _sendall(self, parts: list[Buffer]) -> None:
        views = [memoryview(p) for p in parts if len(p)]
        try:
            while views:
                # sendmsg takes at most IOV_MAX buffers at a time.
                sent = self.sock.sendmsg(views[:IOV_MAX])
                done = 0
                while done < len(views) and sent >= len(views[done]):
                    sent -= len(views[done])
                    done += 1
                del views[:done]
                if views and sent:
                    views[0] = views[0][sent:]
        except OSError as exc:
            raise LinkClosed(f"replication link failed: {exc.strerror or exc}") from None

    def receive(self) -> tuple[mf.Header, memoryview]:
        """The next verified frame; its payload view is valid until the next receive."""
        self._fill(mf.HEADER_BYTES)
        header_raw = self._view[self._start : self._start + mf.HEADER_BYTES]
        header = mf.parse_header(header_raw)
        need = mf.HEADER_BYTES + header.length + mf.MAC_BYTES
        self._fill(need)
        start = self._start
        header_raw = self._view[start : start + mf.HEADER_BYTES]
        body = start + mf.HEADER_BYTES
        payload = self._view[body : body + header.length]
        mac = self._view[body + header.length : start + need]
        mf.verify(self._key, header_raw, header, payload, mac, self._recv_seq)
        self._recv_seq += 1
        self._start = start + need
        return header, payload

    def request(
        self, message: dict[str, Any], timeout: float = HANDSHAKE_TIMEOUT
    ) -> dict[str, Any]:
        """One control request and its answer, before the session's operations (the receiver
        counts neither); LinkClosed if no answer comes within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            self.send_json(mf.FrameKind.CONTROL, message)
            header, payload = self.receive()
            body = mf.decode_json(payload)
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(None)
        if header.kind is mf.FrameKind.ERROR:
            raise LinkClosed(f"the peer refused {message.get('type')}: {body.get('reason', '?')}")
        if header.kind is not mf.FrameKind.CONTROL or body.get("type") != message.get("type"):
            raise LinkClosed(f"the peer did not answer {message.get('type')}")
        return body

    def pending(self) -> bool:
        """Whether more of the stream is already here (in the buffer or the socket)."""
        if self._end > self._start:
            return True
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:
            return False

    def _fill(self, need: int) -> None:
        """Make `need` bytes from `_start` available in the buffer, receiving what is missing."""
        if self._end - self._start >= need:
            return
        if self._start + need > len(self._buffer):
            # Move the partial frame to the front (the views handed out before are spent).
            kept = self._end - self._start
            if need > len(self._buffer):
                grown = bytearray(max(need, 2 * len(self._buffer)))
                grown[:kept] = self._view[self._start : self._end]
                self._buffer, self._view = grown, memoryview(grown)
            else:
                self._view[:kept] = self._view[self._start : self._end]
            self._start, self._end = 0, kept
        while self._end - self._start < need:
            try:
                n = self.sock.recv_into(self._view[self._end :])
            except OSError as exc:
                raise LinkClosed(f"replication link failed: {exc.strerror or exc}") from None
            if n == 0:
                raise LinkClosed("replication link closed by the peer")
            self._end += n

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def connect(
    address: str,
    port: int,
    cluster_key: bytes,
    *,
    cluster: str,
    module: str,
    node: str,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> Stream:
    """Open the stream to the peer's receiver and complete the handshake."""
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as exc:
        raise LinkClosed(f"cannot reach {address}:{port}: {exc.strerror or exc}") from None
    try:
        _tune(sock)
        nonce = os.urandom(16)
        hello = {"cluster": cluster, "module": module, "node": node, "nonce": nonce.hex()}
        sock.sendall(
            mf.encode(mf.base_key(cluster_key), mf.FrameKind.HELLO, 0, mf.encode_json(hello))
        )
        header, payload = read_frame(sock, mf.base_key(cluster_key), 0)
        body = mf.decode_json(payload)
        if header.kind is mf.FrameKind.ERROR:
            raise LinkClosed(f"peer refused the stream: {body.get('reason', '?')}")
        if header.kind is not mf.FrameKind.HELLO or body.get("echo") != nonce.hex():
            raise mf.StreamError("peer's HELLO does not answer ours")
        server_nonce = bytes.fromhex(str(body["nonce"]))
        sock.settimeout(None)
        key = mf.session_key(cluster_key, nonce, server_nonce)
        return Stream(sock, key, str(body.get("node", address)))
    except (mf.StreamError, LinkClosed, KeyError, ValueError, OSError):
        sock.close()
        raise


def accept(sock: socket.socket, hello: Hello, cluster_key: bytes, node: str) -> Stream:
    """Answer a checked HELLO on the receiving side and start the session."""
    _tune(sock)
    nonce = os.urandom(16)
    body = {"node": node, "nonce": nonce.hex(), "echo": hello.nonce.hex()}
    try:
        sock.sendall(
            mf.encode(mf.base_key(cluster_key), mf.FrameKind.HELLO, 0, mf.encode_json(body))
        )
    except OSError as exc:
        raise LinkClosed(f"replication link failed: {exc.strerror or exc}") from None
    sock.settimeout(None)
    return Stream(sock, mf.session_key(cluster_key, hello.nonce, nonce), hello.node)


def refuse(sock: socket.socket, cluster_key: bytes, reason: str) -> None:
    """Tell a client why its stream is refused, then close."""
    try:
        frame = mf.encode(
            mf.base_key(cluster_key), mf.FrameKind.ERROR, 0, mf.encode_json({"reason": reason})
        )
        sock.sendall(frame)
    except OSError:
        pass
    sock.close()


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Replication shares the link with heartbeats; keepalive finds a dead peer without traffic.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        (socket.TCP_KEEPIDLE, 2),
        (socket.TCP_KEEPINTVL, 1),
        (socket.TCP_KEEPCNT, 3),
    ):
        sock.setsockopt(socket.IPPROTO_TCP, option, value)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
