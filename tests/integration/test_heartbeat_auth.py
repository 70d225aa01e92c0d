"""Heartbeats are authenticated: forged and replayed datagrams are dropped, counted, harmless.

An attacker on the LAN (the client namespace) sends node1 garbage, a heartbeat signed with
the wrong key, a real heartbeat of node2 copied off the wire, and one signed with the right
key but from an older incarnation. The forged ones claim node2 serves the module, which
would make node1 give up the role if they were believed.
"""

from __future__ import annotations

import dataclasses
import secrets
import socket
import struct
import time

from agent.core.frames import Heartbeat, decode, encode
from agent.keys import load_key
from tests.cluster import VIP, Cluster
from tests.integration.support import assert_nothing_changes, assert_one_holder
from tests.lab import DEFAULT_TIMING, HEARTBEAT_PORT, Lab, netns_socket

PEER_TIMEOUT = DEFAULT_TIMING["peer_timeout"]
NODE1 = "198.18.0.1"
NODE2 = "198.18.0.2"


def capture_heartbeat(lab: Lab, timeout: float = 5.0) -> bytes:
    """A heartbeat node2 sent to node1, copied off the wire inside node1's namespace.

    A raw UDP socket gets a copy of every UDP datagram the namespace receives; node1's agent
    gets (and accepts) the original.
    """
    with netns_socket(
        lab.ns_name("node1"), socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP
    ) as raw:
        raw.settimeout(0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                packet = raw.recv(65535)
            except TimeoutError:
                continue
            header = (packet[0] & 0x0F) * 4
            source = socket.inet_ntoa(packet[12:16])
            _, dport, _, _ = struct.unpack("!HHHH", packet[header : header + 8])
            if source == NODE2 and dport == HEARTBEAT_PORT:
                return packet[header + 8 :]
    raise AssertionError(f"no heartbeat from {NODE2} seen in node1's namespace in {timeout} s")


def peer_counters(cluster: Cluster) -> tuple[int, int]:
    """node1's counts of dropped forged and replayed heartbeats."""
    status = cluster.status("node1")
    assert status is not None
    return status["peer"]["dropped_forged"], status["peer"]["dropped_replayed"]


def test_forged_and_replayed_heartbeats_are_dropped_and_counted(lab: Lab) -> None:
    cluster = Cluster(lab).start()
    cluster.wait_healthy_pair("node1")
    key = load_key(lab.key_file)
    captured = capture_heartbeat(lab)
    real = decode(key, captured)
    assert isinstance(real, Heartbeat) and real.node == "node2"
    # What a forger would like node1 to believe: node2 serves the module.
    serving = {
        name: {**module, "s": "ALONE", "h": True}
        for name, module in real.payload["modules"].items()
    }
    lie = dataclasses.replace(
        real, seq=real.seq + 1_000_000, payload={**real.payload, "modules": serving}
    )
    forged = encode(secrets.token_bytes(32), lie)
    older_incarnation = encode(key, dataclasses.replace(lie, incarnation=real.incarnation - 1))

    forged_before, replayed_before = peer_counters(cluster)
    with (
        lab.watch_vip(VIP) as watch,
        lab.socket("client", socket.AF_INET, socket.SOCK_DGRAM) as attacker,
    ):
        for datagram in (b"not a heartbeat at all", forged, captured, older_incarnation):
            attacker.sendto(datagram, (NODE1, HEARTBEAT_PORT))
        cluster.wait_until(
            "node1 counts one forged and two replayed heartbeats",
            lambda: peer_counters(cluster) == (forged_before + 1, replayed_before + 2),
            timeout=5,
        )
        # Believed, the lies would act at node1's next decision; a peer timeout is several.
        assert_nothing_changes(cluster, PEER_TIMEOUT, watch=watch)
        assert cluster.state("node1") == "PRIM" and cluster.state("node2") == "SECOND"
        status = cluster.status("node1")
        assert status is not None
        assert status["peer"]["problem"] is None, status["peer"]
    assert_one_holder(watch)
