"""The agent as a process: systemd readiness and watchdog, and refusals before it acts."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

from tests.cluster import Cluster, demo_module
from tests.lab import Lab, wait_for


def test_agent_reports_ready_after_its_first_decision_and_feeds_the_watchdog(
    lab: Lab, tmp_path: Path
) -> None:
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(0.5)
    messages: list[str] = []
    cluster = Cluster(lab)
    try:
        lab.start_agent("node1", cluster.config, env={"NOTIFY_SOCKET": str(notify_path)},
                        private_dirs={"/srv/tandem-demo": Path("srv")})  # fmt: skip

        def heard(text: str) -> bool:
            with contextlib.suppress(TimeoutError):
                messages.append(listener.recv(4096).decode())
            return any(text in m for m in messages)

        assert wait_for(lambda: heard("READY=1"), 20), messages
        assert wait_for(lambda: heard("WATCHDOG=1"), 5), messages
        # READY comes once; the watchdog is fed on every decision cycle.
        watchdog_before = sum("WATCHDOG=1" in m for m in messages)
        assert wait_for(
            lambda: heard("") and sum("WATCHDOG=1" in m for m in messages) > watchdog_before + 2,
            5,
        )
        assert sum("READY=1" in m for m in messages) == 1
    finally:
        listener.close()


def test_agent_refuses_a_vip_interface_missing_on_its_node(lab: Lab) -> None:
    module = demo_module(vip={"address": "198.18.0.100/24", "interface": "eth9"})
    cluster = Cluster(lab, modules=[module])
    proc = lab.start_agent("node1", cluster.config)
    assert proc.wait(20) == 1
    log = cluster.log("node1")
    assert "modules[0].vip" in log and "eth9" in log
    assert "Traceback" not in log
    assert "198.18.0.100" not in lab.addresses("node1")


def test_agent_refuses_a_broken_configuration_naming_the_key(lab: Lab) -> None:
    cluster = Cluster(lab)
    cluster.config.write_text(cluster.config.read_text().replace("peer_timeout", "peer_timout"))
    proc = lab.start_agent("node1", cluster.config)
    assert proc.wait(20) == 1
    log = cluster.log("node1")
    assert "peer_timout" in log
    assert "Traceback" not in log


def test_agent_refuses_to_start_when_its_heartbeat_port_is_taken(lab: Lab) -> None:
    cluster = Cluster(lab)
    squatter = lab.socket("node1", socket.AF_INET, socket.SOCK_DGRAM)
    try:
        squatter.bind(("198.18.0.1", 7701))
        proc = lab.start_agent("node1", cluster.config)
        assert proc.wait(20) == 1
    finally:
        squatter.close()
    log = cluster.log("node1")
    assert "cannot start" in log and "198.18.0.1" in log
    assert "Traceback" not in log
    assert "198.18.0.100" not in lab.addresses("node1")


def test_agent_refuses_a_state_directory_inside_a_replicated_one(lab: Lab) -> None:
    state = lab.node_dir("node1") / "state-inside"
    module = demo_module(directories=[{"path": str(lab.node_dir("node1"))}])
    cluster = Cluster(lab, modules=[module])
    proc = lab.start_agent("node1", cluster.config, state_dir=state)
    assert proc.wait(20) == 1
    log = cluster.log("node1")
    assert "cannot start" in log and "inside" in log and "--state-dir" in log
    assert "Traceback" not in log
