"""Self-fencing with real agents: a dead, frozen or stopped agent leaves nothing serving.

The guard must remove node1's VIP and kill its application before node2's peer timeout
runs out, so the address events show node1's delete before node2's add, and node1's module
cgroup is empty before node2 answers for the VIP.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from tests.cluster import VIP, Cluster, demo_module
from tests.integration.support import (
    assert_one_holder,
    first_event,
    last_event_id,
    transition_to,
    wait_served_by,
    write_script,
)
from tests.lab import Lab, pids_in_netns, wait_for


def guard_pid(agent_pid: int) -> int:
    """The fence guard started by the agent `agent_pid` (its child running agent.guard)."""
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    for child in children:
        with contextlib.suppress(OSError):
            if b"agent.guard" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise AssertionError(f"the agent {agent_pid} has no fence guard among {children}")


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_module_empty(cluster: Cluster, node: str, timeout: float = 10) -> float:
    """Wait until `node`'s module cgroup has no process; the time.monotonic() it was seen so."""
    cluster.wait_until(
        f"{node}'s application is gone", lambda: not cluster.module_pids(node), timeout
    )
    return time.monotonic()


def test_kill_9_of_the_agent_fences_node1_before_node2_takes_over(lab: Lab) -> None:
    cluster = Cluster(lab).start()
    cluster.wait_healthy_pair("node1")
    agent = cluster.agent_pid("node1")
    guard = guard_pid(agent)
    assert alive(guard)
    assert cluster.module_pids("node1"), "the demo app runs in node1's module cgroup"

    with lab.watch_vip(VIP) as watch:
        os.kill(agent, signal.SIGKILL)  # the agent only: its guard is a separate process
        cluster.agents["node1"].wait(10)
        emptied = wait_module_empty(cluster, "node1")
        # Its job done, the guard leaves too.
        assert wait_for(lambda: not alive(guard), 10)
        assert watch.wait_holder("node2", 15)
        cluster.wait_state("node2", "ALONE", timeout=10)
        wait_served_by(cluster, "node2")
    assert_one_holder(watch)
    removed = first_event(watch, "node1", "del")
    added = first_event(watch, "node2", "add")
    assert removed.seq < added.seq, watch.events
    assert emptied < added.time, "node1's application still ran when node2 added the VIP"


def test_frozen_agent_is_fenced_and_comes_back_as_secondary(lab: Lab) -> None:
    cluster = Cluster(lab).start()
    cluster.wait_healthy_pair("node1")
    agent = cluster.agent_pid("node1")
    mark = last_event_id(cluster, "node1")

    with lab.watch_vip(VIP) as watch:
        os.kill(agent, signal.SIGSTOP)
        try:
            # The guard notices the missing feeds and fences: VIP and application gone.
            assert watch.wait_no_holder(10), watch.events
            emptied = wait_module_empty(cluster, "node1")
            assert watch.wait_holder("node2", 15), watch.events
            cluster.wait_state("node2", "ALONE", timeout=10)
            wait_served_by(cluster, "node2")
        finally:
            os.kill(agent, signal.SIGCONT)
        # Thawed, node1 learns it was fenced and that node2 serves: it must not serve again.
        cluster.wait_state("node1", "SECOND", timeout=20)
        cluster.wait_state("node2", "PRIM", timeout=10)
        assert VIP not in lab.addresses("node1")
    assert_one_holder(watch)
    assert first_event(watch, "node1", "del").seq < first_event(watch, "node2", "add").seq
    assert emptied < first_event(watch, "node2", "add").time
    assert [e.node for e in watch.events if e.kind == "add"] == ["node2"], watch.events
    fenced = [e for e in cluster.events("node1", after=mark) if e["kind"] == "fence"]
    assert fenced, cluster.events("node1", after=mark)
    assert "stalled" in fenced[0]["reason"], fenced[0]


def test_sigterm_of_the_agent_releases_the_vip_and_node2_takes_over_at_once(lab: Lab) -> None:
    cluster = Cluster(lab).start()
    cluster.wait_healthy_pair("node1")
    agent = cluster.agent_pid("node1")
    mark = last_event_id(cluster, "node2")

    with lab.watch_vip(VIP) as watch:
        os.kill(agent, signal.SIGTERM)
        assert cluster.agents["node1"].wait(30) == 0
        assert VIP not in lab.addresses("node1")
        assert not cluster.module_pids("node1")
        cluster.wait_state("node2", "ALONE", timeout=10)
        wait_served_by(cluster, "node2")
    assert_one_holder(watch)
    assert first_event(watch, "node1", "del").seq < first_event(watch, "node2", "add").seq
    # node1 said it was leaving: node2 did not have to wait for the peer timeout.
    took_over = transition_to(cluster, "node2", "ALONE", after=mark)
    assert "peer lost" not in took_over["reason"], took_over


def test_stop_ends_an_application_that_daemonized_itself(lab: Lab) -> None:
    # The daemon leaves its session (setsid), is orphaned (the shell exits at once) and
    # ignores SIGTERM: only the module's cgroup still knows it.
    marker = "31337"
    start = write_script(
        lab.tmp_dir / "daemon-start.sh",
        f"setsid sh -c 'trap \"\" TERM; exec sleep {marker}' </dev/null >/dev/null 2>&1 &\n",
    )
    stop = write_script(lab.tmp_dir / "daemon-stop.sh", "exit 0\n")
    module = demo_module(service={"start": str(start), "stop": str(stop)}, checkers=[])
    cluster = Cluster(lab, modules=[module]).start(nodes=("node1",))
    forced = cluster.ctl("node1", "prim", "web", "--force")
    assert forced.returncode == 0, forced

    def sleepers() -> list[int]:
        found = []
        for pid in pids_in_netns(lab.ns["node1"]):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes() == f"sleep\0{marker}\0".encode():
                    found.append(pid)
        return found

    assert wait_for(lambda: bool(sleepers()), 10), "the daemon did not start"
    assert set(sleepers()) <= set(cluster.module_pids("node1"))

    stopped = cluster.ctl("node1", "stop", "web")
    assert stopped.returncode == 0, stopped
    assert cluster.state("node1") == "STOP"
    assert sleepers() == []
    assert cluster.module_pids("node1") == []
