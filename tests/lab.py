"""A two-node lab in network namespaces: the real parts the system tests and the demo run on.

Layout (DESIGN.md, "Testing with real parts"), every name starting with a unique prefix:

    <p>-lan   bridge br0 = 198.18.0.0/24 (and br1 = 198.18.1.0/24 with two heartbeat networks)
    <p>-n1    node1: eth0 198.18.0.1/24 (eth1 198.18.1.1/24)
    <p>-n2    node2: eth0 198.18.0.2/24 (eth1 198.18.1.2/24)
    <p>-cl    client: eth0 198.18.0.10/24
    <p>-wi    witness: eth0 198.18.0.254/24

Faults are real: power loss kills every process of a node and takes its NICs down, a cable
is pulled by taking the bridge side of a veth down, nftables drops heartbeats. Address
changes are recorded from netlink events (VipWatch), never by polling. Everything a lab
creates is registered in /run/tandem-lab so `close()` and `cleanup_stale()` remove it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import http.client
import json
import os
import re
import secrets
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import urlsplit

import yaml

NODES = ("node1", "node2")
HEARTBEAT_PORT = 7701
WITNESS_PORT = 7710
WITNESS_ADDRESS = "198.18.0.254"
CLIENT_ADDRESS = "198.18.0.10"
DEFAULT_TIMING: Mapping[str, float] = {"heartbeat_interval": 0.25, "peer_timeout": 1.5}
_PREFIX = r"t[0-9a-f]{4}"
STALE_PATTERN = rf"^{_PREFIX}-(lan|n1|n2|cl|wi)$"
REGISTRY = Path("/run/tandem-lab")
NETNS_DIR = Path("/run/netns")


class LabError(Exception):
    """Something in the lab could not be built, changed or removed; the message says what."""


@dataclass(frozen=True)
class _Member:
    """One namespace attached to the LAN: its role, short name and host number."""

    role: str
    short: str
    host: int
    networks: tuple[int, ...]


def subnet_address(net: int, host: int) -> str:
    """The address of `host` on lab network `net` (198.18.<net>.<host>)."""
    return f"198.18.{net}.{host}"


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass; True if it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --- commands ---------------------------------------------------------------------------


def _run(
    argv: Sequence[str], *, input: str | None = None, check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; a failure raises LabError quoting the command and stderr."""
    try:
        done = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"`{shlex.join(argv)}` failed: {exc}") from None
    if check and done.returncode != 0:
        raise LabError(
            f"`{shlex.join(argv)}` exited {done.returncode}: {done.stderr.strip() or done.stdout}"
        )
    return done


# --- network namespaces from inside this process ----------------------------------------

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Move the calling thread (only it) into namespace `name` for the block.

    A socket keeps the namespace it was created in, so sockets made in this block work in
    the lab while this process stays in the root namespace: `ip netns pids` never lists it
    and a power loss never kills the test itself.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise LabError(f"no network namespace {name!r}") from None
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def netns_socket(
    name: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM, proto: int = 0
) -> socket.socket:
    """A socket living in namespace `name` (see in_netns)."""
    with in_netns(name):
        return socket.socket(family, kind, proto)


def _netns_inode(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(NETNS_DIR / name)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pid_netns(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pids_in_netns(name: str) -> list[int]:
    """Every process whose network namespace is `name` (what `ip netns pids` prints)."""
    ident = _netns_inode(name)
    if ident is None:
        return []
    found = []
    for entry in os.listdir("/proc"):
        # A zombie or an exited process has no namespace left: nothing to kill.
        if entry.isdigit() and int(entry) != os.getpid() and _pid_netns(int(entry)) == ident:
            found.append(int(entry))
    return found


def kill_netns_processes(name: str, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
    """Send `sig` to every process in namespace `name`; with SIGKILL, until none is left.

    Returns how many processes were signalled. Processes forked meanwhile are caught by
    the next round.
    """
    signalled: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        pids = pids_in_netns(name)
        fresh = [p for p in pids if sig == signal.SIGKILL or p not in signalled]
        for pid in fresh:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            signalled.add(pid)
        if sig != signal.SIGKILL or not pids:
            return len(signalled)
        if time.monotonic() >= deadline:
            raise LabError(f"processes {pids} in {name} survive SIGKILL (stuck in the kernel?)")
        time.sleep(0.01)


def delete_netns(name: str) -> None:
    """Kill what runs in namespace `name`, then delete it."""
    kill_netns_processes(name)
    if _netns_inode(name) is not None or (NETNS_DIR / name).exists():
        _run(["ip", "netns", "delete", name])


# --- host facts -------------------------------------------------------------------------


def _mountinfo() -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount this process sees."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        point = left.split()[4].replace("\\040", " ")
        mounts.append((point, right.split()[0]))
    return mounts


def cgroup2_root() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted on this host (None if it is not)."""
    for point, fstype in _mountinfo():
        if fstype == "cgroup2":
            return Path(point)
    return None


def _proc_start(pid: int) -> int | None:
    """The start time of `pid` (clock ticks since boot); tells a pid from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def _remove_cgroup_tree(top: Path) -> list[str]:
    """Remove `top` and the cgroups below it, deepest first; returns what could not go."""
    if not top.is_dir():
        return []
    left = []
    for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
        try:
            os.rmdir(dirpath)
        except OSError as exc:
            left.append(f"{dirpath}: {exc.strerror}")
    return left


# --- registry of labs on this host ------------------------------------------------------


@contextlib.contextmanager
def _registry_lock() -> Iterator[None]:
    REGISTRY.mkdir(parents=True, exist_ok=True)
    fd = os.open(REGISTRY / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_registry() -> dict[str, dict[str, Any]]:
    """Lab prefix -> its entry (an unreadable entry reads as {}: its owner counts as dead)."""
    entries: dict[str, dict[str, Any]] = {}
    for path in REGISTRY.glob("t*.json"):
        if not re.fullmatch(_PREFIX, path.stem):
            continue
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            entry = {}
        entries[path.stem] = entry if isinstance(entry, dict) else {}
    return entries


def _owner_alive(entry: Mapping[str, Any]) -> bool:
    pid, start = entry.get("pid"), entry.get("start")
    return isinstance(pid, int) and start is not None and _proc_start(pid) == start


def _unused_by_live_labs(path: str, entries: Mapping[str, Mapping[str, Any]], me: str) -> bool:
    """True if no other live lab mounts on or below `path` (then it is safe to rmdir)."""
    for prefix, entry in entries.items():
        if prefix == me or not _owner_alive(entry):
            continue
        for used in entry.get("node_paths", []):
            if used == path or used.startswith(path.rstrip("/") + "/"):
                return False
    return True


def _sweep_host_dirs(entries: Mapping[str, Mapping[str, Any]], me: str) -> None:
    """rmdir the mount points labs created, deepest first, once no live lab uses them.

    Removing a directory that is a mount point in another mount namespace detaches that
    mount there (Linux >= 3.18), so a path another live lab uses is left alone; the last
    lab to stop using it removes it. Call with the registry lock held.
    """
    shared = REGISTRY / "host-dirs"
    try:
        dirs = set(json.loads(shared.read_text()))
    except (OSError, ValueError):
        dirs = set()
    for entry in entries.values():
        dirs |= set(entry.get("host_dirs", []))
    keep = set()
    for d in sorted(dirs, key=len, reverse=True):
        if not _unused_by_live_labs(d, entries, me):
            keep.add(d)
            continue
        with contextlib.suppress(OSError):
            os.rmdir(d)
    shared.write_text(json.dumps(sorted(keep)))


def _cgroups_are_mine(entries: Mapping[str, Mapping[str, Any]], me: str) -> bool:
    """True if no other live lab runs: agents of every lab use <cgroup2>/tandem/<node>."""
    return not any(_owner_alive(e) for p, e in entries.items() if p != me)


def cleanup_stale(pattern: str = STALE_PATTERN) -> list[str]:
    """Remove what crashed earlier labs left: namespaces matching `pattern`, their mount points.

    A namespace is kept while the process that built its lab is alive, so this is safe to
    run while other labs are in use. Returns the namespaces removed.
    """
    removed = []
    with _registry_lock():
        entries = _read_registry()
        live = {p for p, e in entries.items() if _owner_alive(e)}
        live_ns = {ns for p in live for ns in entries[p].get("namespaces", [])}
        dead_ns = {
            ns for p, e in entries.items() if p not in live for ns in e.get("namespaces", [])
        }
        present = set(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else set()
        for ns in sorted(present):
            if ns in live_ns or not (re.match(pattern, ns) or ns in dead_ns):
                continue
            delete_netns(ns)
            removed.append(ns)
        _sweep_host_dirs(entries, "")
        for prefix in set(entries) - live:
            (REGISTRY / f"{prefix}.json").unlink(missing_ok=True)
        root = cgroup2_root()
        if root is not None and not live:
            for node in NODES:
                _remove_cgroup_tree(root / "tandem" / node)
            with contextlib.suppress(OSError):
                os.rmdir(root / "tandem")
    return removed


# --- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpResult:
    """An HTTP answer received in the lab."""

    status: int
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


class _NetnsHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection whose socket lives in a lab namespace."""

    def __init__(self, netns: str, host: str, port: int | None, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._netns = netns

    def connect(self) -> None:
        sock = netns_socket(self._netns)
        try:
            sock.settimeout(self.timeout)
            sock.connect((self.host, self.port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


# --- the lab ----------------------------------------------------------------------------


class Lab:
    """Two nodes, a client and a witness on one or two bridged networks, in namespaces.

    Build it with `Lab(tmp_dir)` (or as a context manager); `close()` removes everything,
    also when the build failed half way. Methods take a role ("node1", "node2", "client",
    "witness", "lan") or a namespace name wherever they say `where`.
    """

    def __init__(
        self,
        tmp_dir: Path,
        heartbeat_networks: int = 1,
        witness: bool = True,
        *,
        agent_command: Sequence[str] | None = None,
        witness_command: Sequence[str] | None = None,
    ) -> None:
        if heartbeat_networks not in (1, 2):
            raise LabError(f"heartbeat_networks={heartbeat_networks}: the lab has 1 or 2 networks")
        self.tmp_dir = Path(tmp_dir).absolute()
        self.heartbeat_networks = heartbeat_networks
        self.has_witness = witness
        self.heartbeat_port = HEARTBEAT_PORT
        # Private directories every agent gets (start_agent's own private_dirs add to them).
        self.private_dirs: dict[str, Path] = {}
        self.agent_command = list(agent_command or [_tool("tandem-agent")])
        self.witness_command = list(witness_command or [_tool("tandem-witness")])
        self._closed = False
        self._procs: list[subprocess.Popen[Any]] = []
        self._logs: list[IO[bytes]] = []
        self._watches: list[VipWatch] = []
        self._created_ns: list[str] = []
        self._host_dirs: list[str] = []
        self._node_paths: list[str] = []
        self._registered = False
        nets = tuple(range(heartbeat_networks))
        members = [
            _Member("node1", "n1", 1, nets),
            _Member("node2", "n2", 2, nets),
            _Member("client", "cl", 10, (0,)),
        ]
        if witness:
            members.append(_Member("witness", "wi", 254, (0,)))
        self._members = {m.role: m for m in members}
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.key_file = self.tmp_dir / "cluster.key"
        self.prefix = ""
        self.ns: dict[str, str] = {}
        try:
            self._register()
            self._write_key()
            self._build()
        except BaseException:
            self.close()
            raise

    # -- context manager

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- names

    @property
    def lan_ns(self) -> str:
        """The namespace holding the bridges."""
        return self.ns["lan"]

    @property
    def node_ns(self) -> dict[str, str]:
        """Node name -> its namespace."""
        return {n: self.ns[n] for n in NODES}

    def ns_name(self, where: str) -> str:
        """The namespace of a role, or `where` itself if it names a lab namespace."""
        return self.ns[self.role(where)]

    def role(self, where: str) -> str:
        """The role ("node1", "client", ...) of a role or namespace name."""
        if where in self.ns:
            return where
        for role, ns in self.ns.items():
            if ns == where:
                return role
        raise LabError(f"no lab namespace {where!r}; use one of {', '.join(self.ns)}")

    def _node(self, node: str) -> _Member:
        if node not in NODES:
            raise LabError(f"{node!r} is not a node; use node1 or node2")
        return self._members[node]

    def address(self, role: str, net: int = 0) -> str:
        """The own address of `role` on network `net`."""
        return subnet_address(net, self._members[role].host)

    def own_addresses(self, role: str) -> dict[str, str]:
        """Interface -> "address/24" that `role` has after a (re)boot."""
        m = self._members[role]
        return {f"eth{n}": f"{subnet_address(n, m.host)}/24" for n in m.networks}

    def node_dir(self, node: str) -> Path:
        """The host directory that holds a node's private files (state, backing dirs)."""
        return self.tmp_dir / node

    def socket_dir(self, node: str) -> Path:
        """The directory given to the node's agent as TANDEM_SOCKET_DIR."""
        return self.node_dir(node) / "run"

    # -- build

    def _register(self) -> None:
        """Pick an unused prefix and record this lab before anything exists (for cleanup)."""
        with _registry_lock():
            taken = set(_read_registry())
            present = set(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else set()
            for _ in range(100):
                prefix = f"t{secrets.token_hex(2)}"
                if prefix not in taken and not any(n.startswith(prefix + "-") for n in present):
                    break
            else:
                raise LabError("no free lab prefix; run tests.lab.cleanup_stale()")
            self.prefix = prefix
            self.ns = {"lan": f"{prefix}-lan"} | {
                m.role: f"{prefix}-{m.short}" for m in self._members.values()
            }
            self._save_registry()
            self._registered = True

    def _save_registry(self) -> None:
        """Write this lab's entry; call with the registry lock held."""
        entry = {
            "pid": os.getpid(),
            "start": _proc_start(os.getpid()),
            "namespaces": sorted(set(self.ns.values()) | set(self._created_ns)),
            "host_dirs": self._host_dirs,
            "node_paths": self._node_paths,
            "tmp_dir": str(self.tmp_dir),
        }
        tmp = REGISTRY / f".{self.prefix}.tmp"
        tmp.write_text(json.dumps(entry))
        tmp.replace(REGISTRY / f"{self.prefix}.json")

    def _write_key(self) -> None:
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (secrets.token_hex(32) + "\n").encode())
        finally:
            os.close(fd)

    def _add_netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._created_ns.append(name)
        # IPv6 only adds noise here (DAD, router solicitations, address events).
        _run(
            [
                "ip", "netns", "exec", name, "sysctl", "-q", "-w",
                "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1",
            ]
        )  # fmt: skip
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _build(self) -> None:
        self._add_netns(self.lan_ns)
        for net in range(self.heartbeat_networks):
            self.ip("lan", "link", "add", f"br{net}", "type", "bridge")
            self.ip("lan", "link", "set", f"br{net}", "up")
        for member in self._members.values():
            self._build_member(member)

    def _build_member(self, member: _Member) -> None:
        ns = self.ns[member.role]
        self._add_netns(ns)
        for net in member.networks:
            port = f"{member.short}-{net}"
            self.ip("lan", "link", "add", port, "type", "veth", "peer", "name", f"eth{net}",
                    "netns", ns)  # fmt: skip
            self.ip("lan", "link", "set", port, "master", f"br{net}", "up")
            self.ip(ns, "addr", "add", f"{subnet_address(net, member.host)}/24", "dev", f"eth{net}")
            self.ip(ns, "link", "set", f"eth{net}", "up")

    # -- running things

    def ip(self, where: str, *args: str) -> str:
        """Run `ip -n NS ARGS...` and return its output."""
        return _run(["ip", "-n", self.ns_name(where), *args]).stdout

    def _wrap(
        self,
        where: str,
        argv: Sequence[str | os.PathLike[str]],
        private_dirs: Mapping[str, Path],
        mount_cgroup: bool,
    ) -> list[str]:
        """`ip netns exec` argv, through a shell that first sets up the node's mount view.

        `ip netns exec` gives the process a mount namespace of its own (a slave of the
        host's) and a fresh /sys without the cgroup mounts: the wrapper mounts cgroup2
        back where the host has it and bind-mounts each private directory, so only this
        process and its children see them.
        """
        ns = self.ns_name(where)
        args = [os.fspath(a) for a in argv]
        script = ["set -e"]
        cg = cgroup2_root() if mount_cgroup else None
        if cg is not None and cg.is_relative_to("/sys"):
            if cg != Path("/sys/fs/cgroup"):
                script.append("mount -t tmpfs -o mode=0755 lab-cgroup /sys/fs/cgroup")
            script.append(f"mkdir -p {shlex.quote(str(cg))}")
            script.append(f"mount -t cgroup2 cgroup2 {shlex.quote(str(cg))}")
        positional = []
        for seen, backing in private_dirs.items():
            script.append('mount --bind "$2" "$1"; shift 2')
            positional += [seen, os.fspath(backing)]
        if len(script) == 1:
            return ["ip", "netns", "exec", ns, *args]
        script.append('exec "$@"')
        return ["ip", "netns", "exec", ns, "sh", "-c", "\n".join(script), "lab", *positional, *args]

    def _prepare_private_dirs(
        self, where: str, private_dirs: Mapping[str, Path]
    ) -> dict[str, Path]:
        """Create the backing dirs (relative ones under node_dir) and the host mount points."""
        resolved = {}
        with _registry_lock():
            for seen, backing in private_dirs.items():
                if not os.path.isabs(seen):
                    raise LabError(f"private_dirs: {seen!r} must be an absolute path")
                real = Path(backing)
                if not real.is_absolute():
                    real = self.tmp_dir / self.role(where) / real
                real.mkdir(parents=True, exist_ok=True)
                resolved[seen] = real
                if seen not in self._node_paths:
                    self._node_paths.append(seen)
                missing = []
                p = Path(seen)
                while not p.exists():
                    missing.append(str(p))
                    p = p.parent
                Path(seen).mkdir(parents=True, exist_ok=True)
                self._host_dirs += [m for m in missing if m not in self._host_dirs]
            self._save_registry()
        return resolved

    def run(
        self,
        where: str,
        argv: Sequence[str | os.PathLike[str]],
        *,
        private_dirs: Mapping[str, Path] | None = None,
        mount_cgroup: bool = False,
        **popen_kw: Any,
    ) -> subprocess.Popen[Any]:
        """Start `argv` in a lab namespace and return it (the lab kills it on close).

        `private_dirs` maps a path the process sees to its backing directory (relative:
        under `node_dir(where)`): both nodes see the same paths, each with its own files.
        `mount_cgroup` makes cgroup v2 visible inside, as agents need.
        """
        resolved = self._prepare_private_dirs(where, private_dirs) if private_dirs else {}
        argv = self._wrap(where, argv, resolved, mount_cgroup)
        proc: subprocess.Popen[Any] = subprocess.Popen(argv, **popen_kw)
        self._procs.append(proc)
        # Return only once it is inside: a power loss right after must find it there.
        ident = _netns_inode(self.ns_name(where))
        if not wait_for(
            lambda: proc.poll() is not None or _pid_netns(proc.pid) == ident, 10, 0.001
        ):
            raise LabError(f"{shlex.join(argv)}: did not enter {self.ns_name(where)} within 10 s")
        return proc

    def exec(
        self,
        where: str,
        argv: Sequence[str | os.PathLike[str]],
        check: bool = True,
        *,
        input: str | None = None,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` to completion in a lab namespace, capturing its output as text."""
        return _run(self._wrap(where, argv, {}, False), input=input, check=check, timeout=timeout)

    def _log(self, name: str) -> IO[bytes]:
        log = (self.tmp_dir / f"{name}.log").open("ab")
        self._logs.append(log)
        return log

    def start_agent(
        self,
        node: str,
        config_path: Path,
        state_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        private_dirs: Mapping[str, Path] | None = None,
    ) -> subprocess.Popen[Any]:
        """Start the node's agent in its namespace, logging to `tmp_dir/<node>.log`.

        The agent sees cgroup2 and its private directories: `self.private_dirs` and
        `private_dirs` (e.g. {"/srv/tandem-demo": Path("srv")}), and /run/tandem backed by
        `socket_dir(node)`, which TANDEM_SOCKET_DIR also names (unless `env` says otherwise):
        the API socket lands there, whichever of the two the agent honours.
        """
        self._node(node)
        state = state_dir or self.node_dir(node) / "state"
        state.mkdir(parents=True, exist_ok=True)
        self.socket_dir(node).mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ, TANDEM_SOCKET_DIR=str(self.socket_dir(node)))
        full_env.update(env or {})
        argv = [*self.agent_command, "--config", str(config_path), "--node", node,
                "--state-dir", str(state)]  # fmt: skip
        dirs = {"/run/tandem": self.socket_dir(node), **self.private_dirs, **(private_dirs or {})}
        return self.run(node, argv, private_dirs=dirs, mount_cgroup=True, env=full_env,
                        stdout=self._log(node), stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL)  # fmt: skip

    def start_witness(
        self, state_dir: Path | None = None, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[Any]:
        """Start the witness in its namespace on WITNESS_ADDRESS:WITNESS_PORT."""
        if not self.has_witness:
            raise LabError("this lab has no witness namespace; build it with witness=True")
        state = state_dir or self.tmp_dir / "witness" / "state"
        state.mkdir(parents=True, exist_ok=True)
        argv = [*self.witness_command, "--listen", f"{WITNESS_ADDRESS}:{WITNESS_PORT}",
                "--secret-file", str(self.key_file), "--state-dir", str(state)]  # fmt: skip
        return self.run("witness", argv, env=dict(os.environ, **(env or {})),
                        stdout=self._log("witness"), stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL)  # fmt: skip

    # -- configuration

    def write_config(
        self,
        modules: str | Sequence[Mapping[str, Any]] = (),
        witness: bool | None = None,
        timing: Mapping[str, float] | None = None,
        *,
        name: str = "lab",
        ports: Mapping[str, int] | None = None,
        path: Path | None = None,
    ) -> Path:
        """Write a cluster YAML for node1/node2 (and the witness if wanted); return its path.

        `modules` is the YAML text of the module list or the list itself.
        """
        if isinstance(modules, str):
            try:
                parsed = yaml.safe_load(modules) or []
            except yaml.YAMLError as exc:
                raise LabError(f"modules: not YAML: {exc}") from None
            if isinstance(parsed, dict) and "modules" in parsed:
                parsed = parsed["modules"]
            if not isinstance(parsed, list):
                raise LabError("modules: expected a YAML list of modules")
            module_list = parsed
        else:
            module_list = [dict(m) for m in modules]
        use_witness = self.has_witness if witness is None else witness
        if use_witness and not self.has_witness:
            raise LabError("write_config(witness=True) needs a lab built with witness=True")
        nets = range(self.heartbeat_networks)
        doc: dict[str, Any] = {
            "cluster": {"name": name, "secret_file": str(self.key_file)},
            "nodes": [
                {
                    "name": node,
                    "address": self.address(node),
                    "heartbeat": [self.address(node, n) for n in nets],
                }
                for node in NODES
            ],
        }
        if use_witness:
            doc["witness"] = {"address": WITNESS_ADDRESS, "port": WITNESS_PORT}
        doc["timing"] = dict(timing or DEFAULT_TIMING)
        if ports:
            doc["ports"] = dict(ports)
            self.heartbeat_port = int(ports.get("heartbeat", HEARTBEAT_PORT))
        doc["modules"] = module_list
        target = path or self.tmp_dir / "cluster.yaml"
        target.write_text(yaml.safe_dump(doc, sort_keys=False))
        return target

    # -- faults

    def addresses(self, where: str) -> set[str]:
        """The IP addresses on the interfaces of `where` (loopback left out)."""
        return {a.partition("/")[0] for _, a in self.address_list(where)}

    def address_list(self, where: str) -> list[tuple[str, str]]:
        """(interface, "ip/prefix") of each address of `where`, loopback left out."""
        out = json.loads(self.ip(where, "-j", "addr", "show") or "[]")
        return [
            (link["ifname"], f"{a['local']}/{a['prefixlen']}")
            for link in out
            if link.get("ifname") != "lo"
            for a in link.get("addr_info", [])
            if "local" in a
        ]

    def _drop_foreign_addresses(self, node: str) -> None:
        own = self.own_addresses(node)
        for ifname, cidr in self.address_list(node):
            if own.get(ifname) != cidr:
                self.ip(node, "addr", "del", cidr, "dev", ifname)

    def kill_processes(self, where: str, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to every process in the namespace; returns how many got it."""
        return kill_netns_processes(self.ns_name(where), sig)

    def power_loss(self, node: str) -> None:
        """The node loses power: NICs down, every process killed -9, its VIPs gone with it."""
        member = self._node(node)
        batch = "".join(f"link set eth{n} down\n" for n in member.networks)
        _run(["ip", "-n", self.ns[node], "-batch", "-"], input=batch)
        self.kill_processes(node)
        # A machine without power answers for no address; its own come back on power_on.
        self._drop_foreign_addresses(node)

    def power_on(self, node: str) -> None:
        """The node boots: NICs up with its own addresses only, no leftover cgroups.

        Faults injected in the network (cut_link, cut_heartbeats) stay in place.
        """
        member = self._node(node)
        self._drop_foreign_addresses(node)
        for ifname, cidr in self.own_addresses(node).items():
            self.ip(node, "addr", "replace", cidr, "dev", ifname)
        batch = "".join(f"link set eth{n} up\n" for n in member.networks)
        _run(["ip", "-n", self.ns[node], "-batch", "-"], input=batch)
        self._remove_node_cgroups(node)

    def cut_link(self, node: str, net: int = 0) -> None:
        """Pull the node's cable on network `net`: the switch port goes down, addresses stay."""
        self.ip("lan", "link", "set", self._port(node, net), "down")

    def restore_link(self, node: str, net: int = 0) -> None:
        """Plug the cable back in."""
        self.ip("lan", "link", "set", self._port(node, net), "up")

    def _port(self, node: str, net: int) -> str:
        member = self._node(node)
        if net not in member.networks:
            raise LabError(f"{node} has no network {net}; this lab has {len(member.networks)}")
        return f"{member.short}-{net}"

    def nft(self, where: str, script: str) -> None:
        """Load an nftables script inside the namespace (for drops, random loss, ...)."""
        self.exec(where, ["nft", "-f", "-"], input=script)

    def cut_heartbeats(self, node: str, nets: Iterable[int] | None = None) -> None:
        """The network drops UDP to and from the heartbeat port of `node` (all its networks,
        or `nets`); everything else, the peer link and the witness included, still passes.

        The rules sit on the bridge, not in the node: a drop in the node's output hook
        would fail the agent's sendto() with EPERM, which no real network does.
        """
        self._bridge_drop(node, "hb", "udp", self.heartbeat_port, nets)

    def restore_heartbeats(self, node: str) -> None:
        """Let the node's heartbeats pass again."""
        self._bridge_clear(node, "hb")

    def cut_replication(self, node: str, port: int = 7702) -> None:
        """The network drops TCP to and from the peer port of `node`: the replication stream
        dies while heartbeats still flow (a firewall change, a broken middlebox)."""
        self._bridge_drop(node, "repl", "tcp", port)

    def restore_replication(self, node: str) -> None:
        self._bridge_clear(node, "repl")

    def _bridge_drop(
        self, node: str, what: str, proto: str, port: int, nets: Iterable[int] | None = None
    ) -> None:
        """Drop `proto` to and from `port` on the bridge ports of `node` (one table per cut)."""
        member = self._node(node)
        ports = [self._port(node, n) for n in (member.networks if nets is None else nets)]
        rules = "".join(
            f'    {way} "{bridge_port}" {proto} {end} {port} drop\n'
            for bridge_port in ports
            for way in ("iifname", "oifname")
            for end in ("sport", "dport")
        )
        table = f"tandem_lab_{what}_{member.short}"
        self.nft(
            "lan",
            f"add table bridge {table}\ndelete table bridge {table}\n"
            f"table bridge {table} {{\n"
            f"  chain forward {{\n    type filter hook forward priority 0; policy accept;\n"
            f"{rules}  }}\n}}\n",
        )

    def _bridge_clear(self, node: str, what: str) -> None:
        table = f"tandem_lab_{what}_{self._node(node).short}"
        self.nft("lan", f"add table bridge {table}\ndelete table bridge {table}\n")

    # -- the client's view

    def socket(
        self, where: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """A socket living in a lab namespace (this process stays where it is)."""
        return netns_socket(self.ns_name(where), family, kind)

    def client_http(
        self,
        method: str,
        url: str,
        body: bytes | str | None = None,
        timeout: float = 2.0,
        where: str = "client",
    ) -> HttpResult:
        """One HTTP request from the client namespace; connection errors raise OSError."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise LabError(f"client_http: {url!r} is not an http://HOST[:PORT]/PATH URL")
        conn = _NetnsHTTPConnection(self.ns_name(where), parts.hostname, parts.port, timeout)
        try:
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            data = body.encode() if isinstance(body, str) else body
            conn.request(method, path, body=data)
            answer = conn.getresponse()
            return HttpResult(answer.status, answer.read())
        finally:
            conn.close()

    def tcp_connect_ok(
        self, address: str, port: int, timeout: float = 1.0, where: str = "client"
    ) -> bool:
        """True if a TCP connection to address:port succeeds from `where`."""
        with self.socket(where) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect((address, port))
            except OSError:
                return False
            return True

    def watch_vip(self, address: str) -> VipWatch:
        """A VipWatch on `address` (use it as a context manager)."""
        return VipWatch(self, address)

    # -- teardown

    def _remove_node_cgroups(self, node: str) -> list[str]:
        """Remove what the node's agents left in <cgroup2>/tandem/<node>, unless another lab
        runs (its agents use the same paths)."""
        root = cgroup2_root()
        with _registry_lock():
            if root is None or not _cgroups_are_mine(_read_registry(), self.prefix):
                return []
            return _remove_cgroup_tree(root / "tandem" / node)

    def close(self) -> None:
        """Remove everything: processes, namespaces, mount points, cgroups, registry entry."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for watch in list(self._watches):
            watch.stop()
        for ns in reversed(self._created_ns):
            try:
                kill_netns_processes(ns)
            except LabError as exc:
                errors.append(str(exc))
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                errors.append(f"process {proc.pid} ({proc.args!r}) did not exit")
        for log in self._logs:
            log.close()
        for ns in reversed(self._created_ns):
            try:
                delete_netns(ns)
            except LabError as exc:
                errors.append(str(exc))
        errors += self._unmount_leftovers()
        if self._registered:
            for node in NODES:
                errors += self._remove_node_cgroups(node)
            with _registry_lock():
                entries = _read_registry()
                _sweep_host_dirs(entries, self.prefix)
                root = cgroup2_root()
                if root is not None and _cgroups_are_mine(entries, self.prefix):
                    with contextlib.suppress(OSError):
                        os.rmdir(root / "tandem")
                (REGISTRY / f"{self.prefix}.json").unlink(missing_ok=True)
        if errors:
            raise LabError("lab teardown left things behind:\n  " + "\n  ".join(errors))

    def _unmount_leftovers(self) -> list[str]:
        """Unmount anything a test mounted on the host below tmp_dir (none should be)."""
        errors = []
        base = str(self.tmp_dir).rstrip("/") + "/"
        for point, _ in reversed(_mountinfo()):
            if point.startswith(base):
                done = _run(["umount", "-l", point], check=False)
                if done.returncode != 0:
                    errors.append(f"cannot unmount {point}: {done.stderr.strip()}")
        return errors


def _tool(name: str) -> str:
    """Our console script next to this interpreter (the venv), else on PATH, else the name."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


# --- VIP watch --------------------------------------------------------------------------

_NETLINK_ROUTE = 0
_RTMGRP_IPV4_IFADDR = 0x10
_SOL_NETLINK = 270
_NETLINK_LISTEN_ALL_NSID = 8
_RTM_NEWADDR, _RTM_DELADDR = 20, 21
_IFA_ADDRESS, _IFA_LOCAL, _IFA_LABEL = 1, 2, 3
_NLMSG_HDR = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class AddrEvent:
    """An address added to or deleted from a node, in the order the kernel made the changes."""

    seq: int
    time: float  # time.monotonic() when read: for humans, the order is `seq`
    node: str
    kind: str  # "add" or "del"
    address: str  # with prefix length
    interface: str


def _parse_addr_messages(data: bytes) -> Iterator[tuple[int, int, str, str]]:
    """(message type, interface index, "ip/prefix", label) of each IPv4 address message."""
    offset = 0
    while offset + _NLMSG_HDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSG_HDR.unpack_from(data, offset)
        if length < _NLMSG_HDR.size:
            return
        body = data[offset + _NLMSG_HDR.size : offset + length]
        offset += (length + 3) & ~3
        if mtype not in (_RTM_NEWADDR, _RTM_DELADDR) or len(body) < _IFADDRMSG.size:
            continue
        family, prefixlen, _f, _scope, index = _IFADDRMSG.unpack_from(body)
        if family != socket.AF_INET:
            continue
        attrs: dict[int, bytes] = {}
        pos = _IFADDRMSG.size
        while pos + _RTATTR.size <= len(body):
            alen, atype = _RTATTR.unpack_from(body, pos)
            if alen < _RTATTR.size:
                break
            attrs[atype] = body[pos + _RTATTR.size : pos + alen]
            pos += (alen + 3) & ~3
        raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
        if raw is None or len(raw) != 4:
            continue
        label = attrs.get(_IFA_LABEL, b"").rstrip(b"\0").decode(errors="replace")
        yield mtype, index, f"{socket.inet_ntoa(raw)}/{prefixlen}", label


class VipWatch:
    """Records every add and delete of one address on the nodes, from netlink events.

    One netlink socket in the LAN namespace listens to both node namespaces at once
    (NETLINK_LISTEN_ALL_NSID), so events arrive in the order the kernel made the changes:
    "two holders at once" is a fact of the recording, not an artefact of polling. The
    state at start is read after subscribing, so nothing between the two is missed.
    """

    def __init__(self, lab: Lab, address: str) -> None:
        self.lab = lab
        self.address = address
        self.ip = address.partition("/")[0]
        self.events: list[AddrEvent] = []
        self.initial: dict[str, set[str]] = {}
        self.overflowed = False
        self._cond = threading.Condition()
        self._holding: dict[str, set[str]] = {n: set() for n in NODES}
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._nsids: dict[int, str] = {}

    def __enter__(self) -> VipWatch:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _node_nsids(self) -> dict[int, str]:
        """nsid (as the LAN namespace knows each node namespace) -> node name."""
        wanted = {self.lab.ns[n]: n for n in NODES}
        for _ in range(2):
            listing = self.lab.ip("lan", "netns", "list-id")
            found = {
                int(m[1]): wanted[m[2]]
                for m in re.finditer(r"nsid (\d+) \(iproute2 netns name: (\S+)\)", listing)
                if m[2] in wanted
            }
            if len(found) == len(wanted):
                return found
            for ns in set(wanted) - {self.lab.ns[n] for n in found.values()}:
                _run(["ip", "-n", self.lab.lan_ns, "netns", "set", ns, "auto"], check=False)
        raise LabError(f"cannot map node namespaces to nsids in {self.lab.lan_ns}: {listing}")

    def start(self) -> None:
        """Subscribe, read the current holders, then record events until stop()."""
        if self._sock is not None:
            return
        self._nsids = self._node_nsids()
        sock = netns_socket(self.lab.lan_ns, socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind((0, _RTMGRP_IPV4_IFADDR))
            sock.setsockopt(_SOL_NETLINK, _NETLINK_LISTEN_ALL_NSID, 1)
            sock.settimeout(0.1)
            for node in NODES:
                holding = {
                    i for i, a in self.lab.address_list(node) if a.partition("/")[0] == self.ip
                }
                self.initial[node] = set(holding)
                self._holding[node] = set(holding)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.lab._watches.append(self)
        self._thread = threading.Thread(target=self._read, name=f"vipwatch-{self.ip}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                data, ancdata, _flags, _addr = self._sock.recvmsg(1 << 16, socket.CMSG_SPACE(4))
            except TimeoutError:
                continue
            except OSError as exc:
                if exc.errno == 105:  # ENOBUFS: the kernel dropped events
                    with self._cond:
                        self.overflowed = True
                    continue
                return
            now = time.monotonic()
            nsid = None
            for level, ctype, value in ancdata:
                if level == _SOL_NETLINK and ctype == _NETLINK_LISTEN_ALL_NSID and len(value) >= 4:
                    nsid = struct.unpack("=i", value[:4])[0]
            node = self._nsids.get(nsid) if nsid is not None else None
            if node is None:
                continue
            for mtype, index, cidr, label in _parse_addr_messages(data):
                if cidr.partition("/")[0] != self.ip:
                    continue
                iface = label or f"if{index}"
                with self._cond:
                    kind = "add" if mtype == _RTM_NEWADDR else "del"
                    self.events.append(AddrEvent(len(self.events), now, node, kind, cidr, iface))
                    if kind == "add":
                        self._holding[node].add(iface)
                    else:
                        self._holding[node].discard(iface)
                    self._cond.notify_all()

    def stop(self) -> None:
        """Stop recording (events stay readable)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
        if self in self.lab._watches:
            self.lab._watches.remove(self)

    def holders(self) -> set[str]:
        """The nodes holding the address now (as recorded)."""
        with self._cond:
            return {n for n, ifaces in self._holding.items() if ifaces}

    def holders_at_any_instant(self) -> int:
        """The most nodes that held the address at the same time since the watch started."""
        with self._cond:
            if self.overflowed:
                raise LabError(f"VipWatch({self.ip}): the kernel dropped events; result unknown")
            holding = {n: set(i) for n, i in self.initial.items()}
            most = sum(1 for i in holding.values() if i)
            for ev in self.events:
                if ev.kind == "add":
                    holding[ev.node].add(ev.interface)
                else:
                    holding[ev.node].discard(ev.interface)
                most = max(most, sum(1 for i in holding.values() if i))
            return most

    def wait_holder(self, node: str, timeout: float) -> bool:
        """Wait until `node` holds the address; True if it did."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._holding[node]), timeout)

    def wait_no_holder(self, timeout: float) -> bool:
        """Wait until no node holds the address; True if that happened."""
        with self._cond:
            return self._cond.wait_for(lambda: not any(self._holding.values()), timeout)
