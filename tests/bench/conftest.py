"""Shared parts of the failover benchmarks: their lab, settings, probes, load and reports.

Benchmarks run only by `make bench`. They measure and print; they never assert a time
(this machine has 2 cores and no real NIC, so only ratios against a baseline measured in
the same run mean anything). A benchmark fails only when the product misbehaves, for
example when the VIP never answers again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster import DEMO, DEMO_PORT, VIP
from tests.lab import (
    Lab,
    LabError,
    _owner_alive,
    _read_registry,
    cgroup2_root,
    cleanup_stale,
    netns_socket,
    wait_for,
)

HERE = Path(__file__).resolve().parent
DEFAULT_RUNS = 10
DEFAULT_LOAD_SECONDS = 600
# How long a benchmark waits for the VIP before it calls the product broken: far beyond any
# failover or swap, so only a VIP that never comes back fails a run.
NEVER = 60.0
ETH_P_ARP = 0x0806


# --- settings -------------------------------------------------------------------------


def _env_int(name: str, default: int, minimum: int, example: str) -> int:
    """A whole number from the environment, or a UsageError that says how to set it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise pytest.UsageError(
            f"{name}={raw!r}: expected a whole number >= {minimum}; e.g. {name}={example}"
        )
    return value


def bench_runs() -> int:
    """How many runs the failover and swap benchmarks make (env BENCH_RUNS, default 10)."""
    return _env_int("BENCH_RUNS", DEFAULT_RUNS, 1, "10")


def bench_rounds() -> int:
    """Rounds of the replication benchmarks, medians taken (env TANDEM_BENCH_ROUNDS, default 3)."""
    return _env_int("TANDEM_BENCH_ROUNDS", 3, 1, "3")


def zero_loss_cycles() -> int:
    """Faults the zero-loss benchmark makes (env BENCH_ZERO_LOSS_CYCLES, default 40)."""
    return _env_int("BENCH_ZERO_LOSS_CYCLES", 40, 2, "40")


def load_seconds() -> int:
    """How long the false-failover benchmark loads the machine (env BENCH_LOAD_SECONDS)."""
    return _env_int("BENCH_LOAD_SECONDS", DEFAULT_LOAD_SECONDS, 10, "600")


def pytest_configure(config: pytest.Config) -> None:
    """Refuse bad settings before anything runs, with the variable and a fix."""
    bench_runs()
    bench_rounds()
    load_seconds()
    zero_loss_cycles()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Benchmarks need root; the load benchmark's timeout follows its configured length."""
    for item in items:
        if not item.path.is_relative_to(HERE):
            continue
        item.add_marker(pytest.mark.root)
        if item.path.name == "test_false_failovers.py":
            # The loaded period, its idle baseline (a quarter of it) and the set-up.
            item.add_marker(pytest.mark.timeout(load_seconds() * 5 // 4 + 600))


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def stale_labs_removed() -> None:
    """Remove namespaces a crashed earlier run left (labs still in use are kept)."""
    if os.geteuid() == 0:
        cleanup_stale()


class Neighbours:
    """Records the other labs that run on this host while a benchmark runs.

    Other labs share the CPU: figures taken beside them are noisier, and the report says so.
    """

    def __init__(self, own: str | None = None) -> None:
        self.own = own
        self.seen: set[str] = set()
        self.load_at_start = os.getloadavg()[0]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def others(self) -> set[str]:
        """Prefixes of the live labs other than ours, now."""
        return {p for p, e in _read_registry().items() if p != self.own and _owner_alive(e)}

    def start(self) -> None:
        """Sample the lab registry every half second until stop()."""
        self._thread = threading.Thread(target=self._run, name="neighbours", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.seen |= self.others()

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def conditions(self) -> str:
        """A line for the report: the load met at the start and other labs seen."""
        self.seen |= self.others()
        alone = (
            "no other lab ran meanwhile"
            if not self.seen
            else f"other labs shared the CPU meanwhile ({', '.join(sorted(self.seen))})"
        )
        return f"load average at the start {self.load_at_start:.2f}; {alone}"


_NEIGHBOURS: list[Neighbours] = []


def wait_until_alone(seconds: int) -> None:
    """Wait up to `seconds` for the other labs on this host to end (they skew figures)."""
    probe = Neighbours()
    others = probe.others()
    if others:
        print(f"\nwaiting up to {seconds} s for other labs to end: {', '.join(sorted(others))}")
        if not wait_for(lambda: not probe.others(), seconds, 1.0):
            print(f"other labs still run ({', '.join(sorted(probe.others()))}); measuring anyway")


@contextlib.contextmanager
def watching_neighbours(own: str | None = None) -> Iterator[None]:
    """While inside, note which other labs run (each report then says so)."""
    watch = Neighbours(own)
    watch.start()
    _NEIGHBOURS.append(watch)
    try:
        yield
    finally:
        watch.stop()
        _NEIGHBOURS.remove(watch)


@pytest.fixture
def quiet_host() -> Iterator[None]:
    """For a benchmark without a lab: wait for other labs to end first (BENCH_WAIT_SECONDS,
    default 120), then note any that start while it measures."""
    wait_until_alone(_env_int("BENCH_WAIT_SECONDS", 120, 0, "120"))
    with watching_neighbours():
        yield


def _remove_cgroups(top: Path) -> None:
    """rmdir a cgroup tree, deepest first (its processes are gone with the lab)."""
    if not top.is_dir():
        return
    for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


@pytest.fixture
def lab(tmp_path: Path, stale_labs_removed: None) -> Iterator[Lab]:
    """node1, node2, client and witness on one network (198.18.0.0/24), removed after.

    Built once no other lab runs on this host (they share the CPU; waiting up to
    BENCH_WAIT_SECONDS, default 120). Its agents see a cgroup tree of their own: every
    lab's agents put a module in <cgroup2>/tandem/<node>/<module>, so without this another
    lab's agent, cleaning "its" group, kills this lab's application (seen as restarts and
    failovers no fault caused). The agents' cgroup2 mount point is bound to
    <cgroup2>/tandem-bench-<prefix> instead.
    """
    wait_until_alone(_env_int("BENCH_WAIT_SECONDS", 120, 0, "120"))
    root = cgroup2_root()
    own: Path | None = None
    try:
        with Lab(tmp_path / "lab", heartbeat_networks=1, witness=True) as built:
            if root is not None:
                own = root / f"tandem-bench-{built.prefix}"
                own.mkdir()
                built.private_dirs[str(root)] = own
            with watching_neighbours(built.prefix):
                yield built
    finally:
        if own is not None:
            _remove_cgroups(own)


# --- figures ----------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median of `values` (which must not be empty)."""
    return float(statistics.median(values))


def ms(seconds: float) -> str:
    """Seconds as milliseconds for a table."""
    return f"{seconds * 1000:.0f} ms"


def met(ok: bool) -> str:
    """A goal's verdict in a report."""
    return "**met**" if ok else "**missed**"


def ratio(value: float, base: float) -> str:
    """value / base for a table ("n/a" when the base is zero)."""
    return f"{value / base:.2f}×" if base > 0 else "n/a"


def report(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a Markdown table (ready for BENCHMARKS.md), with the date and the machine."""
    lines = [
        "",
        f"### {title} — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        *(n.conditions() for n in _NEIGHBOURS),
    ]
    print("\n".join(lines), flush=True)


# --- probes of the VIP from the client ----------------------------------------------------


def _http_node(sock: socket.socket, timeout: float) -> str | None:
    """Ask the demo on a connected socket which node it runs on (None if it does not say)."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    request = f"GET /health HTTP/1.1\r\nHost: {VIP}\r\nConnection: close\r\n\r\n"
    data = b""
    try:
        sock.sendall(request.encode())
        while chunk := sock.recv(4096):
            data += chunk
    except OSError:
        return None
    _head, _, body = data.partition(b"\r\n\r\n")
    try:
        node = json.loads(body).get("node")
    except (ValueError, AttributeError):
        return None
    return str(node) if node is not None else None


def first_answer(
    lab: Lab,
    deadline: float,
    node: str | None = None,
    every: float = 0.01,
    give_up_after: float = 1.0,
) -> float | None:
    """When (time.monotonic()) a TCP connect from the client to VIP:8080 first succeeds.

    A new non-blocking connect starts every `every` seconds and each is given up after
    `give_up_after`, so a SYN lost to a node that is gone does not hide an address that
    came up meanwhile. With `node`, only a connection on which the demo says it runs on
    `node` counts. None if nothing succeeded by `deadline`.
    """
    client = lab.ns_name("client")
    sel = selectors.DefaultSelector()
    pending: dict[socket.socket, float] = {}
    next_try = time.monotonic()

    def drop(sock: socket.socket) -> None:
        sel.unregister(sock)
        sock.close()
        del pending[sock]

    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None
            if now >= next_try:
                next_try = now + every
                sock = netns_socket(client)
                sock.setblocking(False)
                err = sock.connect_ex((VIP, DEMO_PORT))
                if err == errno.EINPROGRESS:
                    pending[sock] = now
                    sel.register(sock, selectors.EVENT_WRITE)
                else:
                    sock.close()
            wait = max(0.0, min(next_try, deadline) - time.monotonic())
            for key, _ in sel.select(timeout=wait):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                done = time.monotonic()
                sel.unregister(ready)
                del pending[ready]
                with ready:
                    ok = ready.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                    if ok and node is not None:
                        ok = _http_node(ready, timeout=0.5) == node
                if ok:
                    return done
            now = time.monotonic()
            for sock, started in list(pending.items()):
                if now - started > give_up_after:
                    drop(sock)
    finally:
        for sock in list(pending):
            drop(sock)
        sel.close()


def send_garp(lab: Lab, node: str, interface: str = "eth0", count: int = 3) -> None:
    """Announce the VIP from `node` by gratuitous ARP, as the agent does (a request whose
    sender and target are both the VIP, broadcast)."""
    sock = netns_socket(
        lab.ns_name(node), socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)
    )
    with sock:
        sock.bind((interface, ETH_P_ARP))
        mac = bytes(sock.getsockname()[4])
        ip = socket.inet_aton(VIP)
        broadcast = b"\xff" * 6
        frame = (
            broadcast
            + mac
            + struct.pack("!H", ETH_P_ARP)
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
            + mac
            + ip
            + broadcast
            + ip
        )
        for _ in range(count):
            sock.send(frame)


# --- the demo application run by hand -------------------------------------------------


@dataclass(frozen=True)
class HandApp:
    """The demo application run by hand in a node's namespace, outside any agent."""

    lab: Lab
    node: str
    port: int = DEMO_PORT

    def _argv(self, script: str) -> list[str]:
        base = self.lab.tmp_dir / "hand-app" / self.node
        return [
            "env",
            f"TANDEM_DEMO_DIR={base}",
            f"PORT={self.port}",
            f"TANDEM_NODE={self.node}",
            str(DEMO / script),
        ]

    def start(self) -> float:
        """Run the demo's start.sh in the node; returns how long it took (s)."""
        return self._timed("start.sh")

    def stop(self) -> float:
        """Run the demo's stop.sh in the node; returns how long it took (s)."""
        return self._timed("stop.sh")

    def _timed(self, script: str) -> float:
        started = time.monotonic()
        done = self.lab.exec(self.node, self._argv(script), check=False, timeout=60)
        took = time.monotonic() - started
        if done.returncode != 0:
            raise AssertionError(f"demo {script} in {self.node} failed: {done.stderr}")
        return took


@contextlib.contextmanager
def hand_apps(lab: Lab, nodes: Sequence[str], port: int = DEMO_PORT) -> Iterator[list[HandApp]]:
    """Start the demo by hand on `nodes`; stopped again whatever happens."""
    apps: list[HandApp] = []
    try:
        for node in nodes:
            app = HandApp(lab, node, port)
            apps.append(app)
            app.start()
        yield apps
    finally:
        for app in apps:
            with contextlib.suppress(AssertionError, LabError):
                app.stop()


# --- load on the host -------------------------------------------------------------------

_BUSY = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
_WRITER = """
import os, signal, sys, time
stop = False
def halt(signum, frame):
    global stop
    stop = True
signal.signal(signal.SIGTERM, halt)
end = time.monotonic() + {seconds}
block = os.urandom(64 * 1024)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
count = 0
while not stop and time.monotonic() < end:
    if count % 1024 == 0:
        os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, block)
    os.fsync(fd)
    count += 1
os.close(fd)
os.unlink(sys.argv[1])
print(count, flush=True)
"""


def stress_ng() -> str | None:
    """stress-ng's path: installed with apt-get when missing and we are root; else None."""
    found = shutil.which("stress-ng")
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "stress-ng"]
    for step in ([], ["apt-get", "update", "-qq"]):
        if step:
            subprocess.run(step, env=env, capture_output=True, timeout=600, check=False)
        subprocess.run(install, env=env, capture_output=True, timeout=600, check=False)
        found = shutil.which("stress-ng")
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def cpu_hog() -> str | None:
    """stress-ng if it is (or can be made) available; None means Python busy loops."""
    return stress_ng()


@dataclass
class Load:
    """CPU hogs (2 per core) and disk writers (write + fsync loops in /tmp) on the host."""

    seconds: float
    stress: str | None
    writers: int = 2
    cpu_procs: int = 2 * (os.cpu_count() or 1)

    def __post_init__(self) -> None:
        self._procs: list[subprocess.Popen[str]] = []
        self._writer_procs: list[subprocess.Popen[str]] = []
        self._files: list[Path] = []
        self.fsyncs = 0

    @property
    def cpu_tool(self) -> str:
        """What makes the CPU load, for the report."""
        if self.stress:
            return f"stress-ng --cpu {self.cpu_procs}"
        return f"{self.cpu_procs} Python busy loops"

    def _spawn(self, argv: Sequence[str]) -> subprocess.Popen[str]:
        # A session of its own: the whole group (stress-ng forks workers) is stopped by id.
        proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self._procs.append(proc)
        return proc

    def __enter__(self) -> Load:
        # Every hog also ends by itself shortly after the period, should the test die hard.
        limit = int(self.seconds) + 30
        try:
            if self.stress:
                self._spawn(
                    [self.stress, "--cpu", str(self.cpu_procs), "--timeout", f"{limit}s", "-q"]
                )
            else:
                for _ in range(self.cpu_procs):
                    self._spawn([sys.executable, "-c", _BUSY.format(seconds=limit)])
            for n in range(self.writers):
                target = Path("/tmp") / f"tandem-bench-{os.getpid()}-{n}.dat"
                self._files.append(target)
                code = _WRITER.format(seconds=limit)
                self._writer_procs.append(self._spawn([sys.executable, "-c", code, str(target)]))
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every hog and writer (their whole process groups) and count the fsyncs."""
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self._procs:
            try:
                out, _ = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate(timeout=15)
            if proc in self._writer_procs and out.strip().isdigit():
                self.fsyncs += int(out.strip())
        self._procs.clear()
        for target in self._files:
            # A writer that had to be killed could not remove its file.
            target.unlink(missing_ok=True)


class CpuMeter:
    """The share of the machine's CPU time spent busy between start and read (from
    /proc/stat)."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    def busy(self) -> float:
        """Busy share (0..1) since this meter was made."""
        total, idle = self._sample()
        dt = total - self._start[0]
        return 1.0 - (idle - self._start[1]) / dt if dt > 0 else 0.0


def timed(action: Callable[[], object]) -> float:
    """How long `action()` takes (s)."""
    started = time.monotonic()
    action()
    return time.monotonic() - started
