"""Checkers: is the module's application healthy on this node? tcp, process, interface, command.

Each check returns ok or not with a sentence saying why; it never raises for a failed or
misdescribed check, so one bad checker cannot stop the agent's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.host.cgroup import ModuleGroup
from agent.host.services import ServiceError, run_script

IFF_UP = 0x1
CHECK_TYPES = ("tcp", "process", "interface", "command")


@dataclass(frozen=True)
class CheckSpec:
    """One checker: its type and the fields that type uses."""

    type: str
    address: str | None = None
    port: int | None = None
    name: str | None = None
    command: str | Sequence[str] | None = None
    timeout: float = 5.0


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check, with a sentence saying why."""

    ok: bool
    detail: str


async def run_check(
    spec: CheckSpec, group: ModuleGroup | None, env: Mapping[str, str] | None = None
) -> CheckResult:
    """Runs one check once; `group` is the module's cgroup (needed by process checks)."""
    if spec.type == "tcp":
        return await _tcp(spec)
    if spec.type == "process":
        return _process(spec, group)
    if spec.type == "interface":
        return await _interface(spec)
    if spec.type == "command":
        return await _command(spec, env)
    return CheckResult(False, f"unknown checker type {spec.type!r}: use one of {CHECK_TYPES}")


async def _tcp(spec: CheckSpec) -> CheckResult:
    if spec.address is None or spec.port is None:
        return CheckResult(False, "tcp checker needs both address and port")
    where = f"{spec.address}:{spec.port}"
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(spec.address, spec.port), spec.timeout
        )
    except TimeoutError:
        return CheckResult(False, f"tcp {where}: no answer within {spec.timeout:g} s")
    except OSError as e:
        return CheckResult(False, f"tcp {where}: {os.strerror(e.errno) if e.errno else e}")
    writer.close()
    # A reset on close says nothing about whether the service accepts connections.
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return CheckResult(True, f"tcp {where} accepts connections")


def _process(spec: CheckSpec, group: ModuleGroup | None) -> CheckResult:
    if not spec.name:
        return CheckResult(False, "process checker needs the process name")
    # Only the module's own cgroup is searched, never the whole host: on a real server that
    # would also work, but in the lab both nodes share one kernel, so node2 would see node1's
    # application and think its own was running.
    if group is None:
        return CheckResult(False, f"process {spec.name}: the module has no cgroup to look in")
    for pid in group.pids():
        try:
            proc = psutil.Process(pid)
            names = {proc.name()}
            cmdline = proc.cmdline()
            if cmdline:
                names.add(os.path.basename(cmdline[0]))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if spec.name in names:
            return CheckResult(True, f"process {spec.name} runs (pid {pid})")
    return CheckResult(False, f"no process named {spec.name} in the module's cgroup")


async def _interface(spec: CheckSpec) -> CheckResult:
    if not spec.name:
        return CheckResult(False, "interface checker needs the interface name")
    # Netlink, not /sys/class/net: /sys shows the namespace of whoever mounted it, which is
    # the node's only when the agent was started by `ip netns exec`.
    try:
        async with AsyncIPRoute() as ipr:
            links = [link async for link in await ipr.get_links(ifname=spec.name)]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return CheckResult(False, f"interface {spec.name} does not exist")
        return CheckResult(False, f"interface {spec.name}: {e}")
    if not links:
        return CheckResult(False, f"interface {spec.name} does not exist")
    link = links[0]
    operstate = link.get("IFLA_OPERSTATE") or "UNKNOWN"
    carrier = link.get("IFLA_CARRIER")
    admin_up = bool(link["flags"] & IFF_UP)
    # Loopback and some virtual devices report UNKNOWN while working: then the carrier decides.
    if operstate == "UP" or (operstate == "UNKNOWN" and admin_up and carrier == 1):
        return CheckResult(True, f"interface {spec.name} is up")
    why = "administratively down" if not admin_up else "no carrier" if carrier == 0 else ""
    return CheckResult(
        False, f"interface {spec.name} is not up (state {operstate}{', ' + why if why else ''})"
    )


async def _command(spec: CheckSpec, env: Mapping[str, str] | None) -> CheckResult:
    if spec.command is None:
        return CheckResult(False, "command checker needs a command")
    try:
        result = await run_script(spec.command, spec.timeout, {**os.environ, **(env or {})})
    except ServiceError as e:
        return CheckResult(False, f"command checker: {e}")
    output = result.output.strip()
    detail = result.describe() + (f": {output}" if output else "")
    return CheckResult(result.ok, detail)
