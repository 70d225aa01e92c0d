"""tandemctl against real agents: its exit codes (⚑ 0 done, 1 refused, 2 usage, 3 unreachable),
what `status` and `logs` print, and the reasons it gives when it refuses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.cluster import BIN, VIP, Cluster
from tests.integration.support import (
    assert_nothing_changes,
    assert_one_holder,
    last_event_id,
    wait_served_by,
)
from tests.lab import DEFAULT_TIMING, Lab

DONE, REFUSED, USAGE, UNREACHABLE = 0, 1, 2, 3
PEER_TIMEOUT = DEFAULT_TIMING["peer_timeout"]


def tandemctl(
    *args: str, socket_dir: Path | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run tandemctl as an operator would, wide enough that rich never folds a reason."""
    full = {k: v for k, v in os.environ.items() if k != "TANDEM_NODE"}
    full["COLUMNS"] = "400"
    if socket_dir is not None:
        full["TANDEM_SOCKET_DIR"] = str(socket_dir)
    full.update(env or {})
    return subprocess.run(
        [str(BIN / "tandemctl"), *args],
        capture_output=True,
        text=True,
        timeout=90,
        env=full,
        check=False,
    )


def on(cluster: Cluster, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    """tandemctl against `node`'s agent by its socket."""
    return tandemctl("--socket", str(cluster.socket(node)), *args)


@pytest.fixture
def listening_sockets(tmp_path: Path) -> Iterator[Path]:
    """A socket directory with two listening sockets (node1.sock, node2.sock), no agent."""
    directory = tmp_path / "run"
    directory.mkdir()
    with ExitStack() as stack:
        for name in ("node1", "node2"):
            sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            sock.bind(str(directory / f"{name}.sock"))
            sock.listen()
        yield directory


def test_exit_3_when_no_agent_answers(tmp_path: Path) -> None:
    missing = tandemctl("--socket", str(tmp_path / "node1.sock"), "status")
    assert missing.returncode == UNREACHABLE, missing
    assert str(tmp_path / "node1.sock") in missing.stderr
    assert "Traceback" not in missing.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = tandemctl("status", socket_dir=empty)
    assert nothing.returncode == UNREACHABLE, nothing
    assert "no agent socket" in nothing.stderr and str(empty) in nothing.stderr

    by_name = tandemctl("--node", "node7", "stop", "web", socket_dir=empty)
    assert by_name.returncode == UNREACHABLE, by_name
    assert "node7.sock" in by_name.stderr


def test_exit_2_for_usage_errors_and_for_several_sockets_without_node(
    listening_sockets: Path,
) -> None:
    several = tandemctl("status", socket_dir=listening_sockets)
    assert several.returncode == USAGE, several
    assert "node1" in several.stderr and "node2" in several.stderr
    assert "--node" in several.stderr

    for argv in (["frobnicate"], ["stop"], ["maintenance", "sideways", "web"], []):
        wrong = tandemctl(*argv, socket_dir=listening_sockets)
        assert wrong.returncode == USAGE, (argv, wrong)
        assert "usage" in wrong.stderr.lower()
        assert "Traceback" not in wrong.stderr


def test_status_logs_and_refusals_against_a_running_pair(lab: Lab, tmp_path: Path) -> None:
    cluster = Cluster(lab).start()
    cluster.wait_healthy_pair("node1")

    table = on(cluster, "node1", "status")
    assert table.returncode == DONE, table
    assert "NODE1" in table.stdout and "NODE2" in table.stdout
    row = next(line for line in table.stdout.splitlines() if " web " in line)
    assert "PRIM" in row and "SECOND" in row, table.stdout

    document = on(cluster, "node2", "status", "--json")
    assert document.returncode == DONE, document
    status = json.loads(document.stdout)
    assert status["node"]["name"] == "node2" and status["peer"]["name"] == "node1"
    assert [(m["name"], m["state"], m["peer_state"]) for m in status["modules"]] == [
        ("web", "SECOND", "PRIM")
    ]

    logs = on(cluster, "node2", "logs", "web")
    assert logs.returncode == DONE, logs
    transitions = [line for line in logs.stdout.splitlines() if " transition " in line]
    assert any("SECOND: node1 is primary" in line for line in transitions), logs.stdout

    # Several agents' sockets in one directory: --node chooses, nothing else guesses.
    both = tmp_path / "both"
    both.mkdir()
    for node in ("node1", "node2"):
        (both / f"{node}.sock").symlink_to(cluster.socket(node))
    assert tandemctl("status", socket_dir=both).returncode == USAGE
    chosen = tandemctl("--node", "node2", "status", "--json", socket_dir=both)
    assert chosen.returncode == DONE, chosen
    assert json.loads(chosen.stdout)["node"]["name"] == "node2"

    refused = on(cluster, "node2", "restart", "web")
    assert refused.returncode == REFUSED, refused
    assert "restart applies where the module is primary; here it is SECOND" in refused.stdout

    restarted = on(cluster, "node1", "restart", "web")
    assert restarted.returncode == DONE, restarted
    assert "restarted" in restarted.stdout

    unknown = on(cluster, "node1", "stop", "nosuch")
    # Either reading of the contract (refused by the agent, or a usage error) is fine; what
    # matters is a non-zero exit naming the modules there are.
    assert unknown.returncode in (REFUSED, USAGE), unknown
    assert "nosuch" in unknown.stderr and "web" in unknown.stderr
    assert cluster.state("node1") == "PRIM"


def test_swap_without_a_secondary_is_refused_with_the_reason(lab: Lab) -> None:
    cluster = Cluster(lab).start()
    cluster.wait_healthy_pair("node1")
    stopped = on(cluster, "node2", "stop", "web")
    assert stopped.returncode == DONE, stopped
    cluster.wait_state("node1", ("PRIM", "ALONE"), timeout=10)

    refused = on(cluster, "node1", "swap", "web")
    assert refused.returncode == REFUSED, refused
    assert "swap needs an up-to-date secondary: node2 is STOP" in refused.stdout, refused
    refused = on(cluster, "node2", "swap", "web")
    assert refused.returncode == REFUSED, refused
    assert "start it first" in refused.stdout, refused
    assert cluster.state("node1") in ("PRIM", "ALONE")


def test_logs_keep_the_failover_in_view_while_the_survivor_runs_alone(lab: Lab) -> None:
    cluster = Cluster(lab).start()
    cluster.wait_healthy_pair("node1")
    with lab.watch_vip(VIP) as watch:
        lab.power_loss("node1")
        cluster.wait_state("node2", "ALONE", timeout=10)
        wait_served_by(cluster, "node2")
        # The takeover's reason ("witness granted primary") turns into the steady one once.
        cluster.wait_until(
            "node2 says it runs alone",
            lambda: "running alone" in str((cluster.module("node2") or {}).get("reason")),
        )
        # Running alone is a steady state, not news: three peer timeouts of it (a dozen
        # decisions) must not push the failover out of the log.
        mark = last_event_id(cluster, "node2")
        assert_nothing_changes(cluster, 3 * PEER_TIMEOUT, nodes=("node2",), watch=watch)
        news = [e for e in cluster.events("node2", after=mark) if e["kind"] == "reason"]
        assert news == [], [e["reason"] for e in news]
    assert_one_holder(watch)
    logs = on(cluster, "node2", "logs", "web", "-n", "10")
    assert logs.returncode == DONE, logs
    assert any(
        " transition ALONE: peer lost" in line and "witness granted primary" in line
        for line in logs.stdout.splitlines()
    ), logs.stdout
