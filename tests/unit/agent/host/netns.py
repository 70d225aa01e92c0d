"""Test helpers for the host: network namespaces joined by a veth pair or a bridge, cgroups.

`netns_pair()` makes two namespaces and removes them (and kills what runs in them) even when
the test fails; `in_netns()` runs a coroutine function on an event loop of its own (and
`in_netns_sync()` a plain function) in a thread that has joined one of them, so code that
acts on "the current namespace" is tested as is. `module_group()` gives a ModuleGroup under
a node name of its own and removes it after.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

from agent.host.cgroup import ModuleGroup

T = TypeVar("T")

CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class NetnsPair:
    """Namespaces `a` and `b`, each with interface `eth0` on one LAN (198.18.0.0/24)."""

    a: str
    b: str
    lan: str | None
    interface: str
    address_a: str
    address_b: str

    def mac(self, ns: str) -> str:
        """The MAC address of eth0 in namespace `ns`."""
        out = ip("-n", ns, "-o", "link", "show", self.interface)
        return out.split("link/ether", 1)[1].split()[0]


def ip(*args: str) -> str:
    """Runs `ip ARGS`, returns its output; a failure raises with ip's message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def unique_prefix() -> str:
    """A short name prefix that no parallel test run uses."""
    return f"tdt-{secrets.token_hex(3)}"


def _kill_inside(ns: str) -> None:
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    for word in done.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(word), signal.SIGKILL)


def delete_netns(ns: str) -> None:
    """Kills every process in `ns` and deletes it; a namespace already gone is fine."""
    if not os.path.exists(f"/run/netns/{ns}"):
        return
    _kill_inside(ns)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@contextlib.contextmanager
def netns_pair(bridge: bool = False) -> Iterator[NetnsPair]:
    """Namespaces a and b with eth0 up and addressed; joined directly or through a bridge."""
    prefix = unique_prefix()
    a, b = f"{prefix}-a", f"{prefix}-b"
    lan = f"{prefix}-lan" if bridge else None
    made = [n for n in (a, b, lan) if n is not None]
    try:
        for ns in made:
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        if lan is None:
            ip(
                "link",
                "add",
                "name",
                "eth0",
                "netns",
                a,
                "type",
                "veth",
                "peer",
                "eth0",
                "netns",
                b,
            )
        else:
            ip("-n", lan, "link", "add", "br0", "type", "bridge")
            ip("-n", lan, "link", "set", "br0", "up")
            for port, ns in (("port-a", a), ("port-b", b)):
                # Made directly inside the namespaces: no name is ever taken in the root one.
                ip(
                    "link",
                    "add",
                    "name",
                    "eth0",
                    "netns",
                    ns,
                    "type",
                    "veth",
                    "peer",
                    port,
                    "netns",
                    lan,
                )
                ip("-n", lan, "link", "set", port, "master", "br0", "up")
        pair = NetnsPair(a, b, lan, "eth0", "198.18.0.1/24", "198.18.0.2/24")
        for ns, address in ((a, pair.address_a), (b, pair.address_b)):
            ip("-n", ns, "addr", "add", address, "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
        yield pair
    finally:
        for ns in made:
            delete_netns(ns)


@contextlib.contextmanager
def module_group(module: str = "web") -> Iterator[ModuleGroup]:
    """A created ModuleGroup for a node name no one else uses; killed and removed after."""
    group = ModuleGroup(unique_prefix(), module)
    group.create()
    try:
        yield group
    finally:
        remove_node_groups(group.path.parent)


def remove_node_groups(node_dir: Path) -> None:
    """Kills and removes every module group under one node's cgroup directory."""
    if node_dir.is_dir():
        for module_dir in node_dir.iterdir():
            if module_dir.is_dir():
                group = ModuleGroup(node_dir.name, module_dir.name, node_dir.parent.parent)
                group.kill(timeout=10.0)
                group.remove()
        node_dir.rmdir()
    # Shared by every test and agent: removed only if this was the last user.
    with contextlib.suppress(OSError):
        node_dir.parent.rmdir()


def _setns(ns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns_sync(ns: str, fn: Callable[[], T]) -> T:
    """Runs `fn` in a new thread that has joined namespace `ns`, and returns what it returns.

    setns(CLONE_NEWNET) changes only the calling thread, so the test process stays where it
    is, and sockets, netlink and subprocesses made by `fn` live in `ns`.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            _setns(ns)
            result.append(fn())
        except BaseException as e:
            error.append(e)

    thread = threading.Thread(target=run, name=f"in {ns}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def in_netns(ns: str, fn: Callable[[], Awaitable[T]]) -> T:
    """Runs the coroutine function `fn` on an event loop of its own, in namespace `ns`."""

    async def main() -> T:
        return await fn()

    return in_netns_sync(ns, lambda: asyncio.run(main()))


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Polls `condition()` until it is true; fails naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def gone(pid: int) -> bool:
    """True if the process has ended (here PID 1 does not reap orphans: zombies count as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
