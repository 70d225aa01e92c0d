"""A primary and a secondary mirror process for one module with one directory, without agents.

Two network namespaces joined by a veth pair (primary 198.18.210.1, secondary 198.18.210.2),
each mirror process started in its own namespace by `ip netns exec` (which also gives it a
mount namespace of its own: the primary's FUSE mount and the secondary's read-only bind are
seen only inside, so from here each directory's path shows its real backing files). A small
acceptor in the secondary's namespace stands in for the agent: it reads the HELLO and hands
the socket to the secondary's mirror process with SCM_RIGHTS, as `on_peer_stream` does.

Options: the replication mode, the link shaped with tbf, a userspace delay proxy in the path
(tests/bench/delay_proxy.py). Everything is removed by `close()`, even after a failure; a
crashed run's namespaces are removed by the next one (the registry in /run names the owner).

Also here: `SoloMirror` (a primary mirror process with no peer, journalling ALONE) and
`FuseAlone` (MirrorFS with a LocalReplicator: the FUSE passthrough cost alone), each in a
mount namespace of its own, and link probes (TCP round trip, TCP rate, stream byte counts).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from blake3 import blake3

from agent.keys import generate_key_file, load_key
from agent.mirror import link
from tests.lab import (
    LabError,
    _proc_start,
    _run,
    delete_netns,
    netns_socket,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent
DELAY_PROXY = REPO / "tests" / "bench" / "delay_proxy.py"
REGISTRY = Path("/run/tandem-mirror-pair")
PRIMARY_ADDRESS = "198.18.210.1"
SECONDARY_ADDRESS = "198.18.210.2"
PEER_PORT = 7702
PROXY_PORT = 7703
PROBE_PORT = 7704
PROBE_PROXY_PORT = 7705
TBF = ("burst", "256kb", "latency", "20ms")
MODES = ("sync", "flush", "async")
RESYNCS = ("none", "incremental", "full")
_NAME = re.compile(r"^tmp[0-9a-f]{6}-(p|s)$")


class PairError(LabError):
    """The pair could not be built, driven or removed; the message says what and why."""


def cleanup_stale() -> list[str]:
    """Delete the namespaces of pairs whose owning process is gone; returns their names."""
    removed: list[str] = []
    if not REGISTRY.is_dir():
        return removed
    for entry in REGISTRY.glob("*.json"):
        try:
            info = json.loads(entry.read_text())
        except (OSError, ValueError):
            info = {}
        if _proc_start(int(info.get("pid", 0))) == info.get("start"):
            continue  # its owner still runs
        for ns in info.get("namespaces", []):
            if _NAME.match(ns):
                with contextlib.suppress(LabError):
                    delete_netns(ns)
                    removed.append(ns)
        entry.unlink(missing_ok=True)
    return removed


# --- a mirror process and its control channel ------------------------------------------------


class MirrorProcess:
    """One `python -m agent.mirror.process` with its control socket and the events it sent.

    `prefix` runs it somewhere else (["ip", "netns", "exec", NS] or ["unshare", "-m"]); both
    exec the interpreter, so `pid` is the mirror process itself (what `nsenter -t` needs).
    """

    def __init__(self, spec: dict[str, Any], prefix: Sequence[str], log: Path) -> None:
        self.spec = spec
        self.name = f"{spec['role']} {spec['node']}"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = ours
        self._send_lock = threading.Lock()
        self._log: IO[bytes] = open(log, "ab")  # noqa: SIM115 - closed in close()
        argv = [*prefix, sys.executable, "-m", "agent.mirror.process", json.dumps(spec)]
        try:
            self.proc = subprocess.Popen(
                [*argv, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
                cwd=REPO,
            )
        except OSError as exc:
            ours.close()
            self._log.close()
            raise PairError(f"cannot start the {self.name} mirror process: {exc}") from None
        finally:
            theirs.close()
        self.pid = self.proc.pid
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"events {self.name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            buffer += data
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                message["at"] = time.monotonic()
                with self._cond:
                    self.events.append(message)
                    self._cond.notify_all()
        with self._cond:
            self.events.append({"event": "exited", "at": time.monotonic()})
            self._cond.notify_all()

    def mark(self) -> int:
        """A position in the event list: wait_event(since=mark) sees only later events."""
        with self._cond:
            return len(self.events)

    def wait_event(
        self,
        kinds: Sequence[str],
        since: int = 0,
        timeout: float = 30.0,
        fail: Sequence[str] = ("exited", "failed"),
    ) -> dict[str, Any]:
        """The first event of `kinds` at or after `since`; PairError on a `fail` event or time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self.events[since:]:
                    if message.get("event") in kinds:
                        return message
                    if message.get("event") in fail:
                        raise PairError(f"{self.name} mirror: {message} (log: {self._log.name})")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PairError(
                        f"{self.name} mirror: no {'/'.join(kinds)} event within {timeout:g} s "
                        f"(log: {self._log.name})"
                    )
                self._cond.wait(left)

    def since(self, mark: int, kind: str) -> list[dict[str, Any]]:
        """Every `kind` event after `mark`."""
        with self._cond:
            return [m for m in self.events[mark:] if m.get("event") == kind]

    def send(self, command: dict[str, Any], fds: Sequence[int] = ()) -> None:
        data = (json.dumps(command, separators=(",", ":")) + "\n").encode()
        with self._send_lock:
            try:
                if fds:
                    socket.send_fds(self._sock, [data], list(fds))
                else:
                    self._sock.sendall(data)
            except OSError as exc:
                raise PairError(f"{self.name} mirror: cannot send {command}: {exc}") from None

    def lose_agent(self) -> None:
        """Close the agent's end of the control socket, as when the agent is killed."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self, timeout: float = 20.0) -> None:
        """Ask it to stop (it unmounts), then kill it if it does not exit in time."""
        if self.proc.poll() is None:
            with contextlib.suppress(PairError):
                self.send({"cmd": "stop"})
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._sock.close()
        self._reader.join(timeout=5)
        self._log.close()


def _spec(
    role: str,
    node: str,
    directory: Path,
    key_file: Path,
    state: Path,
    mode: str,
    ack_timeout: float,
    resync_rate: int | None = None,
) -> dict[str, Any]:
    return {
        "module": "bench",
        "node": node,
        "cluster": "pair",
        "role": role,
        "dirs": [{"path": str(directory), "exclude": []}],
        "mode": mode,
        "ack_timeout": ack_timeout,
        "resync_rate_bps": resync_rate,
        "state_dir": str(state / "mirror"),
        "quarantine_dir": str(state / "quarantine"),
        "key_file": str(key_file),
    }


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise PairError(f"{name}={value!r}: expected one of {', '.join(choices)}")


# --- the pair ---------------------------------------------------------------------------------


class MirrorPair:
    """A primary and a secondary mirror process for one directory, joined by a veth pair.

    `mode`: sync, flush or async. `shaped`: a tbf rate ("1gbit") on both ends of the veth.
    `delay_ms`: a delay proxy in the secondary's namespace adds this much each way (its
    measured round trip is `rtt()` with via_proxy=True). Use as a context manager or call
    `close()`; `connect()` starts the stream and returns the primary's `resync_done` event.
    Until `connect()` (or `alone()`) the primary holds every write, as it does until its agent
    decides where writes go.
    """

    def __init__(
        self,
        base: Path,
        *,
        mode: str = "sync",
        shaped: str | None = None,
        delay_ms: float | None = None,
        ack_timeout: float = 60.0,
        resync_rate: int | None = None,
    ) -> None:
        _check_choice("mode", mode, MODES)
        if delay_ms is not None and delay_ms < 0:
            raise PairError(f"delay_ms={delay_ms}: give a delay of 0 ms or more")
        self.base = Path(base).absolute()
        self.mode = mode
        self.delay_ms = delay_ms
        self.tag = secrets.token_hex(3)
        self.ns_primary = f"tmp{self.tag}-p"
        self.ns_secondary = f"tmp{self.tag}-s"
        self.nodes = ("node1", "node2")  # the primary's, the secondary's (swapped by a crash)
        self.ready: dict[str, Any] = {}  # the primary's `ready` event
        self.primary_address, self.secondary_address = PRIMARY_ADDRESS, SECONDARY_ADDRESS
        self.primary_dir = self.base / "node1" / "data"
        self.secondary_dir = self.base / "node2" / "data"
        self.key_file = self.base / "cluster.key"
        self.primary: MirrorProcess | None = None
        self.secondary: MirrorProcess | None = None
        self._proxies: list[subprocess.Popen[str]] = []
        self._created: list[str] = []
        self._registered = REGISTRY / f"{self.tag}.json"
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._closed = False
        self.resync_rate = resync_rate
        try:
            self._build(shaped, ack_timeout)
        except BaseException:
            self.close()
            raise

    # --- building and removing ----------------------------------------------------------------

    def _build(self, shaped: str | None, ack_timeout: float) -> None:
        cleanup_stale()
        REGISTRY.mkdir(parents=True, exist_ok=True)
        start = _proc_start(os.getpid())
        names = [self.ns_primary, self.ns_secondary]
        self._registered.write_text(
            json.dumps({"pid": os.getpid(), "start": start, "namespaces": names})
        )
        for ns in names:
            _run(["ip", "netns", "add", ns])
            self._created.append(ns)
        veth = f"link add eth0 netns {self.ns_primary} type veth peer name eth0 netns"
        _run(["ip", *veth.split(), self.ns_secondary])
        for ns, address in (
            (self.ns_primary, PRIMARY_ADDRESS),
            (self.ns_secondary, SECONDARY_ADDRESS),
        ):
            self.ip(ns, "addr", "add", f"{address}/24", "dev", "eth0")
            self.ip(ns, "link", "set", "eth0", "up")
            self.ip(ns, "link", "set", "lo", "up")
        if shaped:
            self.shape(shaped)
        self.base.mkdir(parents=True, exist_ok=True)
        for d in (self.primary_dir, self.secondary_dir):
            d.mkdir(parents=True, exist_ok=True)
        generate_key_file(self.key_file)
        self._key = load_key(self.key_file)
        self._ack_timeout = ack_timeout
        self._start_processes(proxy=self.delay_ms is not None)

    def _start_processes(self, proxy: bool, primary_extra: dict[str, Any] | None = None) -> None:
        """The secondary, its acceptor (and delay proxy), then the primary."""
        primary, secondary = self.nodes
        self.secondary = MirrorProcess(
            _spec("secondary", secondary, self.secondary_dir, self.key_file,
                  self.base / secondary, self.mode, self._ack_timeout),
            ["ip", "netns", "exec", self.ns_secondary],
            self.base / f"{secondary}.log",
        )  # fmt: skip
        self.secondary.wait_event(["ready"])
        self._start_acceptor()
        if proxy and self.delay_ms is not None:
            self._proxies.append(
                self._start_proxy(PROXY_PORT, ("127.0.0.1", PEER_PORT), self.delay_ms)
            )
        self.primary = MirrorProcess(
            {**_spec("primary", primary, self.primary_dir, self.key_file,
                     self.base / primary, self.mode, self._ack_timeout, self.resync_rate),
             **(primary_extra or {})},
            ["ip", "netns", "exec", self.ns_primary],
            self.base / f"{primary}.log",
        )  # fmt: skip
        self.ready = self.primary.wait_event(["ready"])

    @contextlib.contextmanager
    def frozen_secondary(self) -> Iterator[None]:
        """Inside the block the secondary applies nothing (SIGSTOP): the primary's writes stay
        in flight. Resumed after it, unless the pair crashed and swapped meanwhile."""
        assert self.secondary is not None
        pid = self.secondary.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def crash_with_write_in_flight(
        self,
        name: str,
        offset: int,
        size: int,
        *,
        swap: bool,
        adopt_activity: bool = False,
        seen_as: str | None = None,
    ) -> None:
        """A writer overwrites `size` bytes of `name` at `offset` with the secondary frozen; once
        they are in the primary's copy (looked for at `seen_as`, another name of the file, if
        given), both nodes crash (`crash`). The writer is gone afterwards."""
        writer = None
        try:
            with self.frozen_secondary():
                writer = start_write_in_flight(
                    self.primary_pid, self.primary_mount / name, offset, size
                )
                where = self.primary_dir / (seen_as or name)
                if not wait_for(lambda: holds_in_flight_write(where, offset), 30):
                    raise PairError(f"the write in flight never reached {where}")
                self.crash(swap=swap, adopt_activity=adopt_activity)
        finally:
            if writer is not None:  # after the secondary resumed (or died): it can end now
                writer.kill()
                writer.wait(timeout=60)

    def crash(self, *, swap: bool, adopt_activity: bool = False) -> None:
        """Both nodes lose power (mirror processes killed -9: what the primary wrote locally
        and the secondary never applied stays in its copy; frames the secondary holds are
        never applied), then come back, each on its own copy and state directory: `swap`, the
        secondary's node as primary (a failover); else the same roles, the primary told to
        adopt its activity log (`adopt_activity`) as its agent would."""
        if self.delay_ms is not None:
            raise PairError("crash: a pair with a delay proxy cannot restart its processes")
        assert self.primary is not None and self.secondary is not None
        for proc in (self.primary, self.secondary):
            proc.proc.kill()
            proc.close()
        self._stop_acceptor()
        if swap:
            self.nodes = (self.nodes[1], self.nodes[0])
            self.primary_dir, self.secondary_dir = self.secondary_dir, self.primary_dir
            self.ns_primary, self.ns_secondary = self.ns_secondary, self.ns_primary
            self.secondary_address, self.primary_address = (
                self.primary_address,
                self.secondary_address,
            )
        self._start_processes(proxy=False, primary_extra={"adopt_activity": adopt_activity})

    def ip(self, ns: str, *args: str) -> str:
        """`ip` run in namespace `ns`; PairError with its message if it fails."""
        return _run(["ip", "-n", ns, *args]).stdout

    def __enter__(self) -> MirrorPair:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop both mirror processes, the proxies and the acceptor; delete the namespaces."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for proc in (self.primary, self.secondary):
            if proc is not None:
                try:
                    proc.close()
                except (OSError, subprocess.SubprocessError) as exc:
                    errors.append(f"{proc.name}: {exc}")
        for proxy in self._proxies:
            _stop(proxy)
        self._stop_acceptor()
        for ns in reversed(self._created):
            try:
                delete_netns(ns)
            except LabError as exc:
                errors.append(str(exc))
        self._registered.unlink(missing_ok=True)
        if errors:
            raise PairError("mirror pair teardown left things behind: " + "; ".join(errors))

    # --- the agent's part ---------------------------------------------------------------------

    def _stop_acceptor(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
        self._listener = self._acceptor = None
        self._stopping = threading.Event()

    def _start_acceptor(self) -> None:
        listener = netns_socket(self.ns_secondary)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", PEER_PORT))
        listener.listen(8)
        listener.settimeout(0.2)
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept_loop, name="acceptor", daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None and self.secondary is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    hello = link.read_hello(conn, self._key)
                    self.secondary.send(
                        {"cmd": "accept", "hello": hello.raw.hex()}, fds=(conn.fileno(),)
                    )
                except Exception as exc:  # a stand-in agent: the primary logs why, never die
                    link.refuse(conn, self._key, str(exc))

    # --- driving the primary ------------------------------------------------------------------

    @property
    def primary_pid(self) -> int:
        assert self.primary is not None
        return self.primary.pid

    @property
    def primary_mount(self) -> Path:
        """Where writers write: this path inside the primary's mount namespace."""
        return self.primary_dir

    def peer(self) -> tuple[str, int]:
        """Where the primary connects: the acceptor, or the delay proxy in front of it."""
        return self.secondary_address, PEER_PORT if self.delay_ms is None else PROXY_PORT

    def connect(
        self, resync: str = "none", timeout: float = 1800.0, *, activity: bool = False
    ) -> dict[str, Any]:
        """Open the stream with this resync; returns `resync_done` (with `connected` in it).
        `activity`: ask the secondary for its activity log first (it crashed as primary)."""
        return self.resynced(self.begin_connect(resync, activity=activity), timeout)

    def begin_connect(self, resync: str = "none", *, activity: bool = False) -> int:
        """Open the stream with this resync and return at once: a mark for `resynced`."""
        _check_choice("resync", resync, RESYNCS)
        assert self.primary is not None and self.secondary is not None
        mark = self.primary.mark()
        address, port = self.peer()
        self.primary.send(
            {"cmd": "connect", "peer": {"address": address, "port": port}, "resync": resync,
             "done": {}, "activity": activity}
        )  # fmt: skip
        return mark

    def resynced(self, mark: int, timeout: float = 1800.0) -> dict[str, Any]:
        """The `resync_done` after `mark` (a `begin_connect`), with `connected` in it."""
        assert self.primary is not None
        fail = ("exited", "failed", "connect_failed", "resync_interrupted", "link_lost")
        connected = self.primary.wait_event(["connected"], mark, 30.0, fail)
        done = self.primary.wait_event(["resync_done"], mark, timeout, fail)
        return {**done, "connected": connected}

    def alone(self) -> None:
        """The agent's `alone`: the primary drops the stream and journals from now on."""
        assert self.primary is not None
        mark = self.primary.mark()
        self.primary.send({"cmd": "alone", "reason": "benchmark"})
        self.primary.wait_event(["alone"], mark)

    def figures(self, since: int = 0) -> list[dict[str, Any]]:
        """The primary's `figures` events after `since` (a mark())."""
        assert self.primary is not None
        return self.primary.since(since, "figures")

    # --- the link ----------------------------------------------------------------------------

    def shape(self, rate: str = "1gbit") -> None:
        """Limit both ends of the veth to `rate` with tbf (no netem in this kernel)."""
        for ns in (self.ns_primary, self.ns_secondary):
            _run(["tc", "-n", ns, "qdisc", "replace", "dev", "eth0", "root", "tbf",
                  "rate", rate, *TBF])  # fmt: skip

    def _start_proxy(
        self, port: int, target: tuple[str, int], delay_ms: float
    ) -> subprocess.Popen[str]:
        argv = ["ip", "netns", "exec", self.ns_secondary, sys.executable, str(DELAY_PROXY)]
        argv += [f"0.0.0.0:{port}", f"{target[0]}:{target[1]}", "--delay-ms", str(delay_ms)]
        proxy = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert proxy.stdout is not None
        line = proxy.stdout.readline().strip()
        if not line.startswith("ready"):
            _stop(proxy)
            raise PairError(f"the delay proxy did not start: {line or proxy.returncode}")
        return proxy

    def rtt(self, samples: int = 2000, via_proxy: bool = False) -> float:
        """Median TCP ping-pong round trip (s), primary → secondary, 1 byte each way."""
        proxy = None
        with _Server(netns_socket(self.ns_secondary), PROBE_PORT, _echo) as _server:
            port = PROBE_PORT
            if via_proxy:
                proxy = self._start_proxy(
                    PROBE_PROXY_PORT, ("127.0.0.1", PROBE_PORT), self.delay_ms or 0.0
                )
                port = PROBE_PROXY_PORT
            try:
                with netns_socket(self.ns_primary) as sock:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.connect((SECONDARY_ADDRESS, port))
                    times = []
                    for _ in range(samples):
                        start = time.perf_counter()
                        sock.sendall(b"x")
                        if not sock.recv(1):
                            raise PairError("the echo server closed the connection")
                        times.append(time.perf_counter() - start)
            finally:
                if proxy is not None:
                    _stop(proxy)
        return float(statistics.median(times))

    def tcp_rate(self, nbytes: int, reply_every: int | None = None) -> float:
        """Bytes/s of one plain TCP transfer primary → secondary (the link's raw rate).

        With `reply_every`, the sender waits for a 1-byte reply after each `reply_every`
        bytes (stop-and-wait, as a single writer in sync mode does with its acks).
        """
        chunk = reply_every or (1 << 20)
        count = max(1, nbytes // chunk)
        received: list[float] = []

        def sink(conn: socket.socket) -> None:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buffer = memoryview(bytearray(chunk))
            for _ in range(count):
                got = 0
                while got < chunk:
                    n = conn.recv_into(buffer[got:])
                    if not n:
                        return
                    got += n
                if reply_every:
                    conn.sendall(b"k")
            received.append(time.perf_counter())
            conn.sendall(b"k")

        with (
            _Server(netns_socket(self.ns_secondary), PROBE_PORT, sink),
            netns_socket(self.ns_primary) as sock,
        ):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
            sock.connect((SECONDARY_ADDRESS, PROBE_PORT))
            data = bytes(chunk)
            start = time.perf_counter()
            for _ in range(count):
                sock.sendall(data)
                if reply_every and not sock.recv(1):
                    raise PairError("the TCP sink closed the connection")
            sock.recv(1)
            end = received[0] if received else time.perf_counter()
        return count * chunk / (end - start)

    def stream_bytes(self) -> tuple[int, int]:
        """TCP payload bytes (sent, received) on the primary's replication connection(s) now."""
        _address, port = self.peer()
        out = _run(
            ["ip", "netns", "exec", self.ns_primary, "ss", "-tinH", "state", "established",
             f"( dport = :{port} )"]
        ).stdout  # fmt: skip
        sent = sum(int(v) for v in re.findall(r"\bbytes_acked:(\d+)", out))
        got = sum(int(v) for v in re.findall(r"\bbytes_received:(\d+)", out))
        return sent, got


# --- probes' servers -----------------------------------------------------------------------


def _echo(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(4096):
        conn.sendall(data)


class _Server:
    """One connection served by `handler` in a thread; closed on exit."""

    def __init__(self, sock: socket.socket, port: int, handler: Callable[[socket.socket], None]):
        self.sock = sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
        sock.bind(("0.0.0.0", port))
        sock.listen(1)
        self.handler = handler
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn, contextlib.suppress(OSError):
            self.handler(conn)

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=10)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


# --- one side alone ---------------------------------------------------------------------------


class SoloMirror:
    """A primary mirror process with no peer (journalling ALONE), in its own mount namespace."""

    def __init__(self, base: Path, mode: str = "sync") -> None:
        _check_choice("mode", mode, MODES)
        self.base = Path(base).absolute()
        self.directory = self.base / "data"
        self.directory.mkdir(parents=True, exist_ok=True)
        key = self.base / "cluster.key"
        generate_key_file(key)
        self.process = MirrorProcess(
            _spec("primary", "node1", self.directory, key, self.base, mode, 60.0),
            ["unshare", "-m", "--propagation", "private"],
            self.base / "primary.log",
        )
        try:
            self.process.wait_event(["ready"])
            # A primary holds writes until the agent says where they go; alone: the journal.
            mark = self.process.mark()
            self.process.send({"cmd": "alone", "reason": "no peer in this benchmark"})
            self.process.wait_event(["alone"], mark)
        except BaseException:
            self.process.close()
            raise
        self.pid = self.process.pid

    def close(self) -> None:
        self.process.close()


FUSE_ALONE = """
import sys
from pathlib import Path
from agent.mirror.excludes import Excludes
from agent.mirror.fs import MirrorMount
from agent.mirror.replicator import LocalReplicator
mount = MirrorMount(Path(sys.argv[1]), 0, LocalReplicator(), Excludes([]))
mount.start()
print("ready", flush=True)
sys.stdin.read()
mount.stop()
"""


class FuseAlone:
    """MirrorFS over a directory with a LocalReplicator (no journal, no peer): FUSE's own cost."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", sys.executable, "-c", FUSE_ALONE,
             str(self.directory)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise PairError(f"MirrorFS with a LocalReplicator did not mount {self.directory}")
        self.pid = self.proc.pid

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def file_digest(path: Path) -> str:
    """BLAKE3 of a file's content, read in 8 MiB pieces (files of several GiB)."""
    hasher = blake3()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            hasher.update(chunk)
    return str(hasher.hexdigest())


def assert_same_copies(pair: MirrorPair, names: Sequence[str]) -> None:
    """The secondary holds exactly the primary's files (else the product is broken)."""
    for name in names:
        a, b = pair.primary_dir / name, pair.secondary_dir / name
        assert file_digest(a) == file_digest(b), (
            f"{pair.mode}: the secondary's {name} differs from {a}"
        )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PeakRss:
    """The largest resident set of a process while the block runs (sampled every 50 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak rss", daemon=True)

    def _sample(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.peak_bytes = max(self.peak_bytes, int(line.split()[1]) * 1024)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> PeakRss:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()


def run_in_mount_ns(
    pid: int | None, argv: Sequence[str], timeout: float = 3600
) -> subprocess.CompletedProcess[str]:
    """Run `argv` in the mount namespace of `pid` (None: here); PairError if it fails."""
    prefix = [] if pid is None else ["nsenter", "-t", str(pid), "-m", "--"]
    return _run([*prefix, *argv], timeout=timeout)


# --- workloads (writers run where a mount is seen: pid None = here) ----------------------------

SMALL_WRITER = """
import json, os, random, sys, time
path, file_bytes, count, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
fd = os.open(path, os.O_RDWR)
rng = random.Random(7)
block = os.urandom(4096)
blocks = file_bytes // 4096
offsets = [rng.randrange(blocks) * 4096 for _ in range(count)]
lat = []
start = time.perf_counter()
last = start
for i, offset in enumerate(offsets, 1):
    os.pwrite(fd, block, offset)
    if i % every == 0:
        os.fsync(fd)
        now = time.perf_counter()
        lat.append(now - last)
        last = now
took = time.perf_counter() - start
os.close(fd)
lat.sort()
print(json.dumps({"ops_per_s": count / took, "p50_s": lat[len(lat) // 2],
                  "p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))]}))
"""

FILLER = """
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
pattern = os.urandom(64 << 20)
view = memoryview(pattern)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
done = 0
while done < size:
    chunk = min(1 << 20, size - done)
    start = (done * 7) % (len(pattern) - chunk)
    os.write(fd, view[start : start + chunk])
    done += chunk
os.fdatasync(fd)
os.close(fd)
"""

SCATTER = """
import json, os, random, sys
path, size, fraction = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
run, seed = int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
slots = size // run
count = max(1, int(size * fraction) // run)
chosen = sorted(rng.sample(range(slots), count))
fd = os.open(path, os.O_WRONLY)
data = os.urandom(run)
for slot in chosen:
    os.pwrite(fd, data, slot * run)
os.fdatasync(fd)
os.close(fd)
print(json.dumps({"changed_bytes": count * run, "writes": count}))
"""


IN_FLIGHT_WRITE = """
import os, sys
path, offset, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_WRONLY)
os.pwrite(fd, b"Z" * size, offset)
"""


def start_write_in_flight(pid: int, path: Path, offset: int, size: int) -> subprocess.Popen[bytes]:
    """A writer in the mount namespace of `pid` overwriting `size` bytes of `path` at `offset`
    with "Z"s (with a frozen secondary it stays in flight: the caller kills it)."""
    return subprocess.Popen(
        ["nsenter", "-t", str(pid), "-m", "--", sys.executable, "-c", IN_FLIGHT_WRITE, str(path),
         str(offset), str(size)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def holds_in_flight_write(path: Path, offset: int) -> bool:
    """Whether the copy at `path` (a backing file) holds start_write_in_flight's bytes."""
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(4) == b"ZZZZ"


def bench_scale(name: str = "TANDEM_BENCH_SCALE") -> float:
    """The size factor of the benchmarks (env TANDEM_BENCH_SCALE, default 1; 0.1 is quick)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value <= 100:
        raise PairError(f"{name}={raw!r}: give a factor between 0 and 100, e.g. {name}=0.1")
    return value


def dd_write(pid: int | None, path: Path, mib: int) -> float:
    """Bytes/s of dd overwriting `mib` MiB of `path` in 1 MiB writes, fdatasync included."""
    argv = ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fdatasync,notrunc"]
    done = run_in_mount_ns(pid, argv)
    found = re.search(r"^(\d+) bytes .* copied, ([0-9.]+) s", done.stderr, re.MULTILINE)
    if found is None:
        raise PairError(f"dd said nothing we can read: {done.stderr.strip()}")
    return int(found[1]) / float(found[2])


def small_writes(
    pid: int | None, path: Path, file_bytes: int, count: int, fsync_every: int
) -> dict[str, float]:
    """4 KiB random overwrites, an fsync every `fsync_every`: ops/s and the p50/p99 time of
    each group of writes with its fsync (with fsync_every=1: one fsync'd write)."""
    argv = [sys.executable, "-c", SMALL_WRITER, str(path), str(file_bytes), str(count)]
    done = run_in_mount_ns(pid, [*argv, str(fsync_every)])
    result: dict[str, float] = json.loads(done.stdout)
    return result


def fill(pid: int | None, path: Path, size: int) -> None:
    """Write `size` bytes of incompressible data to a new `path` (fdatasync at the end)."""
    run_in_mount_ns(pid, [sys.executable, "-c", FILLER, str(path), str(size)])


def scatter(pid: int | None, path: Path, size: int, fraction: float, run: int, seed: int) -> int:
    """Overwrite `fraction` of `path` in distinct aligned runs of `run` bytes at random places;
    returns the bytes changed."""
    argv = [sys.executable, "-c", SCATTER, str(path), str(size), str(fraction), str(run)]
    done = run_in_mount_ns(pid, [*argv, str(seed)])
    return int(json.loads(done.stdout)["changed_bytes"])
