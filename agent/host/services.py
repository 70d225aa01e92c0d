"""A module's application: start and stop scripts (or a systemd unit) run with timeouts.

Scripts run inside the module's cgroup, so whatever they start, daemons included, is found and
stopped later; a stop that does not empty the group is escalated (SIGTERM, a grace, then
`cgroup.kill`). Every step is returned as data for the event log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.host.cgroup import ModuleGroup

log = logging.getLogger(__name__)

OUTPUT_TAIL = 4096
SHELL = "/bin/sh"


class ServiceError(Exception):
    """A service is described wrongly; the message names the field and the fix."""


Command = str | Sequence[str]


def command_argv(command: Command) -> tuple[str, ...]:
    """A command as an argv: a string is a shell command line, a list is run as it is."""
    if isinstance(command, str):
        if not command.strip():
            raise ServiceError("a command is empty: give a script path or a command line")
        return (SHELL, "-c", command)
    argv = tuple(command)
    if not argv or not argv[0]:
        raise ServiceError("a command is an empty list: give the program and its arguments")
    return argv


@dataclass(frozen=True)
class ServiceSpec:
    """How a module's application is started and stopped: scripts, or one systemd unit."""

    start: Command | None = None
    stop: Command | None = None
    systemd: str | None = None
    start_timeout: float = 60.0
    stop_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.systemd is not None and (self.start is not None or self.stop is not None):
            raise ServiceError(
                "service: give either systemd or start/stop scripts, not both "
                f"(systemd={self.systemd!r}, start={self.start!r}, stop={self.stop!r})"
            )
        for name, value in (
            ("start_timeout", self.start_timeout),
            ("stop_timeout", self.stop_timeout),
        ):
            if not value > 0:
                raise ServiceError(
                    f"service.{name} is {value!r}: it must be a number of seconds > 0"
                )
        for name, command in (("start", self.start), ("stop", self.stop)):
            if command is not None:
                try:
                    command_argv(command)
                except ServiceError as e:
                    raise ServiceError(f"service.{name}: {e}") from None


@dataclass(frozen=True)
class ScriptResult:
    """What one run of a script or command did; exit_code is None if it was killed or never ran."""

    argv: tuple[str, ...]
    exit_code: int | None
    output: str
    timed_out: bool
    duration: float

    @property
    def ok(self) -> bool:
        """True if it ran to the end and exited 0."""
        return self.exit_code == 0 and not self.timed_out

    def describe(self) -> str:
        """One line for the event log, e.g. "`/srv/web/start.sh` exited 0 after 0.21 s"."""
        shown = self.argv[2] if self.argv[:2] == (SHELL, "-c") else " ".join(self.argv)
        if self.timed_out:
            what = "timed out and was killed"
        elif self.exit_code is None:
            what = "could not run"
        elif self.exit_code < 0:
            what = f"was killed by signal {-self.exit_code}"
        else:
            what = f"exited {self.exit_code}"
        return f"`{shown}` {what} after {self.duration:.2f} s"


class _OutputTail:
    """Reads a pipe without blocking, keeps the last OUTPUT_TAIL bytes, logs the rest later.

    A daemon that a start script leaves running keeps the pipe open: its output is read (and
    logged) until it closes, so the daemon never blocks on a full pipe or dies of SIGPIPE.
    """

    def __init__(self, fd: int, label: str) -> None:
        self._fd = fd
        self._label = label
        self._tail = bytearray()
        self._logging = False
        self._pending = b""
        os.set_blocking(fd, False)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._read)

    def _read(self) -> None:
        while self._fd >= 0:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._log_lines(final=True)
                self.close()
                return
            if self._logging:
                self._pending += chunk
                self._log_lines(final=False)
            else:
                self._tail += chunk
                del self._tail[:-OUTPUT_TAIL]

    def _log_lines(self, final: bool) -> None:
        lines = self._pending.split(b"\n")
        self._pending = b"" if final else lines.pop()
        for line in lines:
            if line:
                log.info("%s: %s", self._label, line.decode(errors="replace"))

    def finish(self) -> str:
        """The output so far (its last OUTPUT_TAIL bytes); later output goes to the log."""
        self._read()
        self._logging = True
        return self._tail.decode(errors="replace")

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


async def run_script(
    command: Command,
    timeout: float,
    env: Mapping[str, str],
    group: ModuleGroup | None = None,
) -> ScriptResult:
    """Runs a command to its end or its timeout, inside `group` if one is given.

    It gets its own session, so a signal to the agent's process group does not reach it and
    a timeout kills its whole process group. Output (stdout and stderr) is kept to the last
    4 KiB. A command that cannot be started gives exit code 127 or 126, as a shell would.
    """
    argv = command_argv(command)
    loop = asyncio.get_running_loop()
    started = loop.time()
    read_fd, write_fd = os.pipe()
    tail = _OutputTail(read_fd, f"{group.module if group else 'command'} {argv[-1][:60]}")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=write_fd,
            stderr=write_fd,
            env=dict(env),
            start_new_session=True,
            preexec_fn=group.preexec() if group is not None else None,
        )
    except (OSError, subprocess.SubprocessError) as e:
        tail.close()
        code = 126 if isinstance(e, PermissionError) else 127
        reason = e.strerror if isinstance(e, OSError) else f"cannot enter cgroup {group}"
        return ScriptResult(argv, code, f"cannot run {argv[0]}: {reason}", False, 0.0)
    finally:
        os.close(write_fd)
    timed_out = False
    try:
        exit_code: int | None = await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        exit_code = None
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        tail.close()
        raise
    return ScriptResult(argv, exit_code, tail.finish(), timed_out, loop.time() - started)


class ServiceController:
    """Starts and stops one module's application on this node, and says if it runs."""

    def __init__(
        self,
        spec: ServiceSpec,
        group: ModuleGroup,
        env: Mapping[str, str] | None = None,
        term_grace: float = 3.0,
        kill_timeout: float = 5.0,
    ) -> None:
        self.spec = spec
        self.group = group
        self.term_grace = term_grace
        self.kill_timeout = kill_timeout
        self._env = {
            **os.environ,
            "TANDEM_MODULE": group.module,
            "TANDEM_NODE": group.node,
            **(env or {}),
        }

    async def start(self) -> ScriptResult | None:
        """Runs the start script in the module's group (None if there is nothing to start)."""
        if self.spec.systemd is not None:
            argv = ("systemctl", "start", self.spec.systemd)
            return await run_script(argv, self.spec.start_timeout, self._env)
        if self.spec.start is None:
            return None
        self.group.create()
        return await run_script(self.spec.start, self.spec.start_timeout, self._env, self.group)

    async def stop(self) -> list[ScriptResult | str]:
        """Runs the stop script, then ends whatever is left in the group; returns each step."""
        if self.spec.systemd is not None:
            argv = ("systemctl", "stop", self.spec.systemd)
            return [await run_script(argv, self.spec.stop_timeout, self._env)]
        steps: list[ScriptResult | str] = []
        if self.spec.stop is not None:
            # Run even if the group is empty: a stop script may also stop what lives outside
            # it (a container run by its daemon), so it must be idempotent anyway.
            self.group.create()
            steps.append(
                await run_script(self.spec.stop, self.spec.stop_timeout, self._env, self.group)
            )
        steps.extend(await self._escalate())
        return steps

    async def _escalate(self) -> list[str]:
        if self.group.is_empty():
            return []
        sent = self.group.signal(signal.SIGTERM)
        steps = [f"sent SIGTERM to {sent} process(es) left in the module's cgroup"]
        if await self.group.wait_empty(self.term_grace):
            return [*steps, "they ended within the grace period"]
        left = len(self.group.pids())
        steps.append(
            f"{left} process(es) still there after {self.term_grace:g} s: killed with cgroup.kill"
        )
        return steps + await self._kill()

    async def force_stop(self) -> list[ScriptResult | str]:
        """Kills every process of the module at once, without its stop script."""
        if self.spec.systemd is not None:
            argv = ("systemctl", "kill", "--signal=SIGKILL", self.spec.systemd)
            return [await run_script(argv, self.spec.stop_timeout, self._env)]
        if self.group.is_empty():
            return []
        left = len(self.group.pids())
        return [f"killed {left} process(es) with cgroup.kill", *await self._kill()]

    async def _kill(self) -> list[str]:
        if await self.group.kill_async(self.kill_timeout):
            return []
        return [
            f"{len(self.group.pids())} process(es) still in {self.group.path} "
            f"{self.kill_timeout:g} s after cgroup.kill (stuck in the kernel?)"
        ]

    async def is_running(self) -> bool:
        """True if the application runs: its group has a process, or its unit is active."""
        if self.spec.systemd is not None:
            argv = ("systemctl", "is-active", "--quiet", self.spec.systemd)
            return (await run_script(argv, self.spec.stop_timeout, self._env)).ok
        return not self.group.is_empty()
