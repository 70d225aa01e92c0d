"""Benchmark: what a healthy, idle pair costs the machine and the network.

For 30 s of a healthy pair (default timing), the CPU time of each agent (with its guard)
and of the witness, as a share of one core, and what each node sends on its NIC
(heartbeats, witness leases, the peer link). The baseline is the heartbeat rate the
configuration asks for (1 / heartbeat_interval datagrams per second per link).
"""

from __future__ import annotations

import json
import time

import psutil
import pytest

from tests.bench.conftest import ratio, report
from tests.cluster import Cluster
from tests.lab import DEFAULT_TIMING, Lab

pytestmark = pytest.mark.timeout(600)

SECONDS = 30.0
NODES = ("node1", "node2")


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU time of `procs` (those that exited count as zero)."""
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def with_children(pid: int) -> list[psutil.Process]:
    """The process and every descendant it has now."""
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)]


def sent(lab: Lab, node: str) -> tuple[int, int]:
    """(packets, bytes) `node` has sent on eth0 since it came up."""
    link = json.loads(lab.ip(node, "-s", "-j", "link", "show", "eth0"))[0]
    tx = link["stats64"]["tx"]
    return int(tx["packets"]), int(tx["bytes"])


def test_heartbeat_load(lab: Lab) -> None:
    cluster = Cluster(lab).start()
    cluster.wait_healthy_pair("node1")
    assert cluster.witness is not None
    marks = {node: max((int(e["id"]) for e in cluster.events(node)), default=0) for node in NODES}
    procs = {node: with_children(cluster.agent_pid(node)) for node in NODES}
    procs["witness"] = [psutil.Process(cluster.witness.pid)]
    cpu_before = {who: cpu_seconds(p) for who, p in procs.items()}
    nic_before = {node: sent(lab, node) for node in NODES}
    started = time.monotonic()
    # Nothing to wait for: the cluster is meant to sit still while it is measured.
    time.sleep(SECONDS)
    took = time.monotonic() - started
    cpu = {who: (cpu_seconds(p) - cpu_before[who]) / took for who, p in procs.items()}
    nic = {
        node: tuple((b - a) / took for a, b in zip(nic_before[node], sent(lab, node), strict=True))
        for node in NODES
    }
    moved = [
        (node, e["kind"], e["state"], e["reason"])
        for node in NODES
        for e in cluster.events(node, after=marks[node])
    ]
    assert not [m for m in moved if m[1] == "transition"], f"the idle pair moved: {moved}"

    rate = 1 / DEFAULT_TIMING["heartbeat_interval"]
    rows = [[f"{who} CPU", f"{share:.1%} of a core", ""] for who, share in cpu.items()]
    for node, (packets, volume) in nic.items():
        rows.append([f"{node} sends", f"{packets:.1f} packets/s", ratio(packets, rate)])
        rows.append([f"{node} sends", f"{volume / 1000:.2f} kB/s", ""])
    report(
        f"Cost of an idle healthy pair ({took:.0f} s, heartbeat every "
        f"{DEFAULT_TIMING['heartbeat_interval']:g} s)",
        ["what", "figure", "÷ heartbeat rate"],
        rows,
    )
