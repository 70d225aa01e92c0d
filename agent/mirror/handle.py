"""The agent's side of a mirror process: spawn it, send commands, receive its events (asyncio)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

READY_TIMEOUT = 20.0


class MirrorError(Exception):
    """The mirror process could not start or died; the message says why."""


class MirrorHandle:
    """One running mirror process; events arrive on `on_event` in the agent's loop."""

    def __init__(self, spec: dict[str, Any], on_event: Callable[[dict[str, Any]], None]) -> None:
        self.spec = spec
        self.role = str(spec["role"])
        self._on_event = on_event
        self._sock: socket.socket | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[dict[str, Any]] | None = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> dict[str, Any]:
        """Spawn the process and wait until its mounts are in place (or its reason to fail);
        its `ready` message."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = ours
        env = dict(os.environ)
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.mirror.process",
            json.dumps(self.spec),
            str(theirs.fileno()),
            pass_fds=(theirs.fileno(),),
            stdin=asyncio.subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        ours.setblocking(False)
        self._reader = asyncio.create_task(self._read_events(ours))
        try:
            first = await asyncio.wait_for(asyncio.shield(self._ready), READY_TIMEOUT)
        except TimeoutError:
            await self.kill()
            raise MirrorError(f"mirror process did not start within {READY_TIMEOUT:g} s") from None
        if first.get("event") != "ready":
            await self.kill()
            raise MirrorError(str(first.get("reason", "mirror process failed to start")))
        return first

    async def _read_events(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(message)
                    continue
                self._on_event(message)
        finally:
            writer.close()
            if self._ready is not None and not self._ready.done():
                self._ready.set_result({"event": "failed", "reason": "mirror process exited"})
            if self._ready is not None and self._ready.done():
                self._on_event({"event": "exited"})

    def send(self, command: dict[str, Any], fds: tuple[int, ...] = ()) -> bool:
        """Send one command (with descriptors); False if the process is gone."""
        if self._sock is None or not self.alive:
            return False
        data = (json.dumps(command, separators=(",", ":")) + "\n").encode()
        try:
            if fds:
                socket.send_fds(self._sock, [data], list(fds))
            else:
                self._sock.send(data)
        except (BlockingIOError, OSError):
            return False
        return True

    async def stop(self, timeout: float = 10.0) -> None:
        """Unmount and exit; killed if it does not finish in time."""
        if self._proc is None:
            return
        self.send({"cmd": "stop"})
        try:
            await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            await self.kill()
        await self._close()

    async def kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
        await self._close()

    async def _close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
            self._reader = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
