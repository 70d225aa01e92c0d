"""Heartbeat transport: one UDP socket per heartbeat network, authenticated, replay-checked.

Each `send()` puts the same seq on every link; each link is its own replay
channel, so the copy that crosses the other network is accepted too. Sockets
are marked with the highest precedence (IP_TOS 0xC0, SO_PRIORITY 6) so that
heartbeats are not queued behind replication traffic.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.core.frames import FrameError, Heartbeat, ReplayGuard, decode, encode

Address = str | ipaddress.IPv4Address | ipaddress.IPv6Address
HEARTBEAT_TOS = 0xC0
_SO_PRIORITY_HIGH = 6  # the highest priority an unprivileged socket may set
_PROBLEM_REPEAT = 10.0  # seconds between two reports of the same problem


@dataclass
class HeartbeatStats:
    """Counts of what the links sent, received and dropped (reported in status)."""

    forged: int = 0
    replayed: int = 0
    malformed: int = 0
    version_mismatch: int = 0
    foreign: int = 0  # good MAC, another cluster's name: two clusters share a key
    own: int = 0  # our own name: a looped-back datagram or a second node named like us
    received: list[int] = field(default_factory=list)
    sent: int = 0
    send_errors: int = 0


class _LinkProtocol(asyncio.DatagramProtocol):
    def __init__(self, links: HeartbeatLinks, index: int) -> None:
        self.links = links
        self.index = index

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.links._received(self.index, data)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (peer down, network unreachable): the failure detector sees the silence.
        self.links.stats.send_errors += 1


def _family(address: str) -> socket.AddressFamily:
    try:
        version = ipaddress.ip_address(address).version
    except ValueError:
        raise ValueError(f"heartbeat address {address!r} is not an IP address") from None
    return socket.AF_INET6 if version == 6 else socket.AF_INET


class HeartbeatLinks:
    """Sends and receives heartbeats on every heartbeat network of this node."""

    def __init__(
        self,
        key: bytes,
        cluster: str,
        node: str,
        incarnation: int,
        config_hash: str,
        local_addrs: Sequence[Address],
        peer_addrs: Sequence[Address],
        port: int,
        on_heartbeat: Callable[[Heartbeat, int, float], None],
        clock: Callable[[], float] = time.monotonic,
        on_problem: Callable[[str], None] | None = None,
    ) -> None:
        if not local_addrs or len(local_addrs) != len(peer_addrs):
            raise ValueError(
                f"need one peer address per local heartbeat address, got "
                f"{len(local_addrs)} local and {len(peer_addrs)} peer"
            )
        self._key = key
        self.cluster = cluster
        self.node = node
        self.incarnation = incarnation
        self.config_hash = config_hash
        self.local_addrs = [str(a) for a in local_addrs]
        self.peer_addrs = [str(a) for a in peer_addrs]
        self.port = port
        self._on_heartbeat = on_heartbeat
        self._on_problem = on_problem
        self._clock = clock
        self._guard = ReplayGuard()
        self._seq = 0
        self._transports: list[asyncio.DatagramTransport] = []
        self._reported: dict[str, float] = {}
        self.stats = HeartbeatStats(received=[0] * len(local_addrs))

    async def start(self) -> None:
        """Bind one socket per local heartbeat address; raises OSError naming the address."""
        loop = asyncio.get_running_loop()
        try:
            for index, address in enumerate(self.local_addrs):
                sock = self._socket(address)
                transport, _ = await loop.create_datagram_endpoint(
                    functools.partial(_LinkProtocol, self, index), sock=sock
                )
                self._transports.append(transport)
        except BaseException:
            self.close()
            raise

    def _socket(self, address: str) -> socket.socket:
        family = _family(address)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, HEARTBEAT_TOS)
            else:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, HEARTBEAT_TOS)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, _SO_PRIORITY_HIGH)
            try:
                sock.bind((address, self.port))
            except OSError as exc:
                raise OSError(
                    exc.errno, f"cannot bind heartbeat socket {address}:{self.port}: {exc.strerror}"
                ) from None
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        """Close every link's socket."""
        for transport in self._transports:
            transport.close()
        self._transports = []

    def send(self, payload: dict[str, Any]) -> None:
        """Send one heartbeat carrying `payload` on every link, all with the same seq."""
        self._seq += 1
        for index, transport in enumerate(self._transports):
            frame = Heartbeat(
                self.cluster,
                self.node,
                self.incarnation,
                self._seq,
                index,
                self.config_hash,
                payload,
            )
            try:
                transport.sendto(encode(self._key, frame), (self.peer_addrs[index], self.port))
            except OSError:
                self.stats.send_errors += 1
                continue
            self.stats.sent += 1

    def _problem(self, message: str) -> None:
        if self._on_problem is None:
            return
        now = self._clock()
        last = self._reported.get(message)
        if last is not None and now - last < _PROBLEM_REPEAT:
            return
        self._reported[message] = now
        self._on_problem(message)

    def _received(self, index: int, data: bytes) -> None:
        try:
            frame = decode(self._key, data)
        except FrameError as exc:
            if exc.kind == "forged":
                self.stats.forged += 1
            elif exc.kind == "version":
                self.stats.version_mismatch += 1
                self._problem(f"heartbeat link {index}: {exc.reason}")
            else:
                self.stats.malformed += 1
            return
        if not isinstance(frame, Heartbeat):
            self.stats.malformed += 1
            return
        if frame.cluster != self.cluster:
            self.stats.foreign += 1
            self._problem(
                f"heartbeat link {index}: heartbeats of cluster {frame.cluster!r} signed with "
                f"this cluster's key; give each cluster its own key"
            )
            return
        if frame.node == self.node:
            self.stats.own += 1
            if frame.incarnation != self.incarnation:
                self._problem(
                    f"heartbeat link {index}: another agent runs as node {self.node!r}; "
                    "check --node on both servers"
                )
            return
        if not self._guard.check(frame.node, index, frame.incarnation, frame.seq):
            self.stats.replayed += 1
            return
        self.stats.received[index] += 1
        self._on_heartbeat(frame, index, self._clock())
