"""A running two-node cluster on the namespace lab: agents, witness, demo module, tandemctl.

Used by the system tests, the benchmarks and `make demo`.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from tests.lab import Lab, cgroup2_root, wait_for

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "resources" / "demo"
BIN = Path(sys.executable).parent
VIP = "198.18.0.100"
DEMO_PORT = 8080
DEMO_DIR = "/srv/tandem-demo"


def demo_module(
    name: str = "web",
    checkers: Sequence[Mapping[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The demo application as a module: its VIP, data directory, scripts and a tcp checker."""
    module: dict[str, Any] = {
        "name": name,
        "vip": {"address": f"{VIP}/24", "interface": "eth0"},
        "directories": [{"path": f"{DEMO_DIR}/data"}],
        "service": {"start": str(DEMO / "start.sh"), "stop": str(DEMO / "stop.sh")},
        "checkers": list(
            checkers
            if checkers is not None
            else [{"type": "tcp", "address": VIP, "port": DEMO_PORT, "interval": 1.0}]
        ),
    }
    module.update(extra)
    return module


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP to an agent's API socket (a Unix socket), closed again whatever happens."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("agent", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Cluster:
    """Two agents (and the lab's witness) running one configuration."""

    def __init__(
        self,
        lab: Lab,
        modules: Sequence[Mapping[str, Any]] | None = None,
        witness: bool | None = None,
        timing: Mapping[str, float] | None = None,
    ) -> None:
        self.lab = lab
        self.modules = list(modules if modules is not None else [demo_module()])
        self.use_witness = lab.has_witness if witness is None else witness
        self.config = lab.write_config(self.modules, witness=self.use_witness, timing=timing)
        self.witness: subprocess.Popen[Any] | None = None
        self.agents: dict[str, subprocess.Popen[Any]] = {}

    def start(self, nodes: Sequence[str] = ("node1", "node2"), witness: bool = True) -> Cluster:
        if self.use_witness and witness and self.witness is None:
            self.witness = self.lab.start_witness()
        for node in nodes:
            self.start_agent(node)
        return self

    def start_agent(self, node: str) -> subprocess.Popen[Any]:
        # An agent killed -9 leaves its socket file: it must not pass for the new one's.
        self.socket(node).unlink(missing_ok=True)
        proc = self.lab.start_agent(node, self.config, private_dirs={DEMO_DIR: Path("srv")})
        self.agents[node] = proc
        if not wait_for(lambda: self.socket(node).exists() or proc.poll() is not None, 20):
            raise AssertionError(f"{node}'s agent did not open its API socket\n{self.log(node)}")
        if proc.poll() is not None:
            raise AssertionError(f"{node}'s agent exited {proc.returncode}\n{self.log(node)}")
        return proc

    def socket(self, node: str) -> Path:
        return self.lab.socket_dir(node) / f"{node}.sock"

    def log(self, node: str) -> str:
        path = self.lab.tmp_dir / f"{node}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def ctl(self, node: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        """Run tandemctl against `node`'s agent (from the host: the socket is a file)."""
        argv = [str(BIN / "tandemctl"), "--socket", str(self.socket(node)), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)

    def api_get(self, node: str, path: str, **params: str | int) -> Any:
        """GET `path` from `node`'s API on its socket; None if the agent does not answer.

        What `tandemctl status --json` prints, without starting tandemctl (~0.7 s) each time.
        """
        conn = _UnixHTTPConnection(str(self.socket(node)), timeout=10)
        try:
            conn.request("GET", f"{path}?{urlencode(params)}" if params else path)
            answer = conn.getresponse()
            body = answer.read()
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()
        return json.loads(body) if answer.status == 200 else None

    def status(self, node: str) -> dict[str, Any] | None:
        data: dict[str, Any] | None = self.api_get(node, "/api/v1/status")
        return data

    def replication(self, node: str, name: str = "web") -> dict[str, Any]:
        """The module's replication figures on `node` ({} when its agent does not answer)."""
        module = self.module(node, name)
        return {} if module is None else dict(module["replication"])

    def data_dir(self, node: str) -> Path:
        """The real files of `node`'s replicated demo directory (beneath its mount)."""
        return self.lab.tmp_dir / node / "srv" / "data"

    def records(self, node: str) -> dict[int, str]:
        """`node`'s copy of the demo's records file: seq -> text (a torn last line is
        ignored, as the application does)."""
        path = self.data_dir(node) / "records.log"
        found: dict[int, str] = {}
        for line in path.read_bytes().splitlines() if path.exists() else []:
            try:
                record = json.loads(line)
                found[int(record["seq"])] = str(record["data"])
            except (ValueError, KeyError, TypeError):
                continue
        return found

    def in_mount(
        self, node: str, script: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell script where `node`'s application runs (its mount namespace, where the
        replicated directory is the mirror's mount)."""
        argv = ["nsenter", "-t", str(self.agent_pid(node)), "-m", "sh", "-c", script]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)

    def module(self, node: str, name: str = "web") -> dict[str, Any] | None:
        status = self.status(node)
        if status is None:
            return None
        for m in status["modules"]:
            if m["name"] == name:
                return dict(m)
        return None

    def state(self, node: str, name: str = "web") -> str | None:
        m = self.module(node, name)
        return None if m is None else str(m["state"])

    def wait_state(
        self, node: str, states: str | Sequence[str], name: str = "web", timeout: float = 20
    ) -> dict[str, Any]:
        """Wait until the module is in one of `states` on `node`; its status, or fail."""
        wanted = {states} if isinstance(states, str) else set(states)
        last: dict[str, Any] | None = None

        def reached() -> bool:
            nonlocal last
            last = self.module(node, name)
            return last is not None and last["state"] in wanted

        if not wait_for(reached, timeout):
            raise AssertionError(
                f"{node}/{name} not in {sorted(wanted)} after {timeout} s; last: {last}\n"
                f"--- {node} log ---\n{self.log(node)}"
            )
        assert last is not None
        return last

    def wait_until(self, what: str, predicate: Callable[[], bool], timeout: float = 20) -> None:
        if not wait_for(predicate, timeout):
            raise AssertionError(
                f"{what}: not within {timeout} s\n--- node1 ---\n{self.log('node1')}\n"
                f"--- node2 ---\n{self.log('node2')}"
            )

    def wait_in_sync(self, node: str, name: str = "web", timeout: float = 60) -> None:
        """Wait until `node` is a secondary whose copy of the module's data is in sync."""

        def in_sync() -> bool:
            module = self.module(node, name)
            return (
                module is not None
                and module["state"] == "SECOND"
                and bool(module["replication"]["in_sync"])
            )

        self.wait_until(f"{node} is an in-sync secondary of {name}", in_sync, timeout)

    def primary(self, name: str = "web") -> str | None:
        for node in ("node1", "node2"):
            if self.state(node, name) in ("PRIM", "ALONE"):
                return node
        return None

    def wait_healthy_pair(self, primary: str = "node1", name: str = "web") -> None:
        """PRIM on `primary`, SECOND on the other, the demo answering through the VIP, and,
        for a module with replicated directories, the secondary's copy in sync (before that
        it rightly refuses to take over)."""
        other = "node2" if primary == "node1" else "node1"
        self.wait_state(primary, "PRIM", name, timeout=30)
        second = self.wait_state(other, "SECOND", name, timeout=30)
        self.wait_until(
            "the demo answers through the VIP",
            lambda: self.lab.tcp_connect_ok(VIP, DEMO_PORT, timeout=0.5),
        )
        if second["replication"]["generation"] is not None:
            self.wait_in_sync(other, name)

    def agent_pid(self, node: str) -> int:
        """The pid of `node`'s tandem-agent process itself (the lab's wrapper execs into it)."""
        proc = self.agents[node]
        try:
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            raise AssertionError(f"{node}'s agent (pid {proc.pid}) is not running") from None
        if not any(word.endswith(b"tandem-agent") for word in cmdline):
            raise AssertionError(f"pid {proc.pid} is not {node}'s tandem-agent: {cmdline!r}")
        return proc.pid

    def module_pids(self, node: str, name: str = "web") -> list[int]:
        """The processes in `node`'s cgroup of module `name` (none if the cgroup is gone)."""
        root = cgroup2_root()
        if root is None:
            raise AssertionError("no cgroup v2 hierarchy on this host")
        try:
            text = (root / "tandem" / node / name / "cgroup.procs").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return []
        return [int(line) for line in text.split()]

    def events(self, node: str, name: str = "web", after: int = 0) -> list[dict[str, Any]]:
        """`node`'s event log for module `name` after event id `after`, oldest first."""
        found: list[dict[str, Any]] | None = self.api_get(
            node, "/api/v1/events/log", module=name, after=after, limit=5000
        )
        if found is None:
            raise AssertionError(f"{node}'s agent does not answer for its event log")
        return found

    def post_record(self, body: bytes = b"record", timeout: float = 2.0) -> dict[str, Any] | None:
        """Append a record through the VIP; its JSON answer, or None if it failed."""
        try:
            result = self.lab.client_http(
                "POST", f"http://{VIP}:{DEMO_PORT}/records", body, timeout=timeout
            )
        except OSError:
            return None
        if result.status != 200:
            return None
        answer: dict[str, Any] = result.json()
        return answer

    def stop_agents(self) -> None:
        for proc in self.agents.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 30
        for proc in self.agents.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
