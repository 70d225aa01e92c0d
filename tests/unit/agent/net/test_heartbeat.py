"""Heartbeat links for real: UDP sockets on loopback addresses, forged and replayed datagrams."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
import struct
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent.core.frames import PROTOCOL_VERSION, Heartbeat, Kind, encode
from agent.net.heartbeat import HEARTBEAT_TOS, HeartbeatLinks

KEY = bytes(range(32))
DEADLINE = 10.0


def free_port(addresses: Sequence[str]) -> int:
    """A UDP port free on every one of `addresses` (checked by binding them all at once)."""
    for _ in range(50):
        with closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as probe:
            probe.bind((addresses[0], 0))
            port: int = probe.getsockname()[1]
            others = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in addresses[1:]]
            try:
                for sock, address in zip(others, addresses[1:], strict=True):
                    sock.bind((address, port))
                return port
            except OSError:
                continue
            finally:
                for sock in others:
                    sock.close()
    raise RuntimeError("no common free UDP port")


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for a condition, polling, with a generous deadline (never a timed assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@dataclass
class Node:
    """One HeartbeatLinks with what it received and the problems it reported."""

    links: HeartbeatLinks
    beats: list[tuple[Heartbeat, int, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@asynccontextmanager
async def node(
    name: str,
    local: Sequence[str],
    peer: Sequence[str],
    port: int,
    incarnation: int = 1,
    cluster: str = "shop",
) -> AsyncIterator[Node]:
    beats: list[tuple[Heartbeat, int, float]] = []
    problems: list[str] = []
    links = HeartbeatLinks(
        KEY,
        cluster,
        name,
        incarnation,
        "hash-" + name[-1],
        local,
        peer,
        port,
        lambda frame, link, now: beats.append((frame, link, now)),
        on_problem=problems.append,
    )
    await links.start()
    try:
        yield Node(links, beats, problems)
    finally:
        links.close()


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def test_two_nodes_exchange_heartbeats_on_every_link() -> None:
    a_addrs, b_addrs = ["127.0.0.1", "127.0.0.2"], ["127.0.0.3", "127.0.0.4"]
    port = free_port(a_addrs + b_addrs)

    async def scenario() -> None:
        async with (
            node("node1", a_addrs, b_addrs, port) as a,
            node("node2", b_addrs, a_addrs, port) as b,
        ):
            a.links.send({"modules": {"web": {"state": "PRIM"}}})
            await until(lambda: len(b.beats) == 2, "node2 to hear both links")
            frames = sorted(b.beats, key=lambda beat: beat[1])
            assert [link for _, link, _ in frames] == [0, 1]
            for frame, link, _ in frames:
                assert frame.node == "node1"
                assert frame.cluster == "shop"
                assert frame.seq == 1
                assert frame.link == link
                assert frame.config_hash == "hash-1"
                assert frame.payload == {"modules": {"web": {"state": "PRIM"}}}
            b.links.send({"n": 1})
            b.links.send({"n": 2})
            await until(lambda: len(a.beats) == 4, "node1 to hear two heartbeats twice")
            assert sorted(f.seq for f, _, _ in a.beats) == [1, 1, 2, 2]
            assert a.links.stats.received == [2, 2]
            assert b.links.stats.sent == 4
            assert a.links.stats.sent == 2
            assert a.problems == b.problems == []
            for stats in (a.links.stats, b.links.stats):
                assert stats.forged == stats.replayed == stats.malformed == 0

    run(scenario)


def test_sockets_are_marked_for_priority() -> None:
    port = free_port(["127.0.0.1"])

    async def scenario() -> None:
        async with node("node1", ["127.0.0.1"], ["127.0.0.3"], port) as a:
            sock = a.links._transports[0].get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_TOS) == HEARTBEAT_TOS
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1

    run(scenario)


def signed(body: bytes, version: int) -> bytes:
    data = struct.pack(">4sHB", b"TDM1", version, Kind.HEARTBEAT) + body
    return data + hmac.new(KEY, data, hashlib.sha256).digest()


def test_forged_replayed_and_stray_datagrams_are_dropped_and_counted() -> None:
    # node1 sends to a capture socket; the test plays the network and forwards to node2.
    port = free_port(["127.0.0.1", "127.0.0.3", "127.0.0.5"])
    capture = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    capture.bind(("127.0.0.5", port))
    capture.settimeout(DEADLINE)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind(("127.0.0.9", 0))
    to_b = ("127.0.0.3", port)

    async def scenario() -> None:
        async with (
            node("node1", ["127.0.0.1"], ["127.0.0.5"], port) as a,
            node("node2", ["127.0.0.3"], ["127.0.0.1"], port) as b,
        ):
            stats = b.links.stats
            a.links.send({"n": 1})
            captured = await asyncio.to_thread(capture.recv, 65536)
            raw.sendto(captured, to_b)
            await until(lambda: stats.received == [1], "the captured heartbeat to arrive")

            raw.sendto(captured, to_b)
            await until(lambda: stats.replayed == 1, "the replay to be counted")

            forged = encode(b"\x00" * 32, Heartbeat("shop", "node1", 1, 99, 0, "h", {}))
            raw.sendto(forged, to_b)
            await until(lambda: stats.forged == 1, "the forgery to be counted")

            raw.sendto(b"GET / HTTP/1.0\r\n\r\n", to_b)
            await until(lambda: stats.malformed == 1, "the junk to be counted")

            other = encode(KEY, Heartbeat("other", "node1", 1, 100, 0, "h", {}))
            raw.sendto(other, to_b)
            await until(lambda: stats.foreign == 1, "another cluster's heartbeat")

            myself = encode(KEY, Heartbeat("shop", "node2", 7, 1, 0, "h", {}))
            raw.sendto(myself, to_b)
            await until(lambda: stats.own == 1, "a heartbeat in our own name")

            body = encode(KEY, Heartbeat("shop", "node1", 1, 101, 0, "h", {}))[7:-32]
            raw.sendto(signed(body, PROTOCOL_VERSION + 1), to_b)
            await until(lambda: stats.version_mismatch == 1, "the version mismatch")
            raw.sendto(signed(body, PROTOCOL_VERSION + 1), to_b)
            await until(lambda: stats.version_mismatch == 2, "the second version mismatch")

            assert stats.received == [1]
            assert len(b.beats) == 1
            assert b.beats[0][0].payload == {"n": 1}
            # Reported once (not per datagram), naming the peer's version.
            version_problems = [p for p in b.problems if "protocol version" in p]
            assert len(version_problems) == 1
            assert f"version {PROTOCOL_VERSION + 1}" in version_problems[0]
            assert any("another agent runs as node 'node2'" in p for p in b.problems)
            assert any("'other'" in p for p in b.problems)

    try:
        run(scenario)
    finally:
        capture.close()
        raw.close()


def test_a_restarted_sender_with_a_newer_incarnation_is_accepted() -> None:
    port = free_port(["127.0.0.1", "127.0.0.3", "127.0.0.5"])
    capture = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    capture.bind(("127.0.0.5", port))
    capture.settimeout(DEADLINE)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind(("127.0.0.9", 0))
    to_b = ("127.0.0.3", port)

    async def scenario() -> None:
        async with node("node2", ["127.0.0.3"], ["127.0.0.1"], port) as b:
            stats = b.links.stats
            old: list[bytes] = []
            async with node("node1", ["127.0.0.1"], ["127.0.0.5"], port, incarnation=1000) as a:
                for n in range(3):
                    a.links.send({"n": n})
                    old.append(await asyncio.to_thread(capture.recv, 65536))
            raw.sendto(old[0], to_b)
            raw.sendto(old[1], to_b)
            await until(lambda: stats.received == [2], "the first incarnation's heartbeats")

            async with node("node1", ["127.0.0.1"], ["127.0.0.3"], port, incarnation=2000) as a:
                a.links.send({"restarted": True})
                await until(lambda: stats.received == [3], "the restarted node's heartbeat")
            frame = b.beats[-1][0]
            assert (frame.incarnation, frame.seq, frame.payload) == (2000, 1, {"restarted": True})

            # A frame of the old incarnation, never seen before, is still a replay now.
            raw.sendto(old[2], to_b)
            await until(lambda: stats.replayed == 1, "the old incarnation to be refused")
            assert stats.received == [3]

    try:
        run(scenario)
    finally:
        capture.close()
        raw.close()


def test_a_port_in_use_is_reported_with_the_address() -> None:
    port = free_port(["127.0.0.1"])
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", port))

    async def scenario() -> None:
        links = HeartbeatLinks(
            KEY, "shop", "node1", 1, "h", ["127.0.0.1"], ["127.0.0.3"], port, lambda *a: None
        )
        with pytest.raises(OSError, match=f"cannot bind heartbeat socket 127.0.0.1:{port}"):
            await links.start()

    try:
        run(scenario)
    finally:
        blocker.close()


def test_mismatched_address_lists_are_refused() -> None:
    with pytest.raises(ValueError, match="one peer address per local"):
        HeartbeatLinks(KEY, "c", "n", 1, "h", ["127.0.0.1"], [], 7701, lambda *a: None)
    with pytest.raises(ValueError, match="not an IP address"):
        asyncio.run(
            HeartbeatLinks(KEY, "c", "n", 1, "h", ["eth0"], ["x"], 7701, lambda *a: None).start()
        )
