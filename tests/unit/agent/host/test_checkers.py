"""Each checker against the real thing, passing and failing."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from agent.host.cgroup import ModuleGroup
from agent.host.checkers import CheckResult, CheckSpec, run_check
from tests.unit.agent.host.netns import NetnsPair, in_netns, ip, module_group, netns_pair


def check(spec: CheckSpec, group: ModuleGroup | None = None) -> CheckResult:
    return asyncio.run(run_check(spec, group))


@pytest.fixture
def group() -> Iterator[ModuleGroup]:
    with module_group() as made:
        yield made


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    with netns_pair() as made:
        yield made


# --- tcp ---------------------------------------------------------------------------------


def test_tcp_ok_while_a_server_listens() -> None:
    async def scenario() -> CheckResult:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await run_check(CheckSpec("tcp", address="127.0.0.1", port=port), None)

    result = asyncio.run(scenario())
    assert result.ok and result.detail.endswith("accepts connections")


def test_tcp_fails_on_a_closed_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        # Bound but not listening: the port is taken and refuses connections.
        result = check(CheckSpec("tcp", address="127.0.0.1", port=port))
    assert not result.ok
    assert result.detail == f"tcp 127.0.0.1:{port}: Connection refused"


def test_tcp_fails_at_its_timeout_when_nothing_answers() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        # Fill the accept queue: the kernel then drops new SYNs, so a connect hangs.
        fillers = []
        try:
            while True:
                filler = socket.socket()
                fillers.append(filler)
                filler.settimeout(0.3)
                filler.connect(("127.0.0.1", port))
        except TimeoutError:
            pass
        try:
            result = check(CheckSpec("tcp", address="127.0.0.1", port=port, timeout=0.3))
        finally:
            for filler in fillers:
                filler.close()
    assert not result.ok
    assert result.detail == f"tcp 127.0.0.1:{port}: no answer within 0.3 s"


def test_tcp_without_a_port_is_a_failed_check_not_an_error() -> None:
    result = check(CheckSpec("tcp", address="127.0.0.1"))
    assert result == CheckResult(False, "tcp checker needs both address and port")


# --- process -----------------------------------------------------------------------------


@pytest.mark.root
def test_process_found_only_in_the_modules_group(group: ModuleGroup) -> None:
    outside = subprocess.Popen(["sleep", "1000"])
    try:
        # A sleep runs on this kernel, but not in the module's group.
        missing = check(CheckSpec("process", name="sleep"), group)
        assert missing == CheckResult(False, "no process named sleep in the module's cgroup")
        inside = subprocess.Popen(["sleep", "1000"], preexec_fn=group.preexec())
        try:
            found = check(CheckSpec("process", name="sleep"), group)
            assert found == CheckResult(True, f"process sleep runs (pid {inside.pid})")
            other = check(CheckSpec("process", name="web-server"), group)
            assert not other.ok
        finally:
            inside.kill()
            inside.wait()
    finally:
        outside.kill()
        outside.wait()


@pytest.mark.root
def test_process_matches_the_program_path_of_its_command_line(group: ModuleGroup) -> None:
    proc = subprocess.Popen(["/bin/sleep", "1000"], preexec_fn=group.preexec())
    try:
        assert check(CheckSpec("process", name="sleep"), group).ok
    finally:
        proc.kill()
        proc.wait()


def test_process_without_a_group_fails_with_a_reason() -> None:
    result = check(CheckSpec("process", name="sleep"), None)
    assert result == CheckResult(False, "process sleep: the module has no cgroup to look in")


# --- interface ---------------------------------------------------------------------------


def eventually(ns: str, spec: CheckSpec, expected: CheckResult) -> None:
    """Checks in `ns` until the result is `expected`; the kernel's link watcher is not instant."""
    deadline = time.monotonic() + 10.0
    while (result := in_netns(ns, lambda: run_check(spec, None))) != expected:
        assert time.monotonic() < deadline, f"still {result}, expected {expected}"
        time.sleep(0.05)


@pytest.mark.root
def test_interface_up_then_down_when_the_peer_goes_down(pair: NetnsPair) -> None:
    spec = CheckSpec("interface", name="eth0")
    eventually(pair.a, spec, CheckResult(True, "interface eth0 is up"))
    ip("-n", pair.b, "link", "set", "eth0", "down")
    eventually(
        pair.a,
        spec,
        CheckResult(False, "interface eth0 is not up (state DOWN, no carrier)"),
    )
    ip("-n", pair.a, "link", "set", "eth0", "down")
    eventually(
        pair.a,
        spec,
        CheckResult(False, "interface eth0 is not up (state DOWN, administratively down)"),
    )


@pytest.mark.root
def test_interface_that_does_not_exist(pair: NetnsPair) -> None:
    result = in_netns(pair.a, lambda: run_check(CheckSpec("interface", name="eth9"), None))
    assert result == CheckResult(False, "interface eth9 does not exist")


def test_loopback_counts_as_up() -> None:
    assert check(CheckSpec("interface", name="lo")).ok


# --- command -----------------------------------------------------------------------------


def test_command_exit_zero_is_ok_with_its_output() -> None:
    result = check(CheckSpec("command", command="echo healthy"))
    assert result.ok
    assert result.detail.startswith("`echo healthy` exited 0 after")
    assert result.detail.endswith(": healthy")


def test_command_failing_gives_its_code_and_output() -> None:
    result = check(CheckSpec("command", command=["sh", "-c", "echo broken >&2; exit 2"]))
    assert not result.ok
    assert "exited 2" in result.detail and result.detail.endswith(": broken")


def test_command_timeout_is_a_failure_and_kills_it() -> None:
    result = check(CheckSpec("command", command="echo waiting; exec sleep 1000", timeout=0.3))
    assert not result.ok
    assert "timed out and was killed" in result.detail
    assert result.detail.endswith(": waiting")


def test_unknown_type_names_the_known_ones() -> None:
    result = check(CheckSpec("ping"))
    assert result == CheckResult(
        False,
        "unknown checker type 'ping': use one of ('tcp', 'process', 'interface', 'command')",
    )
