"""A cgroup v2 group per module: every process of the module, daemons that left its session too.

A process cannot leave its cgroup by forking or by setsid, so the group is the one list of a
module's processes that a double-forking daemon cannot escape, and `cgroup.kill` ends them all
at once. Groups live at `<cgroup2>/tandem/<node>/<module>`: the node is part of the path
because in the lab both nodes share one kernel and so one cgroup tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
# Where the tree is mounted when no cgroup2 is; see cgroup2_root().
PRIVATE_MOUNT_POINT = Path("/sys/fs/cgroup")
POLL = 0.01


class CgroupError(Exception):
    """A module's cgroup could not be used; the message says which one and what to do."""


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 3 < len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def find_cgroup2(mountinfo: str) -> Path | None:
    """The mount point of the first cgroup2 file system in a mountinfo text, if any."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if sep and right.split(" ", 1)[0] == "cgroup2":
            return Path(_unescape(left.split(" ")[4]))
    return None


def _mount_cgroup2(target: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"cgroup2", str(target).encode(), b"cgroup2", 0, None) != 0:
        err = ctypes.get_errno()
        raise CgroupError(f"cannot mount cgroup2 on {target}: {os.strerror(err)}")


def cgroup2_root() -> Path:
    """Where the cgroup v2 tree is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid).

    `ip netns exec` gives the agent its own mount namespace with a fresh /sys and no cgroup
    mounts: when no cgroup2 is mounted and /sys/fs/cgroup is empty, the tree is mounted there,
    as systemd does at boot. Made in such a namespace, the mount is seen only inside it.
    """
    found = find_cgroup2(MOUNTINFO.read_text())
    if found is not None:
        return found
    if PRIVATE_MOUNT_POINT.is_dir() and not any(PRIVATE_MOUNT_POINT.iterdir()):
        _mount_cgroup2(PRIVATE_MOUNT_POINT)
        return PRIVATE_MOUNT_POINT
    raise CgroupError(
        "no cgroup v2 file system is mounted; mount one, e.g. "
        "`mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )


def _check_name(kind: str, name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\n" in name:
        raise CgroupError(f"{kind} name {name!r} cannot name a cgroup: use letters, digits, - or _")


class ModuleGroup:
    """The cgroup of one module on one node: create it, list, signal and kill its processes."""

    def __init__(self, node: str, module: str, root: Path | None = None) -> None:
        _check_name("node", node)
        _check_name("module", module)
        self.node = node
        self.module = module
        self._root = root

    @property
    def path(self) -> Path:
        """The group's directory in the cgroup2 tree."""
        if self._root is None:
            self._root = cgroup2_root()
        return self._root / "tandem" / self.node / self.module

    def __repr__(self) -> str:
        return f"ModuleGroup({self.node!r}, {self.module!r})"

    def create(self) -> None:
        """Make the group (and its parents); an existing group is kept as it is."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CgroupError(f"cannot create cgroup {self.path}: {e.strerror}") from None

    def exists(self) -> bool:
        """True if the group's directory is there."""
        return self.path.is_dir()

    def _groups(self) -> Iterator[Path]:
        """The group and the groups below it, deepest first (the order rmdir needs)."""
        for dirpath, _, _ in sorted(os.walk(self.path), key=lambda w: -len(w[0])):
            yield Path(dirpath)

    def pids(self) -> list[int]:
        """Every process in the group and below it; none if the group does not exist."""
        found: list[int] = []
        for group in self._groups():
            with contextlib.suppress(FileNotFoundError):
                found.extend(int(w) for w in (group / "cgroup.procs").read_text().split())
        return sorted(found)

    def is_empty(self) -> bool:
        """True if no process is left in the group or below it (exited zombies do not count)."""
        try:
            events = (self.path / "cgroup.events").read_text()
        except FileNotFoundError:
            return True
        return "populated 0" in events

    def add(self, pid: int) -> None:
        """Move a running process (not its children already born) into the group."""
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
        except OSError as e:
            raise CgroupError(f"cannot move process {pid} into {self.path}: {e.strerror}") from None

    def preexec(self) -> Callable[[], None]:
        """A `preexec_fn` that moves the new child into the group before it runs its program.

        Everything the program then starts is born in the group. The path is resolved now,
        in the parent, so the child only writes one file.
        """
        procs = str(self.path / "cgroup.procs")

        def join() -> None:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

        return join

    def signal(self, sig: int) -> int:
        """Sends `sig` to every process in the group; returns how many were signalled."""
        sent = 0
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                sent += 1
        return sent

    def request_kill(self) -> None:
        """Starts killing every process in the group without waiting for them to be gone."""
        kill_file = self.path / "cgroup.kill"
        try:
            kill_file.write_text("1")
            return
        except FileNotFoundError:
            if not self.path.exists():
                return
        except OSError as e:
            raise CgroupError(f"cannot kill cgroup {self.path}: {e.strerror}") from None
        self._freeze_and_kill_each()

    def _freeze_and_kill_each(self) -> None:
        # Kernels before 5.14 have no cgroup.kill: freeze the group so nothing forks between
        # listing and killing, SIGKILL each process, then thaw so the kills take effect.
        freeze = self.path / "cgroup.freeze"
        frozen = False
        with contextlib.suppress(OSError):
            freeze.write_text("1")
            frozen = True
        try:
            self.signal(signal.SIGKILL)
        finally:
            if frozen:
                with contextlib.suppress(OSError):
                    freeze.write_text("0")

    def kill(self, timeout: float = 5.0) -> bool:
        """Kills every process in the group and waits until it is empty; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self.request_kill()
            if self.is_empty():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL)

    async def kill_async(self, timeout: float = 5.0) -> bool:
        """kill() that waits without blocking the event loop."""
        self.request_kill()
        return await self.wait_empty(timeout, rekill=True)

    async def wait_empty(self, timeout: float, rekill: bool = False) -> bool:
        """Waits until the group is empty; False if it is not after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.is_empty():
            if loop.time() > deadline:
                return False
            await asyncio.sleep(POLL)
            if rekill:
                self.request_kill()
        return True

    def remove(self) -> None:
        """Removes the group (and groups below it) once empty; a missing group is fine."""
        for group in self._groups():
            try:
                group.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno == errno.EBUSY:
                    raise CgroupError(
                        f"cgroup {group} still has processes; kill() them before remove()"
                    ) from None
                raise CgroupError(f"cannot remove cgroup {group}: {e.strerror}") from None
