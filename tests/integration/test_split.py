"""Partial cuts with real agents: heartbeats lost while the LAN still works, one network of two.

A heartbeat-only cut must never give two primaries: with a witness node1 keeps its lease,
without one node2 sees that the VIP still answers on the LAN. Losing one of two heartbeat
networks is not a failover at all.
"""

from __future__ import annotations

from tests.cluster import VIP, Cluster
from tests.integration.support import (
    answering_node,
    assert_nothing_changes,
    assert_one_holder,
    last_event_id,
    transition_to,
)
from tests.lab import DEFAULT_TIMING, Lab

PEER_TIMEOUT = DEFAULT_TIMING["peer_timeout"]


def test_heartbeat_cut_with_witness_keeps_node1_primary_and_node2_waiting(lab: Lab) -> None:
    cluster = Cluster(lab).start()
    cluster.wait_healthy_pair("node1")
    mark = last_event_id(cluster, "node2")
    with lab.watch_vip(VIP) as watch:
        lab.cut_heartbeats("node1")
        waiting = cluster.wait_state("node2", "WAIT", timeout=10)
        cluster.wait_until(
            "node2 says the witness lease is node1's",
            lambda: (
                "witness: lease held by node1" in str((cluster.module("node2") or {})["reason"])
            ),
        )
        assert cluster.wait_state("node1", "ALONE", timeout=5)["vip_held"]
        assert answering_node(lab) == "node1"
        # node1 renews its lease every heartbeat: node2 must keep waiting. Watch for three
        # peer timeouts, long enough for any lease node2 could wrongly be granted to show.
        assert_nothing_changes(cluster, 3 * PEER_TIMEOUT, watch=watch)
        assert answering_node(lab) == "node1"

        lab.restore_heartbeats("node1")
        cluster.wait_state("node2", "SECOND", timeout=10)
        cluster.wait_state("node1", "PRIM", timeout=10)
    assert_one_holder(watch)
    assert watch.events == [], "the VIP never moved"
    assert waiting["vip_held"] is False
    assert "peer lost" in transition_to(cluster, "node2", "WAIT", after=mark)["reason"]


def test_heartbeat_cut_without_witness_keeps_node2_waiting_while_the_vip_answers(
    lab: Lab,
) -> None:
    cluster = Cluster(lab, witness=False).start()
    cluster.wait_healthy_pair("node1")
    status = cluster.status("node2")
    assert status is not None and not status["witness"]["configured"]
    with lab.watch_vip(VIP) as watch:
        lab.cut_heartbeats("node1")
        cluster.wait_state("node2", "WAIT", timeout=10)
        cluster.wait_until(
            "node2 says the VIP still answers",
            lambda: "still answers on the LAN" in str((cluster.module("node2") or {})["reason"]),
        )
        assert cluster.wait_state("node1", "ALONE", timeout=5)["vip_held"]
        # Each probe finds the VIP answering: node2 must not take over. Watch for three
        # peer timeouts (several probe rounds) to see that it does not.
        assert_nothing_changes(cluster, 3 * PEER_TIMEOUT, watch=watch)
        assert answering_node(lab) == "node1"

        lab.restore_heartbeats("node1")
        cluster.wait_state("node2", "SECOND", timeout=10)
        cluster.wait_state("node1", "PRIM", timeout=10)
    assert_one_holder(watch)
    assert watch.events == [], "the VIP never moved"


def test_losing_one_of_two_heartbeat_networks_is_not_a_failover(lab2: Lab) -> None:
    cluster = Cluster(lab2).start()
    cluster.wait_healthy_pair("node1")
    with lab2.watch_vip(VIP) as watch:
        lab2.cut_link("node1", net=1)

        def links(node: str) -> dict[int, bool]:
            status = cluster.status(node)
            assert status is not None
            return {link["index"]: link["up"] for link in status["peer"]["links"]}

        cluster.wait_until(
            "both nodes see link 1 down and link 0 up",
            lambda: links("node1") == {0: True, 1: False} and links("node2") == {0: True, 1: False},
        )
        # A single link still carries the heartbeats: nothing may happen. Three peer
        # timeouts is far longer than a lost peer would take to be acted on.
        assert_nothing_changes(cluster, 3 * PEER_TIMEOUT, watch=watch)
        status = cluster.status("node2")
        assert status is not None and status["peer"]["reachable"]
        assert cluster.state("node1") == "PRIM" and cluster.state("node2") == "SECOND"

        lab2.restore_link("node1", net=1)
        cluster.wait_until(
            "link 1 is up again", lambda: links("node1") == {0: True, 1: True}, timeout=10
        )
    assert_one_holder(watch)
    assert watch.events == []
