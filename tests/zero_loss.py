"""The zero-loss checker: a client appends records through the VIP while the primary loses
power or its agent is killed, again and again; nothing it saw acknowledged may be missing.

The demo application fsyncs each record before its HTTP 200. After each fault the node that
takes over must hold every acknowledged record; once the failed node is back and resynced,
both nodes' directories must hold the same bytes. Used by the integration test (10 cycles in
CI) and by `make bench` (more cycles, with the figures of each).
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.cluster import Cluster
from tests.integration.support import last_event_id
from tests.lab import Lab, wait_for


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


@dataclass(frozen=True)
class Cycle:
    """What one fault cost: how it was made, and how long until each step was done."""

    fault: str  # "power loss" or "agent kill"
    failed: str  # the node that failed
    serving_s: float  # fault → the other node serves (ALONE or PRIM)
    resynced_s: float  # failed node's agent started → it is an in-sync secondary again
    checked: int  # acknowledged records found on the node that took over
    resync: str  # how the returning node was brought back, as the survivor said it


def run_cycles(lab: Lab, cluster: Cluster, cycles: int) -> list[Cycle]:
    """Fault the primary `cycles` times (power loss and agent kill in turn) under a writer;
    AssertionError at the first acknowledged record missing, a full comparison where the
    activity log should have made an incremental resync, or copies that differ."""
    cluster.wait_healthy_pair("node1")
    cluster.wait_in_sync("node2")
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    primary, standby = "node1", "node2"
    done: list[Cycle] = []
    with Writer(cluster) as writer:
        for cycle in range(cycles):
            assert writer.wait_more(5), "the writer is stuck"
            threading.Event().wait(rng.uniform(0.0, 0.5))
            power_loss = cycle % 2 == 0
            mark = last_event_id(cluster, standby)
            faulted = time.monotonic()
            if power_loss:
                lab.power_loss(primary)
            else:
                os.kill(cluster.agent_pid(primary), 9)
            cluster.wait_state(standby, ("ALONE", "PRIM"), timeout=30)
            serving = time.monotonic() - faulted
            writer.pause()
            assert_all_acked_present(cluster, standby, writer)
            checked = len(writer.acked)
            writer.resume()
            if power_loss:
                lab.power_on(primary)
            started = time.monotonic()
            cluster.start_agent(primary)
            cluster.wait_in_sync(primary)
            resynced = time.monotonic() - started
            # The returning node gave back what it held in flight by its activity log: an
            # incremental resync, not a comparison of every block.
            said = [e["reason"] for e in cluster.events(standby, after=mark)]
            connects = [r for r in said if r.startswith(f"mirroring to {primary}:")]
            assert connects and "incremental resync" in connects[-1], "\n".join(said)
            writer.pause()
            wait_nothing_pending(cluster, standby)
            assert tree_digest(cluster.data_dir(primary)) == tree_digest(cluster.data_dir(standby))
            done.append(
                Cycle(
                    "power loss" if power_loss else "agent kill",
                    primary,
                    serving,
                    resynced,
                    checked,
                    connects[-1].partition(": ")[2],
                )
            )
            writer.resume()
            primary, standby = standby, primary
    assert len(writer.acked) > cycles * 5
    return done
