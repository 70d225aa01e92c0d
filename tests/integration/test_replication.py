"""Replication on a real cluster: what the primary wrote is on the secondary, through failures.

The demo application appends numbered records, each fsynced before its HTTP 200;
its data directory is replicated. Every record a client saw acknowledged must be
on whichever node serves next, and once a returning node has resynced, both
nodes' directories hold the same bytes.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core import mirror_frames as mf
from tests.cluster import DEMO_DIR, Cluster
from tests.integration.support import last_event_id
from tests.lab import Lab
from tests.zero_loss import (
    Writer,
    assert_all_acked_present,
    run_cycles,
    tree_digest,
    wait_nothing_pending,
)

# The floor for CI; `make bench` runs more (BENCH_ZERO_LOSS_CYCLES, validated there).
CYCLES = 10


@pytest.fixture
def cluster(lab: Lab) -> Iterator[Cluster]:
    running = Cluster(lab).start()
    try:
        yield running
    finally:
        running.stop_agents()


def test_records_written_on_the_primary_are_on_the_secondary(lab: Lab, cluster: Cluster) -> None:
    cluster.wait_healthy_pair("node1")
    cluster.wait_in_sync("node2")
    for n in range(20):
        assert cluster.post_record(f"mirrored {n}".encode()) is not None
    primary = cluster.records("node1")
    assert len(primary) >= 20
    assert cluster.records("node2") == primary
    figures = cluster.replication("node1")
    assert figures["role"] == "primary" and figures["connected"]


def test_no_acknowledged_record_is_lost_through_power_losses_and_agent_kills(
    lab: Lab, cluster: Cluster
) -> None:
    # The checks are run_cycles' own: every acknowledged record on the node that took over
    # after each fault, an incremental resync for each return, identical copies after it.
    run_cycles(lab, cluster, CYCLES)


def test_after_both_nodes_lose_power_the_resync_is_incremental_and_loses_nothing(
    lab: Lab, cluster: Cluster
) -> None:
    """The whole cluster loses power while a client writes: whichever node serves again, what
    the old primary held in flight is found by its activity log, not a comparison of all."""
    cluster.wait_healthy_pair("node1")
    cluster.wait_in_sync("node2")
    marks = {node: last_event_id(cluster, node) for node in ("node1", "node2")}
    with Writer(cluster) as writer:
        assert writer.wait_more(10), "the writer is stuck"
        lab.power_loss("node1")
        lab.power_loss("node2")
        writer.pause()
    for node in ("node1", "node2"):
        lab.power_on(node)
        cluster.start_agent(node)
    cluster.wait_until("a node serves again", lambda: cluster.primary() is not None, timeout=60)
    primary = cluster.primary()
    assert primary is not None
    other = "node2" if primary == "node1" else "node1"
    # Both came back on the same generation, so the secondary says it is in sync at once;
    # the primary's resync (its new generation) is what gives the places back.
    cluster.wait_until(
        "the primary resynced its peer",
        lambda: any(
            e["reason"].startswith("resync done")
            for e in cluster.events(primary, after=marks[primary])
        ),
        timeout=60,
    )
    cluster.wait_in_sync(other)
    assert_all_acked_present(cluster, primary, writer)
    wait_nothing_pending(cluster, primary)
    assert tree_digest(cluster.data_dir(primary)) == tree_digest(cluster.data_dir(other))
    said = [e["reason"] for e in cluster.events(primary, after=marks[primary])]
    connects = [r for r in said if r.startswith(f"mirroring to {other}:")]
    assert connects and "incremental resync" in connects[-1], "\n".join(said)


def test_a_split_brain_is_reported_and_resolve_keeps_one_side_with_the_other_in_quarantine(
    lab: Lab,
) -> None:
    cluster = Cluster(lab, witness=False).start()
    try:
        cluster.wait_healthy_pair("node1")
        cluster.wait_in_sync("node2")
        assert cluster.post_record(b"before the split") is not None

        lab.cut_link("node1")  # full isolation: node1 keeps serving, node2 takes over
        cluster.wait_state("node2", "ALONE", timeout=30)
        cluster.wait_state("node1", "ALONE", timeout=30)
        for node in ("node1", "node2"):
            wrote = cluster.in_mount(node, f"echo written-on-{node} > {DEMO_DIR}/data/{node}.txt")
            assert wrote.returncode == 0, wrote.stderr
        cluster.wait_until(
            "node2 answers the client during the split",
            lambda: cluster.post_record(b"during the split", timeout=1.0) is not None,
        )

        lab.restore_link("node1")
        cluster.wait_until(
            "both nodes report the split brain",
            lambda: all(
                "split brain" in str(cluster.replication(node).get("problem"))
                for node in ("node1", "node2")
            ),
            timeout=30,
        )
        primary = cluster.primary()
        assert primary is not None
        other = "node2" if primary == "node1" else "node1"
        refused = cluster.ctl(primary, "resolve", "web", "--keep", other)
        assert refused.returncode == 1 and "is not primary" in refused.stderr, refused

        kept_side, lost_side = f"{primary}.txt", f"{other}.txt"
        done = cluster.ctl(other, "resolve", "web", "--keep", primary)
        assert done.returncode == 0, done.stderr
        cluster.wait_in_sync(other)
        assert tree_digest(cluster.data_dir(primary)) == tree_digest(cluster.data_dir(other))
        assert (cluster.data_dir(other) / kept_side).exists()
        assert not (cluster.data_dir(other) / lost_side).exists()
        quarantined = list((lab.node_dir(other) / "state" / "quarantine").glob("web-*/0/*"))
        names = {p.name for p in quarantined}
        assert lost_side in names, f"quarantine holds {sorted(names)}"
        lost = next(p for p in quarantined if p.name == lost_side)
        assert "written-on" in lost.read_text()
        status = cluster.module(other)
        assert status is not None and status["replication"]["quarantine_bytes"] > 0
        assert status["replication"]["problem"] is None
        verify = cluster.ctl(primary, "verify", "web")
        assert verify.returncode == 0 and "same data" in verify.stdout, verify
    finally:
        cluster.stop_agents()


def test_a_dead_replication_link_ends_the_wait_after_ack_timeout_and_resyncs_later(
    lab: Lab,
) -> None:
    cluster = Cluster(lab, timing={"ack_timeout": 2.0}).start()
    try:
        cluster.wait_healthy_pair("node1")
        cluster.wait_in_sync("node2")
        before = cluster.module("node1")
        assert before is not None
        generation = before["replication"]["generation"]

        lab.cut_replication("node2")  # heartbeats still flow: nobody fails over
        answer = cluster.post_record(b"while the link is dead", timeout=30)
        assert answer is not None, "the write must complete once the primary journals it"
        cluster.wait_until(
            "node1 serves on, in a new data generation, node2 no longer in sync",
            lambda: (
                (m := cluster.module("node1")) is not None
                and m["replication"]["generation"] != generation
                and not cluster.replication("node2").get("in_sync")
            ),
        )
        assert cluster.state("node1") in ("PRIM", "ALONE")
        assert cluster.state("node2") in ("SECOND", "WAIT")

        lab.restore_replication("node2")
        cluster.wait_in_sync("node2")
        wait_nothing_pending(cluster, "node1")
        assert cluster.records("node2") == cluster.records("node1")
        assert "while the link is dead" in cluster.records("node2").values()
    finally:
        cluster.stop_agents()


def test_a_full_disk_on_the_secondary_is_reported_and_loses_no_acknowledged_data(
    lab: Lab,
) -> None:
    small = lab.tmp_dir / "small-disk"  # unmounted by the lab's teardown, like all below it
    small.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tandem-test", str(small)], check=True)
    cluster = Cluster(lab)
    try:
        cluster.start(nodes=("node1",))
        # node2's replicated directory is that small disk (bound over it in its namespace)
        cluster.data_dir("node2").mkdir(parents=True)
        cluster.agents["node2"] = lab.start_agent(
            "node2",
            cluster.config,
            private_dirs={DEMO_DIR: Path("srv"), f"{DEMO_DIR}/data": small},
        )
        cluster.wait_healthy_pair("node1")
        cluster.wait_in_sync("node2")
        big = f"{DEMO_DIR}/data/big.bin"
        script = f"head -c 8M /dev/urandom > {big} && sync {big} && sha256sum {big}"
        done = cluster.in_mount("node1", script)
        assert done.returncode == 0, f"the application saw an error: {done.stderr}"
        written = done.stdout.split()[0]
        assert hashlib.sha256((cluster.data_dir("node1") / "big.bin").read_bytes()).hexdigest() == (
            written
        )
        cluster.wait_until(
            "node2 reports the full disk in its event log",
            lambda: "No space left" in cluster.ctl("node2", "logs", "web", "-n", "50").stdout,
        )
        assert not cluster.replication("node2").get("in_sync")
        assert cluster.post_record(b"after the disk filled", timeout=10) is not None
    finally:
        cluster.stop_agents()


def test_forged_replication_streams_are_refused_and_logged(lab: Lab, cluster: Cluster) -> None:
    cluster.wait_healthy_pair("node1")
    cluster.wait_in_sync("node2")
    forged_key = bytes(32)  # an attacker without the cluster key
    hello = mf.encode_json({"cluster": "lab", "module": "web", "node": "node1", "nonce": "00" * 16})
    attempts = [
        b"GET / HTTP/1.0\r\n\r\n",  # not our protocol at all
        mf.encode(mf.base_key(forged_key), mf.FrameKind.HELLO, 0, hello),  # wrong key
    ]
    for attempt in attempts:
        sock = lab.socket("client", socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(5)
            sock.connect(("198.18.0.2", 7702))
            sock.sendall(attempt)
            assert sock.recv(100) == b"", "a forged stream must be closed without an answer"
        finally:
            sock.close()
    cluster.wait_until(
        "node2 logs both refusals",
        lambda: (
            len(
                [
                    e
                    for e in cluster.api_get("node2", "/api/v1/events/log") or []
                    if "refused a" in e["reason"]
                ]
            )
            >= 2
        ),
    )
    assert cluster.post_record(b"still mirrored") is not None
    assert cluster.records("node2") == cluster.records("node1")
    assert cluster.replication("node2").get("in_sync")
