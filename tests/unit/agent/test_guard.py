"""The fence guard: a fake agent holds a VIP and a module; kill or stop it, and the guard fences."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.guard import GuardError, GuardHandle
from agent.host.cgroup import ModuleGroup
from tests.unit.agent.host.netns import (
    NetnsPair,
    gone,
    ip,
    netns_pair,
    remove_node_groups,
    unique_prefix,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[3]
VIP = "198.18.0.100/24"
FENCE_AFTER = 0.5

# The fake agent: holds a VIP and a module whose daemon left its session, spawns the guard,
# feeds it every 0.1 s, says on stdout what it sees, and closes the guard on "close".
FAKE_AGENT = """
import asyncio, json, subprocess, sys
from agent.guard import GuardHandle
from agent.host.cgroup import ModuleGroup
from agent.host.vip import Vip, add_vip

def say(**message):
    print(json.dumps(message), flush=True)

async def main(node, vip_address, interface, fence_after):
    vip = Vip(vip_address, interface)
    group = ModuleGroup(node, "web")
    group.create()
    # As the daemon does: the guard first, and told of a VIP or module before it is taken.
    guard = await GuardHandle.spawn(fence_after)
    guard.feed([vip], [(node, "web")])
    await add_vip(vip)
    subprocess.run(["sh", "-c", "setsid sleep 1000 </dev/null >/dev/null 2>&1 &"],
                   preexec_fn=group.preexec(), check=True)
    say(event="ready", guard=guard.pid, pids=group.pids())
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    next_command = asyncio.ensure_future(commands.readline())
    while True:
        guard.feed([vip], [(node, "web")])
        if guard.fenced:
            say(event="fenced", reason=guard.last_fence.reason,
                vips=guard.last_fence.vips_removed, groups=guard.last_fence.groups_killed)
            guard.clear_fenced()
        done, _ = await asyncio.wait([next_command], timeout=0.1)
        if done and next_command.result().strip() == b"close":
            await guard.close()
            say(event="closed", guard_exit=guard.returncode, fenced=bool(guard.fences))
            return

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
"""


@dataclass
class FakeAgent:
    """A running fake agent in namespace `pair.a`, with what it said so far."""

    proc: subprocess.Popen[bytes]
    pair: NetnsPair
    group: ModuleGroup
    guard: int = 0

    def read(self, timeout: float = 15.0) -> dict[str, Any]:
        """The next message the fake agent prints."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            pytest.fail("the fake agent said nothing in time")
        line = self.proc.stdout.readline()
        if not line:
            pytest.fail(f"the fake agent ended (exit code {self.proc.wait()})")
        message: dict[str, Any] = json.loads(line)
        return message

    def say(self, command: str) -> None:
        """Sends the fake agent a command."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def holds_vip(self) -> bool:
        return "198.18.0.100/24" in ip("-n", self.pair.a, "addr", "show", "eth0")


@pytest.fixture
def agent() -> Iterator[FakeAgent]:
    node = unique_prefix()
    group = ModuleGroup(node, "web")
    with netns_pair() as pair:
        # `ip netns exec` as the lab runs a node: its own network and mount namespaces.
        argv = ["ip", "netns", "exec", pair.a, sys.executable, "-c", FAKE_AGENT]
        proc = subprocess.Popen(
            [*argv, node, VIP, pair.interface, str(FENCE_AFTER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            start_new_session=True,
        )
        fake = FakeAgent(proc, pair, group)
        try:
            ready = fake.read()
            assert ready["event"] == "ready"
            fake.guard = ready["guard"]
            assert len(ready["pids"]) == 1
            assert fake.holds_vip()
            yield fake
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            if fake.guard:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(fake.guard, signal.SIGKILL)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
            remove_node_groups(group.path.parent)


@pytest.mark.root
def test_kill_9_of_the_agents_process_group_fences(agent: FakeAgent) -> None:
    daemon = agent.group.pids()[0]
    # The whole process group: the guard, in its own session, must survive it and act.
    os.killpg(agent.proc.pid, signal.SIGKILL)
    wait_for("the VIP to be removed", lambda: not agent.holds_vip())
    wait_for("the module's processes to be killed", agent.group.is_empty)
    assert gone(daemon)
    wait_for("the guard to exit after fencing", lambda: gone(agent.guard))


@pytest.mark.root
def test_a_stopped_agent_is_fenced_and_learns_it_when_it_wakes(agent: FakeAgent) -> None:
    os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        wait_for("the VIP to be removed", lambda: not agent.holds_vip())
        wait_for("the module's processes to be killed", agent.group.is_empty)
        assert not gone(agent.guard), "after a stall the guard stays for the agent's return"
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
    fenced = agent.read()
    assert fenced["event"] == "fenced"
    assert "stalled" in fenced["reason"]
    assert fenced["vips"] == [VIP]
    assert fenced["groups"] == [f"{agent.group.node}/web"]
    # Fed again, the guard keeps watching; an orderly close still ends it cleanly.
    agent.say("close")
    assert agent.read() == {"event": "closed", "guard_exit": 0, "fenced": True}


@pytest.mark.root
def test_an_orderly_close_fences_nothing(agent: FakeAgent) -> None:
    agent.say("close")
    closed = agent.read()
    assert closed == {"event": "closed", "guard_exit": 0, "fenced": False}
    assert agent.proc.wait(timeout=30) == 0
    wait_for("the guard to exit", lambda: gone(agent.guard))
    # The guard is gone and the agent too: the VIP and the daemon were left alone.
    assert agent.holds_vip()
    assert len(agent.group.pids()) == 1


# --- without root: the handle and the guard's own rules ---------------------------------


def test_a_stall_is_reported_and_the_guard_stays() -> None:
    async def scenario() -> None:
        guard = await GuardHandle.spawn(0.2)
        guard.feed([], [])
        assert await guard.wait_fenced(15.0)
        assert guard.last_fence is not None
        assert "no feed from the agent's decision loop" in guard.last_fence.reason
        assert (guard.last_fence.vips_removed, guard.last_fence.groups_killed) == ([], [])
        assert guard.alive()
        guard.clear_fenced()
        guard.feed([], [])
        await guard.close()
        assert guard.returncode == 0 and not guard.alive()

    asyncio.run(scenario())


def test_close_without_a_feed_fences_nothing() -> None:
    async def scenario() -> None:
        guard = await GuardHandle.spawn(5.0)
        assert guard.alive()
        guard.feed([], [])
        await guard.close()
        assert guard.returncode == 0
        assert guard.fences == [] and not guard.fenced

    asyncio.run(scenario())


def test_fence_after_must_be_positive() -> None:
    with pytest.raises(GuardError, match="fence_after is 0: it must be seconds > 0"):
        asyncio.run(GuardHandle.spawn(0))
    done = subprocess.run(
        [sys.executable, "-m", "agent.guard", "--fence-after", "-1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 2
    assert "--fence-after is -1.0: it must be seconds > 0" in done.stderr
