"""The lab's own checks: the namespaces, faults and watches system tests rely on really work."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from tests.lab import (
    REGISTRY,
    Lab,
    LabError,
    _Member,
    _owner_alive,
    _read_registry,
    cgroup2_root,
    cleanup_stale,
    wait_for,
)

pytestmark = pytest.mark.root

DEMO = Path(__file__).resolve().parents[2] / "resources" / "demo"
VIP = "198.18.0.100"


def netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def listener(lab: Lab, where: str, address: str, port: int) -> socket.socket:
    """A TCP listening socket in a lab namespace (held by this process, not by the node)."""
    sock = lab.socket(where)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen()
    return sock


def udp(lab: Lab, where: str, address: str, port: int) -> socket.socket:
    sock = lab.socket(where, socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, port))
    return sock


def link_flags(lab: Lab, where: str, ifname: str) -> set[str]:
    """The link's flags: UP = switched on by the host, NO-CARRIER = no cable signal."""
    info = json.loads(lab.ip(where, "-j", "link", "show", ifname))
    return set(info[0]["flags"])


def test_nodes_and_client_reach_each_other_over_the_bridge(lab: Lab) -> None:
    assert lab.addresses("node1") == {"198.18.0.1"}
    assert lab.addresses("node2") == {"198.18.0.2"}
    assert lab.addresses("client") == {"198.18.0.10"}
    assert lab.addresses("witness") == {"198.18.0.254"}
    with listener(lab, "node2", "198.18.0.2", 9000), listener(lab, "node1", "198.18.0.1", 9000):
        assert lab.tcp_connect_ok("198.18.0.2", 9000, where="node1")
        assert lab.tcp_connect_ok("198.18.0.1", 9000, where="node2")
        assert lab.tcp_connect_ok("198.18.0.1", 9000)
        assert lab.tcp_connect_ok("198.18.0.2", 9000)
        assert lab.tcp_connect_ok("198.18.0.2", 9000, where="witness")


def test_second_network_joins_the_nodes_on_eth1(lab2: Lab) -> None:
    assert lab2.own_addresses("node1") == {"eth0": "198.18.0.1/24", "eth1": "198.18.1.1/24"}
    assert lab2.addresses("node2") == {"198.18.0.2", "198.18.1.2"}
    with listener(lab2, "node2", "198.18.1.2", 9000):
        lab2.cut_link("node1", 0)
        assert lab2.tcp_connect_ok("198.18.1.2", 9000, where="node1")
        lab2.restore_link("node1", 0)


def test_power_loss_kills_every_process_and_takes_the_links_down(lab: Lab) -> None:
    sleeper = lab.run("node1", ["sleep", "600"])
    forked = lab.run("node1", ["sh", "-c", "setsid sleep 600 & wait"])
    bystander = lab.run("node2", ["sleep", "600"])
    lab.ip("node1", "addr", "add", f"{VIP}/24", "dev", "eth0")
    with listener(lab, "node1", "198.18.0.1", 9000):
        assert lab.tcp_connect_ok("198.18.0.1", 9000, where="node2")

        late = lab.run("node1", ["sleep", "600"])
        lab.power_loss("node1")

        assert sleeper.wait(timeout=10) == -signal.SIGKILL
        assert late.wait(timeout=10) == -signal.SIGKILL
        assert forked.wait(timeout=10) == -signal.SIGKILL
        assert lab.kill_processes("node1", signal.SIGTERM) == 0  # the setsid child too
        assert bystander.poll() is None
        assert "UP" not in link_flags(lab, "node1", "eth0")
        assert lab.addresses("node1") == {"198.18.0.1"}  # a powered-off node holds no VIP
        assert not lab.tcp_connect_ok("198.18.0.1", 9000, timeout=0.5, where="node2")

        lab.power_on("node1")

        assert lab.addresses("node1") == {"198.18.0.1"}
        assert wait_for(lambda: lab.tcp_connect_ok("198.18.0.1", 9000, where="node2"), 10)


def test_cut_link_pulls_the_cable_but_keeps_the_addresses(lab: Lab) -> None:
    with listener(lab, "node1", "198.18.0.1", 9000):
        lab.cut_link("node1")
        assert {"UP", "NO-CARRIER"} <= link_flags(lab, "node1", "eth0")
        assert lab.addresses("node1") == {"198.18.0.1"}
        assert not lab.tcp_connect_ok("198.18.0.1", 9000, timeout=0.5)
        lab.restore_link("node1")
        assert wait_for(lambda: lab.tcp_connect_ok("198.18.0.1", 9000), 10)


def _arrives(receiver: socket.socket, control: socket.socket, send: list[socket.socket]) -> bool:
    """Send a datagram to `receiver` then one to `control`; once the control one is in, say
    whether the first arrived (same path, same order: no waiting on a timeout)."""
    receiver.setblocking(False)
    while True:  # drain what earlier rounds left
        try:
            receiver.recv(100)
        except BlockingIOError:
            break
    sender, control_sender = send
    sender.sendto(b"heartbeat", receiver.getsockname())
    control_sender.sendto(b"control", control.getsockname())
    control.settimeout(5)
    assert control.recv(100) == b"control"
    try:
        return receiver.recv(100) == b"heartbeat"
    except BlockingIOError:
        return False


def test_cut_heartbeats_drops_udp_on_the_heartbeat_port_only(lab: Lab) -> None:
    port = lab.heartbeat_port
    with (
        udp(lab, "node1", "198.18.0.1", port) as hb1,
        udp(lab, "node2", "198.18.0.2", port) as hb2,
        udp(lab, "node1", "198.18.0.1", 7799) as ctl1,
        udp(lab, "node2", "198.18.0.2", 7799) as ctl2,
        listener(lab, "node2", "198.18.0.2", port),
    ):
        assert _arrives(hb2, ctl2, [hb1, ctl1])
        lab.cut_heartbeats("node1")
        assert not _arrives(hb2, ctl2, [hb1, ctl1])  # out of node1
        assert not _arrives(hb1, ctl1, [hb2, ctl2])  # into node1
        assert lab.tcp_connect_ok("198.18.0.2", port, where="node1")
        lab.restore_heartbeats("node1")
        assert _arrives(hb2, ctl2, [hb1, ctl1])
        assert _arrives(hb1, ctl1, [hb2, ctl2])


def test_vip_watch_counts_holders_from_address_events(lab: Lab) -> None:
    with lab.watch_vip(VIP) as watch:
        lab.ip("node1", "addr", "add", f"{VIP}/24", "dev", "eth0")
        assert watch.wait_holder("node1", 5)
        lab.ip("node1", "addr", "del", f"{VIP}/24", "dev", "eth0")
        lab.ip("node2", "addr", "add", f"{VIP}/24", "dev", "eth0")
        assert watch.wait_holder("node2", 5)
        assert watch.holders() == {"node2"}
        assert watch.holders_at_any_instant() == 1
        assert [(e.node, e.kind) for e in watch.events] == [
            ("node1", "add"),
            ("node1", "del"),
            ("node2", "add"),
        ]

        lab.ip("node1", "addr", "add", f"{VIP}/24", "dev", "eth0")
        assert watch.wait_holder("node1", 5)
        assert watch.holders_at_any_instant() == 2

        lab.power_loss("node1")  # a node that loses power stops holding it
        lab.power_on("node1")
        assert watch.holders() == {"node2"}


def test_vip_watch_starts_from_the_current_holders(lab: Lab) -> None:
    lab.ip("node1", "addr", "add", f"{VIP}/24", "dev", "eth0")
    with lab.watch_vip(f"{VIP}/24") as watch:
        assert watch.holders() == {"node1"}
        lab.ip("node2", "addr", "add", f"{VIP}/24", "dev", "eth0")
        assert watch.wait_holder("node2", 5)
        assert watch.holders_at_any_instant() == 2


def test_private_dirs_give_each_node_its_own_files_at_the_same_path(lab: Lab) -> None:
    seen = f"/srv/tandem-labtest-{lab.prefix}"
    for node in ("node1", "node2"):
        proc = lab.run(
            node,
            [
                "sh",
                "-c",
                f'echo "$0" > {seen}/who && grep -q " cgroup2 " /proc/self/mountinfo',
                node,
            ],
            private_dirs={seen: Path("srv")},
            mount_cgroup=True,
        )
        assert proc.wait(timeout=10) == 0
    assert (lab.node_dir("node1") / "srv" / "who").read_text() == "node1\n"
    assert (lab.node_dir("node2") / "srv" / "who").read_text() == "node2\n"
    assert Path(seen).is_dir() and not any(Path(seen).iterdir())  # nothing leaked to the host


def test_start_agent_runs_the_command_in_the_node_with_its_view(tmp_path: Path) -> None:
    probe = (
        "import json, os, sys, time\n"
        "mounts = open('/proc/self/mountinfo').read()\n"
        "print(json.dumps({'argv': sys.argv[1:], 'sock': os.environ.get('TANDEM_SOCKET_DIR'),"
        " 'cgroup2': ' cgroup2 ' in mounts, 'demo': os.listdir('/srv/tandem-demo')}), flush=True)\n"
        "open('/run/tandem/node1.sock', 'w').close()\n"
        "time.sleep(600)\n"
    )
    with Lab(tmp_path / "lab", agent_command=[sys.executable, "-c", probe]) as lab:
        (lab.node_dir("node1") / "demo").mkdir(parents=True)
        (lab.node_dir("node1") / "demo" / "mine").touch()
        config = lab.write_config()
        agent = lab.start_agent("node1", config, private_dirs={"/srv/tandem-demo": Path("demo")})
        log = lab.tmp_dir / "node1.log"
        assert wait_for(lambda: log.exists() and log.read_text().strip() != "", 10)
        report = json.loads(log.read_text())
        state = str(lab.node_dir("node1") / "state")
        assert report["argv"] == ["--config", str(config), "--node", "node1", "--state-dir", state]
        assert report["sock"] == str(lab.socket_dir("node1"))
        assert report["cgroup2"] is True
        assert report["demo"] == ["mine"]
        assert wait_for((lab.socket_dir("node1") / "node1.sock").exists, 5)
        lab.power_loss("node1")
        assert agent.wait(timeout=10) == -signal.SIGKILL


def test_write_config_passes_the_agents_checks_in_a_node(lab2: Lab) -> None:
    modules = f"""
- name: demo
  vip: {{address: {VIP}/24, interface: eth0}}
  service: {{start: {DEMO / "start.sh"}, stop: {DEMO / "stop.sh"}}}
"""
    config = lab2.write_config(modules, witness=True)
    assert oct(lab2.key_file.stat().st_mode & 0o777) == "0o600"
    assert len(lab2.key_file.read_text().strip()) == 64
    check = (
        "import sys\nfrom agent.config import load_config, node_checks\n"
        "problems = node_checks(load_config(sys.argv[1]), 'node1')\n"
        "print('\\n'.join(problems)); sys.exit(1 if problems else 0)\n"
    )
    done = lab2.exec("node1", [sys.executable, "-c", check, str(config)], check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_lab_without_witness_writes_configs_without_one(tmp_path: Path) -> None:
    with Lab(tmp_path / "lab", witness=False) as lab:
        assert "witness" not in lab.ns
        doc = yaml.safe_load(lab.write_config([]).read_text())
        assert "witness" not in doc
        assert doc["nodes"][0] == {
            "name": "node1",
            "address": "198.18.0.1",
            "heartbeat": ["198.18.0.1"],
        }
        with pytest.raises(LabError, match="witness=True"):
            lab.write_config([], witness=True)
        with pytest.raises(LabError, match="witness=True"):
            lab.start_witness()


def _demo(lab: Lab, node: str, script: str) -> None:
    """Run the demo's start.sh or stop.sh on `node` as the agent will (own /srv/tandem-demo)."""
    env = dict(os.environ, TANDEM_NODE=node, PYTHON=sys.executable)
    proc = lab.run(node, [DEMO / script], private_dirs={"/srv/tandem-demo": Path("srv")}, env=env)
    assert proc.wait(timeout=20) == 0


def test_demo_app_numbers_records_and_continues_on_the_other_node(lab: Lab) -> None:
    _demo(lab, "node1", "start.sh")
    for seq in (1, 2):
        answer = lab.client_http("POST", "http://198.18.0.1:8080/records", f"r{seq}")
        assert (answer.status, answer.json()) == (200, {"seq": seq, "node": "node1"})
    assert lab.client_http("GET", "http://198.18.0.1:8080/health").status == 200
    _demo(lab, "node1", "stop.sh")
    assert not lab.tcp_connect_ok("198.18.0.1", 8080)

    # What replication will do: node2 has node1's data when it takes over.
    data = Path("srv") / "data"
    shutil.copytree(lab.node_dir("node1") / data, lab.node_dir("node2") / data)
    _demo(lab, "node2", "start.sh")
    answer = lab.client_http("POST", "http://198.18.0.2:8080/records", "r3")
    assert answer.json() == {"seq": 3, "node": "node2"}
    summary = lab.client_http("GET", "http://198.18.0.2:8080/records").json()
    assert (summary["count"], summary["last"]["data"]) == (3, "r3")
    _demo(lab, "node2", "stop.sh")
    assert not lab.tcp_connect_ok("198.18.0.2", 8080)

    lines = (lab.node_dir("node2") / data / "records.log").read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3]


def test_close_removes_everything_it_made(tmp_path: Path) -> None:
    seen = f"/srv/tandem-labtest-{secrets.token_hex(3)}/deep"
    lab = Lab(tmp_path / "lab", heartbeat_networks=2)
    try:
        names = set(lab.ns.values())
        assert names <= netns_list()
        proc = lab.run("node1", ["sleep", "600"], private_dirs={seen: Path("x")}, mount_cgroup=True)
        lab.cut_heartbeats("node2")
        watch = lab.watch_vip(VIP)
        watch.start()
    finally:
        lab.close()
    assert proc.wait(timeout=1) == -signal.SIGKILL
    assert not names & netns_list()
    assert not Path(seen).parent.exists()
    assert not (REGISTRY / f"{lab.prefix}.json").exists()
    lab.close()  # twice is harmless


class _FailingLab(Lab):
    """A lab whose build fails once node1 and node2 exist; it tells its names first."""

    names: ClassVar[list[str]] = []

    def _build_member(self, member: _Member) -> None:
        if member.role == "client":
            _FailingLab.names[:] = self.ns.values()
            raise LabError("injected failure while building the client")
        super()._build_member(member)


def test_a_lab_that_fails_half_way_removes_what_it_built(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="injected"):
        _FailingLab(tmp_path / "lab")
    assert len(_FailingLab.names) == 5
    assert not set(_FailingLab.names) & netns_list()
    with pytest.raises(LabError, match="1 or 2 networks"):
        Lab(tmp_path / "lab", heartbeat_networks=3)


def test_cleanup_stale_removes_orphans_and_keeps_live_labs(lab: Lab) -> None:
    # A pattern of its own: other sessions' cleanups must not race this test for the orphan.
    orphan = f"tlabtest{secrets.token_hex(3)}-lan"
    subprocess.run(["ip", "netns", "add", orphan], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", orphan, "sleep", "600"])
    try:
        assert wait_for(lambda: _in_ns(sleeper.pid, orphan), 5)
        assert cleanup_stale(rf"^{orphan}$") == [orphan]
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
        assert orphan not in netns_list()
        assert cleanup_stale(rf"^{lab.prefix}-") == []  # a live lab is kept
        assert set(lab.ns.values()) <= netns_list()
    finally:
        sleeper.kill()
        sleeper.wait()
        if orphan in netns_list():
            subprocess.run(["ip", "netns", "delete", orphan], check=False)


def _in_ns(pid: int, ns: str) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return False


def test_power_on_removes_the_cgroups_agents_left(lab: Lab) -> None:
    root = cgroup2_root()
    assert root is not None
    group = root / "tandem" / "node1" / f"labtest-{lab.prefix}"
    enter = f"mkdir -p {group} && echo $$ > {group}/cgroup.procs && exec sleep 600"
    proc = lab.run("node1", ["sh", "-c", enter], mount_cgroup=True)
    assert wait_for(lambda: _members(group) == [proc.pid], 5)
    lab.power_loss("node1")
    assert proc.wait(timeout=10) == -signal.SIGKILL
    others_before = _other_labs_live(lab)
    lab.power_on("node1")
    others_after = _other_labs_live(lab)
    # Agents of every lab share <cgroup2>/tandem/<node>: while another lab lives, they stay.
    if not others_before and not others_after:
        assert not group.exists()
    elif others_before and others_after:
        assert group.exists()


def _other_labs_live(lab: Lab) -> bool:
    return any(p != lab.prefix and _owner_alive(e) for p, e in _read_registry().items())


def _members(group: Path) -> list[int]:
    try:
        return [int(x) for x in (group / "cgroup.procs").read_text().split()]
    except OSError:
        return []
