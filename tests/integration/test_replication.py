"""Replication on a real cluster: what the primary wrote is on the secondary, through failures.

The demo application appends numbered records, each fsynced before its HTTP 200;
its data directory is replicated. Every record a client saw acknowledged must be
on whichever node serves next, and once a returning node has resynced, both
nodes' directories hold the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.core import mirror_frames as mf
from tests.cluster import DEMO_DIR, Cluster
from tests.integration.support import last_event_id
from tests.lab import Lab, wait_for

CYCLES = int(os.environ.get("TANDEM_ZERO_LOSS_CYCLES", "10"))


def tree_digest(root: Path) -> dict[str, str]:
    """Every regular file under `root` with the hash of its bytes."""
    digests = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            digests[str(path.relative_to(root))] = hashlib.blake2b(path.read_bytes()).hexdigest()
    return digests


def wait_nothing_pending(cluster: Cluster, primary: str) -> None:
    cluster.wait_until(
        "nothing left to mirror",
        lambda: cluster.replication(primary).get("pending_bytes") == 0,
    )


@dataclass
class Writer:
    """A client appending records through the VIP; remembers what was acknowledged."""

    cluster: Cluster
    acked: dict[str, int] = field(default_factory=dict)  # text -> seq
    by: dict[str, str] = field(default_factory=dict)  # text -> the node that acknowledged it
    paused: threading.Event = field(default_factory=threading.Event)
    idle: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _n: int = 0

    def __enter__(self) -> Writer:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.paused.is_set():
                self.idle.set()
                self._stop.wait(0.05)
                continue
            self.idle.clear()
            self._n += 1
            text = f"record {self._n}"
            answer = self.cluster.post_record(text.encode(), timeout=1.0)
            if answer is not None:
                self.acked[text] = int(answer["seq"])
                self.by[text] = f"{answer.get('node')} at {time.monotonic():.3f}"
            else:
                self._stop.wait(0.05)

    def wait_more(self, count: int, timeout: float = 30) -> bool:
        start = len(self.acked)
        return wait_for(lambda: len(self.acked) >= start + count, timeout)

    def pause(self) -> None:
        self.paused.set()
        assert self.idle.wait(10), "the writer did not pause"

    def resume(self) -> None:
        self.paused.clear()


def assert_all_acked_present(cluster: Cluster, node: str, writer: Writer) -> None:
    present = set(cluster.records(node).values())
    missing = [text for text in list(writer.acked) if text not in present]
    if not missing:
        return
    detail = [
        f"{text} (seq {writer.acked[text]}) acknowledged by {writer.by.get(text)}"
        for text in missing[:5]
    ]
    logs = f"\n--- node1 ---\n{cluster.log('node1')}\n--- node2 ---\n{cluster.log('node2')}"
    tail = (cluster.data_dir(node) / "records.log").read_bytes()[-600:]
    raise AssertionError(
        f"{len(missing)} acknowledged records missing on {node} (now {time.monotonic():.3f}): "
        f"{detail}; its records.log ends with {tail!r}{logs}"
    )


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
    cluster.wait_healthy_pair("node1")
    cluster.wait_in_sync("node2")
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    primary, standby = "node1", "node2"
    with Writer(cluster) as writer:
        for cycle in range(CYCLES):
            assert writer.wait_more(5), "the writer is stuck"
            threading.Event().wait(rng.uniform(0.0, 0.5))
            power_loss = cycle % 2 == 0
            mark = last_event_id(cluster, standby)
            if power_loss:
                lab.power_loss(primary)
            else:
                os.kill(cluster.agent_pid(primary), 9)
            cluster.wait_state(standby, ("ALONE", "PRIM"), timeout=30)
            writer.pause()
            assert_all_acked_present(cluster, standby, writer)
            writer.resume()
            if power_loss:
                lab.power_on(primary)
            cluster.start_agent(primary)
            cluster.wait_in_sync(primary)
            # The returning node gave back what it held in flight by its activity log: an
            # incremental resync, not a comparison of every block.
            said = [e["reason"] for e in cluster.events(standby, after=mark)]
            connects = [r for r in said if r.startswith(f"mirroring to {primary}:")]
            assert connects and "incremental resync" in connects[-1], "\n".join(said)
            writer.pause()
            wait_nothing_pending(cluster, standby)
            assert tree_digest(cluster.data_dir(primary)) == tree_digest(cluster.data_dir(standby))
            writer.resume()
            primary, standby = standby, primary
    assert len(writer.acked) > CYCLES * 5


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
