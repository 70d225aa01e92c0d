"""Failover with real agents: the secondary takes the module over when the primary is lost.

Every scenario records the VIP's address events for its whole length and checks that the
two nodes never held it at the same instant (a witness is configured throughout).
"""

from __future__ import annotations

import json
import time

from tests.cluster import DEMO, DEMO_DIR, VIP, Cluster, demo_module
from tests.integration.support import (
    answering_node,
    assert_one_holder,
    first_event,
    last_event_id,
    transition_to,
    transitions,
    wait_served_by,
    write_script,
)
from tests.lab import DEFAULT_TIMING, Lab

PEER_TIMEOUT = DEFAULT_TIMING["peer_timeout"]


def records_on_disk(lab: Lab, node: str) -> list[dict[str, object]]:
    """The demo's records file in `node`'s own data directory (per node in this lab)."""
    path = lab.node_dir(node) / "srv" / "data" / "records.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_power_loss_of_the_primary_moves_the_module_to_node2(lab: Lab) -> None:
    cluster = Cluster(lab).start()
    cluster.wait_healthy_pair("node1")
    written = cluster.post_record(b"before the power loss")
    assert written is not None and written["node"] == "node1"
    mark = last_event_id(cluster, "node2")

    with lab.watch_vip(VIP) as watch:
        lab.power_loss("node1")
        cluster.wait_state("node2", "ALONE", timeout=10)
        wait_served_by(cluster, "node2")
        after = cluster.post_record(b"after the failover")
        assert after is not None and after["node"] == "node2"

        # node1 boots again: it must not take the VIP back, it becomes the secondary.
        lab.power_on("node1")
        cluster.start_agent("node1")
        cluster.wait_state("node1", "SECOND", timeout=20)
        cluster.wait_state("node2", "PRIM", timeout=10)
        assert answering_node(lab) == "node2"
    assert_one_holder(watch)
    assert [e.node for e in watch.events if e.kind == "add"] == ["node2"]

    took_over = transition_to(cluster, "node2", "ALONE", after=mark)
    assert "peer lost" in took_over["reason"], took_over
    assert "witness granted" in took_over["reason"], took_over
    # The record acknowledged before the power loss is on node1's disk, where it was written.
    assert "before the power loss" in [r["data"] for r in records_on_disk(lab, "node1")]


def test_cut_cable_of_the_primary_makes_it_step_down_and_node2_take_over(lab: Lab) -> None:
    cluster = Cluster(lab).start()
    cluster.wait_healthy_pair("node1")
    mark = last_event_id(cluster, "node1")
    with lab.watch_vip(VIP) as watch:
        lab.cut_link("node1")
        cluster.wait_state("node2", "ALONE", timeout=15)
        wait_served_by(cluster, "node2")
        # node1 can reach neither its peer nor the witness: it cannot renew its lease and
        # must have stepped down (its agent still answers on its local socket).
        node1 = cluster.wait_state("node1", "WAIT", timeout=5)
        assert not node1["vip_held"], node1
        assert VIP not in lab.addresses("node1")
        stepped_down = transition_to(cluster, "node1", "WAIT", after=mark)
        assert "lease" in stepped_down["reason"], stepped_down
        assert "stepping down" in stepped_down["reason"], stepped_down
        assert first_event(watch, "node1", "del").seq < first_event(watch, "node2", "add").seq

        lab.restore_link("node1")
        cluster.wait_state("node1", "SECOND", timeout=20)
        cluster.wait_state("node2", "PRIM", timeout=10)
    assert_one_holder(watch)


def test_cut_cable_of_a_primary_whose_application_stops_slowly_gives_one_holder(
    lab: Lab,
) -> None:
    # A real application (a database flushing its buffers) may take a while to stop: the
    # cut-off primary must still give up the VIP before its lease can pass to node2.
    stop = write_script(lab.tmp_dir / "slow-stop.sh", f"sleep 1\nexec {DEMO}/stop.sh\n")
    module = demo_module(service={"start": str(DEMO / "start.sh"), "stop": str(stop)})
    cluster = Cluster(lab, modules=[module]).start()
    cluster.wait_healthy_pair("node1")
    with lab.watch_vip(VIP) as watch:
        lab.cut_link("node1")
        cluster.wait_state("node2", "ALONE", timeout=15)
        cluster.wait_until("node1 gave the VIP up", lambda: VIP not in lab.addresses("node1"))
        assert not cluster.wait_state("node1", "WAIT", timeout=10)["vip_held"]
    assert_one_holder(watch)


def test_with_the_witness_down_node2_waits_and_takes_over_once_the_witness_returns(
    lab: Lab,
) -> None:
    cluster = Cluster(lab).start()
    cluster.wait_healthy_pair("node1")
    assert cluster.witness is not None
    with lab.watch_vip(VIP) as watch:
        cluster.witness.kill()
        cluster.witness.wait(10)
        cluster.wait_until(
            "node2 sees the witness unreachable",
            lambda: (s := cluster.status("node2")) is not None and not s["witness"]["reachable"],
        )
        # While both nodes run, a lost witness changes nothing for the application.
        assert cluster.state("node1") == "PRIM" and cluster.state("node2") == "SECOND"

        lab.power_loss("node1")
        waiting = cluster.wait_state("node2", "WAIT", timeout=10)
        assert (
            "witness unreachable: not taking over, since node1 may still serve"
            in (waiting["reason"])
        ), waiting
        assert VIP not in lab.addresses("node2")

        # The witness returns with its persisted grants: node1's lease has run out by now,
        # so node2 is granted the role and takes over.
        mark = last_event_id(cluster, "node2")
        returned = time.monotonic()
        cluster.witness = lab.start_witness()
        cluster.wait_state("node2", "ALONE", timeout=15)
        wait_served_by(cluster, "node2")
    assert_one_holder(watch)
    assert first_event(watch, "node2", "add").time > returned, "node2 served without a grant"
    granted = transition_to(cluster, "node2", "ALONE", after=mark)
    assert "witness granted primary" in granted["reason"], granted


def test_first_start_makes_the_default_primary_primary(lab: Lab) -> None:
    cluster = Cluster(lab, modules=[demo_module(default_primary="node2")]).start()
    with lab.watch_vip(VIP) as watch:
        cluster.wait_healthy_pair("node2")
        wait_served_by(cluster, "node2")
    assert_one_holder(watch)
    assert [e.node for e in watch.events if e.kind == "add"] == ["node2"]
    promoted = [e for e in transitions(cluster, "node2") if e["state"] in ("ALONE", "PRIM")]
    assert promoted, transitions(cluster, "node2")
    assert "first start: node2 is the default primary" in promoted[0]["reason"], promoted[0]
    served = [e for e in transitions(cluster, "node1") if e["state"] in ("ALONE", "PRIM")]
    assert served == [], served


def test_a_node_started_alone_the_first_time_waits_until_forced(lab: Lab) -> None:
    cluster = Cluster(lab).start(nodes=("node1",))
    with lab.watch_vip(VIP) as watch:
        waiting = cluster.wait_state("node1", "WAIT", timeout=20)
        cluster.wait_until(
            "node1 says why it waits",
            lambda: (
                (m := cluster.module("node1")) is not None
                and m["reason"] == "first start: waiting for node2 or `prim --force`"
            ),
        )
        assert not waiting["vip_held"]
        assert VIP not in lab.addresses("node1")

        forced = cluster.ctl("node1", "prim", "web", "--force")
        assert forced.returncode == 0, forced
        cluster.wait_state("node1", "ALONE", timeout=10)
        wait_served_by(cluster, "node1")
    assert_one_holder(watch)
    alone = transition_to(cluster, "node1", "ALONE")
    assert "prim --force" in alone["reason"] and "witness granted" in alone["reason"], alone


def test_failing_checker_restarts_locally_then_fails_over(lab: Lab) -> None:
    # The flag lives in the node's private /srv/tandem-demo: only node1's checker sees it.
    flag = f"{DEMO_DIR}/broken"
    module = demo_module(
        checkers=[
            {"type": "command", "command": f"/bin/sh -c 'test ! -e {flag}'", "interval": 0.5}
        ],
        restart={"attempts": 2, "within": 60},
    )
    cluster = Cluster(lab, modules=[module]).start()
    cluster.wait_healthy_pair("node1")
    mark = last_event_id(cluster, "node1")
    with lab.watch_vip(VIP) as watch:
        (lab.node_dir("node1") / "srv" / "broken").write_text("")
        cluster.wait_state("node2", ("PRIM", "ALONE"), timeout=30)
        wait_served_by(cluster, "node2")
        node1 = cluster.wait_state("node1", ("WAIT", "SECOND"), timeout=10)
    assert_one_holder(watch)
    events = cluster.events("node1", after=mark)
    reasons = "\n".join(f"{e['kind']}: {e['reason']}" for e in events)
    restarts = [e for e in events if "restarting the application here" in e["reason"]]
    assert len(restarts) == 2, reasons
    assert all("checker command" in e["reason"] for e in restarts), reasons
    # Then node1 gave the module up, saying why, and only then did it move to node2.
    step_down = transition_to(cluster, "node1", "WAIT", after=mark)
    assert "2 local restart(s) within 60 s did not help" in step_down["reason"], step_down
    assert "checker command" in step_down["reason"], step_down
    assert all(e["id"] < step_down["id"] for e in restarts), reasons
    assert node1["state"] in ("WAIT", "SECOND")
    assert first_event(watch, "node1", "del").seq < first_event(watch, "node2", "add").seq
