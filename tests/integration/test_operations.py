"""Planned operations with real agents: swap under load, stop and start, maintenance.

What an operator does on purpose must never put the VIP on both nodes, and must do what
the command says: the roles exchanged, the module stopped (and still stopped after an
agent restart), failover suspended in maintenance.
"""

from __future__ import annotations

import os
import signal

from tests.cluster import VIP, Cluster, demo_module
from tests.integration.support import (
    ClientLoad,
    assert_nothing_changes,
    assert_one_holder,
    last_event_id,
    transitions,
    wait_served_by,
)
from tests.lab import DEFAULT_TIMING, Lab

PEER_TIMEOUT = DEFAULT_TIMING["peer_timeout"]
SERVING = ("PRIM", "ALONE")
# A swap hands over in about a second and a half here; this bound only catches a swap that
# waits for a timeout (a lost peer, the command's own), not a slow machine.
LONGEST_ACCEPTABLE_GAP = 10.0


def test_swap_under_client_load_exchanges_the_roles_and_back(lab: Lab) -> None:
    cluster = Cluster(lab).start()
    cluster.wait_healthy_pair("node1")
    with lab.watch_vip(VIP) as watch, ClientLoad(cluster) as load:
        assert load.wait_answered_by("node1"), load.attempts[-5:]

        # From the primary: it hands the role over.
        swapped = cluster.ctl("node1", "swap", "web")
        assert swapped.returncode == 0, swapped
        assert cluster.state("node1") == "SECOND"
        assert cluster.state("node2") in SERVING
        cluster.wait_state("node2", "PRIM", timeout=10)
        assert load.wait_answered_by("node2"), load.attempts[-5:]

        # From the secondary: it takes the role back.
        back = cluster.ctl("node1", "swap", "web")
        assert back.returncode == 0, back
        assert cluster.state("node1") in SERVING
        cluster.wait_state("node1", "PRIM", timeout=10)
        cluster.wait_state("node2", "SECOND", timeout=10)
        assert load.wait_answered_by("node1"), load.attempts[-5:]
    assert_one_holder(watch)
    adds = [(e.node, e.kind) for e in watch.events]
    assert adds == [("node1", "del"), ("node2", "add"), ("node2", "del"), ("node1", "add")]
    assert load.longest_gap() < LONGEST_ACCEPTABLE_GAP, load.longest_gap()


def test_stop_all_stops_both_nodes_and_start_brings_the_module_back(lab: Lab) -> None:
    cluster = Cluster(lab).start()
    cluster.wait_healthy_pair("node1")
    with lab.watch_vip(VIP) as watch:
        stopped = cluster.ctl("node1", "stop", "web", "--all")
        assert stopped.returncode == 0, stopped
        assert cluster.state("node1") == "STOP"
        node2 = cluster.wait_state("node2", "STOP", timeout=10)
        assert "stop --all" in node2["reason"], node2
        assert VIP not in lab.addresses("node1") | lab.addresses("node2")
        assert cluster.module_pids("node1") == [] and cluster.module_pids("node2") == []

        started = cluster.ctl("node2", "start", "web")
        assert started.returncode == 0, started
        cluster.wait_state("node2", SERVING, timeout=10)
        started = cluster.ctl("node1", "start", "web")
        assert started.returncode == 0, started
        cluster.wait_state("node1", "SECOND", timeout=10)
        cluster.wait_state("node2", "PRIM", timeout=10)
        wait_served_by(cluster, "node2")
    assert_one_holder(watch)


def test_stop_is_remembered_across_an_agent_restart(lab: Lab) -> None:
    cluster = Cluster(lab).start()
    cluster.wait_healthy_pair("node1")
    with lab.watch_vip(VIP) as watch:
        # A local stop on the primary hands the module to node2.
        stopped = cluster.ctl("node1", "stop", "web")
        assert stopped.returncode == 0, stopped
        cluster.wait_state("node2", SERVING, timeout=10)
        wait_served_by(cluster, "node2")

        restarted_at = last_event_id(cluster, "node1")
        os.kill(cluster.agent_pid("node1"), signal.SIGTERM)
        assert cluster.agents["node1"].wait(30) == 0
        cluster.start_agent("node1")
        node1 = cluster.wait_state("node1", "STOP", timeout=10)
        assert "stopped by the administrator" in node1["reason"], node1
        # From its first decision on: never anything but STOP until started.
        assert {e["state"] for e in transitions(cluster, "node1", after=restarted_at)} <= {"STOP"}

        started = cluster.ctl("node1", "start", "web")
        assert started.returncode == 0, started
        cluster.wait_state("node1", "SECOND", timeout=10)
        cluster.wait_state("node2", "PRIM", timeout=10)
    assert_one_holder(watch)


def test_maintenance_on_both_nodes_suspends_failover_until_turned_off(lab: Lab) -> None:
    cluster = Cluster(lab).start()
    cluster.wait_healthy_pair("node1")
    for node in ("node1", "node2"):
        done = cluster.ctl(node, "maintenance", "on", "web")
        assert done.returncode == 0, done
        module = cluster.module(node)
        assert module is not None and module["maintenance"], module
    with lab.watch_vip(VIP) as watch:
        lab.power_loss("node1")
        assert watch.wait_no_holder(5)
        # node2 must not take over: watch for three peer timeouts, twice what a failover
        # takes, to see that it does not.
        assert_nothing_changes(cluster, 3 * PEER_TIMEOUT, nodes=("node2",), watch=watch)
        node2 = cluster.module("node2")
        assert node2 is not None and node2["state"] == "SECOND", node2
        assert "maintenance" in node2["reason"], node2

        done = cluster.ctl("node2", "maintenance", "off", "web")
        assert done.returncode == 0, done
        cluster.wait_state("node2", "ALONE", timeout=15)
        wait_served_by(cluster, "node2")
    assert_one_holder(watch)


def test_default_primary_takes_the_role_back_on_return_but_not_after_a_swap(lab: Lab) -> None:
    """Failback: the returning default_primary never preempts (it is SECOND first), then the
    roles swap back on their own; a swap an operator made away from it is not undone."""
    cluster = Cluster(lab, modules=[demo_module(default_primary="node1")]).start()
    cluster.wait_healthy_pair("node1")
    with lab.watch_vip(VIP) as watch:
        result = cluster.ctl("node1", "swap", "web")
        assert result.returncode == 0, result.stdout + result.stderr
        cluster.wait_healthy_pair("node2")
        # The operator moved the role on purpose: it stays where it was put.
        assert_nothing_changes(cluster, 3 * PEER_TIMEOUT, watch=watch)

        lab.power_loss("node2")
        cluster.wait_state("node1", ("ALONE",), timeout=15)
        lab.power_on("node2")
        cluster.start_agent("node2")
        cluster.wait_healthy_pair("node1")
        # node2 is not the default primary: it stays secondary.
        assert_nothing_changes(cluster, 3 * PEER_TIMEOUT, watch=watch)

        result = cluster.ctl("node2", "swap", "web")
        assert result.returncode == 0, result.stdout + result.stderr
        cluster.wait_healthy_pair("node2")
        lab.power_loss("node1")
        cluster.wait_state("node2", ("ALONE",), timeout=15)
        lab.power_on("node1")
        cluster.start_agent("node1")
        # The returning default primary comes back as SECOND, then takes its role back.
        back = cluster.wait_state("node1", ("SECOND", "PRIM"), timeout=30)
        assert back["state"] == "SECOND" or any(
            e["state"] == "SECOND" for e in cluster.events("node1")
        )
        cluster.wait_healthy_pair("node1")
        assert "asked for the primary role" in " ".join(
            e["reason"] for e in cluster.events("node2")
        )
    assert_one_holder(watch)
