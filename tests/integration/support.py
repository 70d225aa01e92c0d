"""Observations the failover system tests share: VIP holders, quiet periods, client load.

Nothing here changes the cluster; it only looks at it (through the lab, the agents' API and
the VIP watch) and fails with a message that says what was seen.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.cluster import DEMO_PORT, VIP, Cluster
from tests.lab import AddrEvent, Lab, VipWatch, wait_for

NODES = ("node1", "node2")


def write_script(path: Path, body: str) -> Path:
    """Write an executable shell script (`body` after the #! line) and return its path."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def assert_one_holder(watch: VipWatch) -> None:
    """The VIP was never held by both nodes at the same instant while `watch` recorded."""
    most = watch.holders_at_any_instant()
    assert most <= 1, f"both nodes held {watch.ip} at once; address events: {watch.events}"


def first_event(watch: VipWatch, node: str, kind: str) -> AddrEvent:
    """The first `kind` ("add" or "del") event of the VIP on `node`, or fail."""
    for event in watch.events:
        if event.node == node and event.kind == kind:
            return event
    raise AssertionError(f"no {kind} of {watch.ip} on {node}; address events: {watch.events}")


def last_event_id(cluster: Cluster, node: str, name: str = "web") -> int:
    """The id of the latest event in `node`'s log (0 if there is none)."""
    events = cluster.events(node, name)
    return int(events[-1]["id"]) if events else 0


def transitions(
    cluster: Cluster, node: str, after: int = 0, name: str = "web"
) -> list[dict[str, Any]]:
    """`node`'s state transitions for the module after event id `after`, oldest first."""
    return [e for e in cluster.events(node, name, after) if e["kind"] == "transition"]


def transition_to(
    cluster: Cluster, node: str, state: str, after: int = 0, name: str = "web"
) -> dict[str, Any]:
    """The first transition of `node` into `state` after event id `after`, or fail."""
    for event in transitions(cluster, node, after, name):
        if event["state"] == state:
            return event
    raise AssertionError(
        f"{node} never went {state} after event {after}; its transitions: "
        f"{[(e['state'], e['reason']) for e in transitions(cluster, node, after, name)]}"
    )


def answering_node(lab: Lab) -> str | None:
    """The node the demo application behind the VIP says it runs on (None if no answer)."""
    try:
        answer = lab.client_http("GET", f"http://{VIP}:{DEMO_PORT}/records", timeout=1.0)
    except OSError:
        return None
    if answer.status != 200:
        return None
    node = answer.json().get("node")
    return str(node) if node is not None else None


def wait_served_by(cluster: Cluster, node: str, timeout: float = 20) -> None:
    """Wait until the demo application answers through the VIP from `node`."""
    cluster.wait_until(
        f"the demo answers through the VIP from {node}",
        lambda: answering_node(cluster.lab) == node,
        timeout,
    )


def states(cluster: Cluster, name: str = "web") -> dict[str, str | None]:
    """Each running agent's state of the module (None where the agent does not answer)."""
    return {node: cluster.state(node, name) for node in cluster.agents}


def assert_nothing_changes(
    cluster: Cluster,
    seconds: float,
    nodes: Sequence[str] = NODES,
    watch: VipWatch | None = None,
    name: str = "web",
) -> None:
    """For `seconds`, the module's state on `nodes` stays as it is and no transition is logged.

    States are polled (a change is seen at once) and the event logs are read at the end, so
    even a change shorter than a poll interval is caught. With a watch, the VIP must not be
    added or removed either.
    """
    before = {node: cluster.state(node, name) for node in nodes}
    marks = {node: last_event_id(cluster, node, name) for node in nodes}
    seen_vip = len(watch.events) if watch is not None else 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = {node: cluster.state(node, name) for node in nodes}
        assert now == before, f"states changed from {before} to {now}"
        time.sleep(0.1)
    for node in nodes:
        moved = transitions(cluster, node, marks[node], name)
        assert not moved, f"{node} changed state: {[(e['state'], e['reason']) for e in moved]}"
    if watch is not None:
        assert watch.events[seen_vip:] == [], f"the VIP moved: {watch.events[seen_vip:]}"


@dataclass
class Attempt:
    """One request of the client: when it was sent and answered, and which node answered."""

    sent: float
    done: float
    node: str | None  # None: the request failed


@dataclass
class ClientLoad:
    """A client posting records through the VIP back to back in a thread, as a user would."""

    cluster: Cluster
    attempts: list[Attempt] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> ClientLoad:
        self._thread = threading.Thread(target=self._run, name="client-load", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            sent = time.monotonic()
            answer = self.cluster.post_record(f"load {n}".encode(), timeout=0.5)
            node = None if answer is None else str(answer.get("node"))
            self.attempts.append(Attempt(sent, time.monotonic(), node))
            if answer is None:
                time.sleep(0.02)  # a refused connection returns at once: do not spin

    def answered_by(self, node: str) -> int:
        """How many requests `node` answered."""
        return sum(1 for a in list(self.attempts) if a.node == node)

    def wait_answered_by(self, node: str, count: int = 3, timeout: float = 20) -> bool:
        """Wait until `node` answered `count` more requests than it had when called."""
        start = self.answered_by(node)
        return wait_for(lambda: self.answered_by(node) >= start + count, timeout)

    def longest_gap(self) -> float:
        """The longest time between two answered requests (seconds)."""
        answered = [a.done for a in list(self.attempts) if a.node is not None]
        return max((b - a for a, b in itertools.pairwise(answered)), default=0.0)

    def failures(self) -> int:
        """How many requests got no answer."""
        return sum(1 for a in list(self.attempts) if a.node is None)
