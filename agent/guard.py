"""The fence guard: a small process that takes the node's VIPs down if the agent stops or dies.

The agent's decision loop feeds the guard a few times a second with what it holds (VIPs and
module cgroups). If the feeds stop for `fence_after` seconds (the agent hangs, is stopped by
SIGSTOP, or is starved) or the pipe closes without a goodbye (the agent was killed -9 or
crashed), the guard removes those VIPs and kills those modules' processes. The agent sets
`fence_after` below the peer's `peer_timeout`, so by the time the peer takes over, this node
answers for the VIP no more: two servers never both serve it.

Why a fed process and not the Linux watchdog device (/dev/watchdog): a watchdog's only act is
to reboot the whole machine. In the lab every node shares one kernel, so that would reboot
the lab; and even on a real server, fencing one module's VIP and processes is a far smaller
act than a reboot, and says why in the event log. A hardware watchdog (or the softdog) as a
last line under the guard, for when the whole machine hangs, can be added for production.

The guard is its own process, in its own session, so a kill -9 of the agent or a signal to
the agent's process group does not reach it; it runs at real-time priority (else nice -10)
and is kept from the OOM killer, so it still runs when the agent is starved.

Protocol (JSON lines): the agent writes `{"op": "feed", "vips": [[address, interface]...],
"groups": [[node, module]...]}` and, on an orderly shutdown, `{"op": "bye"}`; the guard
writes `{"event": "ready"}` once, then `{"event": "fenced", "reason": ..., ...}` per fence.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.host.cgroup import CgroupError, ModuleGroup, cgroup2_root
from agent.host.vip import Vip, VipError, remove_vip

log = logging.getLogger("tandem.guard")

TICK = 0.05  # the guard's resolution: a stall is noticed within this of fence_after
KILL_TIMEOUT = 5.0
RT_PRIORITY = 10
READY_TIMEOUT = 30.0


class GuardError(Exception):
    """The guard could not be started or used."""


@dataclass(frozen=True)
class FenceReport:
    """What one fence did, as the guard reported it."""

    reason: str
    vips_removed: list[str] = field(default_factory=list)
    groups_killed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# --- in the agent --------------------------------------------------------------------------


class GuardHandle:
    """The agent's end of the guard: feed it every decision tick, close it on shutdown."""

    def __init__(self, proc: asyncio.subprocess.Process, fence_after: float) -> None:
        self._proc = proc
        self.fence_after = fence_after
        self.fences: list[FenceReport] = []
        self._fenced = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name="guard reader")

    @classmethod
    async def spawn(cls, fence_after: float) -> GuardHandle:
        """Starts the guard and waits until it is ready to fence."""
        if not fence_after > 0:
            raise GuardError(f"fence_after is {fence_after!r}: it must be seconds > 0")
        root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p),
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.guard",
            "--fence-after",
            repr(fence_after),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            # Its own session: a signal to the agent's process group must not reach it.
            start_new_session=True,
        )
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT)
        except TimeoutError:
            line = b""
        if _decode(line).get("event") != "ready":
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise GuardError(
                f"the fence guard did not start (exit code {proc.returncode}); "
                "see its messages on the agent's stderr"
            )
        return cls(proc, fence_after)

    @property
    def pid(self) -> int:
        """The guard's process id."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The guard's exit code once it has ended, else None."""
        return self._proc.returncode

    @property
    def fenced(self) -> bool:
        """True once the guard has fenced (until clear_fenced())."""
        return self._fenced.is_set()

    @property
    def last_fence(self) -> FenceReport | None:
        """The latest fence the guard reported, if any."""
        return self.fences[-1] if self.fences else None

    def clear_fenced(self) -> None:
        """Marks the fences seen so far as handled by the agent."""
        self._fenced.clear()

    async def wait_fenced(self, timeout: float) -> bool:
        """Waits until the guard reports a fence; False if none came within `timeout`."""
        try:
            await asyncio.wait_for(self._fenced.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def alive(self) -> bool:
        """True while the guard process runs."""
        return self._proc.returncode is None and not self._reader.done()

    def feed(self, vips: Sequence[Vip], groups: Sequence[tuple[str, str]]) -> None:
        """Tells the guard what this node holds now; never blocks (call it every tick).

        Feed a VIP or module before taking it (adding the VIP, starting the service): the
        line is in the guard's pipe when this returns, so a stall right after is fenced with
        it. After a fence (`fenced`), what the last feed listed is gone: act on that first.
        """
        message = {
            "op": "feed",
            "vips": [[v.address, v.interface] for v in vips],
            "groups": [list(g) for g in groups],
        }
        self._send(message)

    def _send(self, message: dict[str, Any]) -> None:
        stdin = self._proc.stdin
        if stdin is None or stdin.is_closing() or not self.alive():
            return
        stdin.write(json.dumps(message).encode() + b"\n")

    async def close(self, timeout: float = 5.0) -> None:
        """Says goodbye: the guard exits without fencing (the agent released everything)."""
        self._send({"op": "bye"})
        stdin = self._proc.stdin
        if stdin is not None and not stdin.is_closing():
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(stdin.drain(), timeout)
            stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
        await self._reader

    async def _read(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        while line := await stdout.readline():
            message = _decode(line)
            if message.get("event") == "fenced":
                report = FenceReport(
                    reason=str(message.get("reason", "")),
                    vips_removed=list(message.get("vips_removed", [])),
                    groups_killed=list(message.get("groups_killed", [])),
                    errors=list(message.get("errors", [])),
                )
                log.error("the guard fenced this node: %s", report.reason)
                self.fences.append(report)
                self._fenced.set()


def _decode(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


# --- in the guard process ------------------------------------------------------------------


def _raise_priority() -> str:
    """Real-time round robin if allowed, else nice -10; the guard must run when the agent can't."""
    try:
        policy = os.SCHED_RR | os.SCHED_RESET_ON_FORK
        os.sched_setscheduler(0, policy, os.sched_param(RT_PRIORITY))
        return f"SCHED_RR {RT_PRIORITY}"
    except (OSError, AttributeError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
        return "nice -10"
    except OSError:
        return "normal priority"


def _avoid_oom_killer() -> None:
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("-1000")


class Guard:
    """The guard's loop: read feeds, watch the time since the last, fence when it is too long."""

    def __init__(self, fence_after: float, read_fd: int = 0, write_fd: int = 1) -> None:
        self.fence_after = fence_after
        self._in = read_fd
        self._out = write_fd
        self._buffer = b""
        self._vips: list[Vip] = []
        self._groups: list[tuple[str, str]] = []
        # None until the first feed: before it the agent holds nothing there is to fence.
        self._last_feed: float | None = None
        # True once this stall has been fenced: fence once, then wait for the agent to return.
        self._stall_fenced = False

    def run(self) -> int:
        """Runs until a goodbye (exit 0) or the agent's end (fence, then exit 0)."""
        os.set_blocking(self._out, False)
        self._write({"event": "ready"})
        while True:
            readable, _, _ = select.select([self._in], [], [], TICK)
            if readable:
                chunk = os.read(self._in, 65536)
                if not chunk:
                    self._fence("the agent is gone: its pipe closed without a goodbye")
                    return 0
                if self._take(chunk):
                    return 0
            if self._last_feed is None or self._stall_fenced:
                continue
            silent = time.monotonic() - self._last_feed
            if silent > self.fence_after:
                self._stall_fenced = True
                self._fence(
                    f"no feed from the agent's decision loop for {silent:.2f} s "
                    f"(fence_after {self.fence_after:g} s): it is stalled"
                )

    def _take(self, chunk: bytes) -> bool:
        """Handles the complete lines in `chunk`; True on a goodbye."""
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            message = _decode(line)
            if message.get("op") == "bye":
                return True
            if message.get("op") == "feed":
                self._vips, errors = _vips(message.get("vips", []))
                self._groups = [(str(n), str(m)) for n, m in message.get("groups", [])]
                for error in errors:
                    log.warning("%s", error)
                self._last_feed = time.monotonic()
                self._stall_fenced = False
        return False

    def _fence(self, reason: str) -> None:
        log.error("fencing: %s", reason)
        removed, errors = asyncio.run(_remove_vips(self._vips))
        groups: list[ModuleGroup] = []
        for node, module in self._groups:
            try:
                group = ModuleGroup(node, module)
                group.request_kill()
                groups.append(group)
            except (CgroupError, OSError) as e:
                errors.append(f"cannot kill module {module}: {e}")
        killed = []
        for group in groups:
            if group.kill(KILL_TIMEOUT):
                killed.append(f"{group.node}/{group.module}")
            else:
                errors.append(f"processes left in {group.path} after {KILL_TIMEOUT:g} s")
        self._write(
            {
                "event": "fenced",
                "reason": reason,
                "vips_removed": removed,
                "groups_killed": killed,
                "errors": errors,
            }
        )
        log.error("fenced: removed VIPs %s, killed modules %s", removed or "none", killed or "none")

    def _write(self, message: dict[str, Any]) -> None:
        # Never block on an agent that does not read (it may be stopped): drop instead.
        with contextlib.suppress(OSError):
            os.write(self._out, json.dumps(message).encode() + b"\n")


def _vips(pairs: list[Any]) -> tuple[list[Vip], list[str]]:
    vips, errors = [], []
    for pair in pairs:
        try:
            address, interface = pair
            vips.append(Vip(str(address), str(interface)))
        except (ValueError, TypeError, VipError) as e:
            errors.append(f"ignored VIP {pair!r} in a feed: {e}")
    return vips, errors


async def _remove_vips(vips: list[Vip]) -> tuple[list[str], list[str]]:
    removed, errors = [], []
    for vip in vips:
        try:
            if await remove_vip(vip):
                removed.append(vip.address)
        except (VipError, OSError) as e:
            errors.append(str(e))
    return removed, errors


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m agent.guard --fence-after SECONDS`: started by the agent, not by people."""
    parser = argparse.ArgumentParser(prog="python -m agent.guard", description=__doc__)
    parser.add_argument("--fence-after", type=float, required=True, metavar="SECONDS")
    args = parser.parse_args(argv)
    if not args.fence_after > 0:
        parser.error(f"--fence-after is {args.fence_after}: it must be seconds > 0")
    logging.basicConfig(level=logging.INFO, format="tandem-guard: %(message)s")
    # The agent decides when the guard ends (goodbye or its own death), not a stray signal:
    # a SIGTERM meant for the agent's whole service must not end the guard before the agent.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    priority = _raise_priority()
    _avoid_oom_killer()
    # Find the cgroup tree now, not in the middle of a fence.
    with contextlib.suppress(CgroupError, OSError):
        cgroup2_root()
    log.info(
        "watching the agent (pid %d), fence after %g s, %s",
        os.getppid(),
        args.fence_after,
        priority,
    )
    return Guard(args.fence_after).run()


if __name__ == "__main__":
    sys.exit(main())
