"""The agent's side of the witness: lease requests over authenticated UDP, never blocking.

A verdict's `expires_in` counts from the witness's decision, which comes after
the request was sent: a holder that measures its lease from the moment it
called `request()` is always on the safe side of the witness's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from agent.core.frames import (
    FrameError,
    LeaseItem,
    LeaseReply,
    LeaseRequest,
    Verdict,
    decode,
    encode,
)

# A lost datagram should not cost a whole lease period: the request is sent again
# (with a new seq, so the witness's replay guard accepts it) this many times in all.
_ATTEMPTS = 3


@dataclass
class WitnessClientStats:
    """What the client sent and what it dropped, for status and tests."""

    sent: int = 0
    replies: int = 0
    forged: int = 0
    malformed: int = 0
    version_mismatch: int = 0
    stale: int = 0
    unanswered: int = 0
    errors: int = 0
    last_problem: str | None = None


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, client: WitnessClient) -> None:
        self.client = client

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.client._received(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the witness is down; the timeout says so.
        self.client.stats.errors += 1


class WitnessClient:
    """Sends LeaseRequests to one witness and matches its replies by seq."""

    def __init__(
        self, address: str, port: int, key: bytes, cluster: str, node: str, incarnation: int
    ) -> None:
        self.address = address
        self.port = port
        self._key = key
        self.cluster = cluster
        self.node = node
        self.incarnation = incarnation
        self.stats = WitnessClientStats()
        self._seq = 0
        self._pending: dict[int, asyncio.Future[LeaseReply]] = {}
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        """Open the UDP socket toward the witness (a connected socket: only it can answer)."""
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), remote_addr=(self.address, self.port)
        )

    def close(self) -> None:
        """Close the socket; requests in flight return None."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        self._pending.clear()

    async def request(
        self, items: Sequence[LeaseItem], duration: float, timeout: float
    ) -> dict[str, Verdict] | None:
        """Ask for `items`: verdicts by module, or None if the witness did not answer in time."""
        if self._transport is None:
            raise RuntimeError("WitnessClient.request() called before start()")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[LeaseReply] = loop.create_future()
        seqs: list[int] = []
        deadline = loop.time() + timeout
        try:
            for attempt in range(_ATTEMPTS):
                self._send(items, duration, future, seqs)
                wait = (deadline - loop.time()) / (_ATTEMPTS - attempt)
                with contextlib.suppress(TimeoutError):
                    reply = await asyncio.wait_for(asyncio.shield(future), max(0.0, wait))
                    return {v.module: v for v in reply.verdicts}
            self.stats.unanswered += 1
            return None
        except asyncio.CancelledError:
            if future.cancelled() and self._transport is None:
                return None  # closed while waiting
            raise
        finally:
            for seq in seqs:
                self._pending.pop(seq, None)
            if not future.done():
                future.cancel()

    def _send(
        self,
        items: Sequence[LeaseItem],
        duration: float,
        future: asyncio.Future[LeaseReply],
        seqs: list[int],
    ) -> None:
        assert self._transport is not None
        self._seq += 1
        request = LeaseRequest(
            self.cluster, self.node, self.incarnation, self._seq, duration, tuple(items)
        )
        self._pending[self._seq] = future
        seqs.append(self._seq)
        self._transport.sendto(encode(self._key, request))
        self.stats.sent += 1

    def _received(self, data: bytes) -> None:
        try:
            reply = decode(self._key, data)
        except FrameError as exc:
            if exc.kind == "forged":
                self.stats.forged += 1
            elif exc.kind == "version":
                self.stats.version_mismatch += 1
                self.stats.last_problem = f"witness: {exc.reason}"
            else:
                self.stats.malformed += 1
            return
        if (
            not isinstance(reply, LeaseReply)
            or reply.cluster != self.cluster
            or reply.node != self.node
            or reply.incarnation != self.incarnation
        ):
            self.stats.stale += 1
            return
        future = self._pending.get(reply.seq)
        if future is None or future.done():
            self.stats.stale += 1  # an answer to a request already answered or given up
            return
        self.stats.replies += 1
        future.set_result(reply)
