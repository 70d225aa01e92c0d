"""Services and their cgroup for real: scripts that daemonize, hang, fail; escalation to kill."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.host.cgroup import CgroupError, ModuleGroup, find_cgroup2
from agent.host.services import (
    OUTPUT_TAIL,
    ScriptResult,
    ServiceController,
    ServiceError,
    ServiceSpec,
)
from tests.unit.agent.host.netns import gone, module_group, wait_for


@pytest.fixture
def group() -> Iterator[ModuleGroup]:
    with module_group() as made:
        yield made


def daemon_script(pidfile: Path, body: str = "sleep 1000") -> str:
    """A start script that double-forks a daemon into a new session and writes its pid."""
    return (
        'echo "starting $TANDEM_MODULE on $TANDEM_NODE with $EXTRA"\n'
        f"setsid sh -c '{body} & echo $! > {pidfile}; wait' </dev/null >/dev/null 2>&1 &\n"
        "echo started\n"
    )


def read_pid(pidfile: Path) -> int:
    wait_for(
        "the daemon's pid file", lambda: pidfile.exists() and pidfile.read_text().strip() != ""
    )
    return int(pidfile.read_text())


# --- the cgroup ---------------------------------------------------------------------------


def test_cgroup2_mount_is_found_in_mountinfo() -> None:
    text = (
        "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755\n"
        "41 31 0:38 / /sys/fs/cgroup/my\\040tree rw shared:9 - cgroup2 cgroup2 rw\n"
    )
    assert find_cgroup2(text) == Path("/sys/fs/cgroup/my tree")
    assert find_cgroup2("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n") is None


def test_group_names_that_are_not_path_parts_are_refused() -> None:
    with pytest.raises(CgroupError, match=r"module name '\.\.'"):
        ModuleGroup("node1", "..")
    with pytest.raises(CgroupError, match="node name 'a/b'"):
        ModuleGroup("a/b", "web")


@pytest.mark.root
def test_a_child_joins_the_group_and_its_double_fork_stays(
    group: ModuleGroup, tmp_path: Path
) -> None:
    assert group.path.parts[-3:] == ("tandem", group.node, "web")
    assert group.is_empty() and group.pids() == []
    pidfile = tmp_path / "pid"
    script = f"setsid sh -c 'sleep 1000 & echo $! > {pidfile}' </dev/null >/dev/null 2>&1 &"
    subprocess.run(["sh", "-c", script], preexec_fn=group.preexec(), check=True)
    daemon = read_pid(pidfile)
    assert daemon in group.pids()
    assert not group.is_empty()
    assert group.kill(timeout=10.0) is True
    assert gone(daemon) and group.is_empty()
    group.remove()
    assert not group.exists()
    group.remove()  # twice is fine


@pytest.mark.root
def test_signal_reaches_every_process_and_remove_refuses_a_busy_group(
    group: ModuleGroup,
) -> None:
    procs = [
        subprocess.Popen(["sleep", "1000"], preexec_fn=group.preexec(), start_new_session=True)
        for _ in range(2)
    ]
    try:
        assert sorted(p.pid for p in procs) == group.pids()
        with pytest.raises(CgroupError, match="still has processes; kill"):
            group.remove()
        assert group.signal(signal.SIGTERM) == 2
        assert [p.wait(timeout=10) for p in procs] == [-signal.SIGTERM] * 2
        wait_for("the group to empty", group.is_empty)
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.root
def test_kill_without_cgroup_kill_freezes_and_kills_each(group: ModuleGroup) -> None:
    # The path taken on kernels before 5.14, which have no cgroup.kill.
    proc = subprocess.Popen(["sleep", "1000"], preexec_fn=group.preexec())
    try:
        group._freeze_and_kill_each()
        assert proc.wait(timeout=10) == -signal.SIGKILL
        wait_for("the group to empty", group.is_empty)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.root
def test_add_moves_a_running_process(group: ModuleGroup) -> None:
    proc = subprocess.Popen(["sleep", "1000"])
    try:
        group.add(proc.pid)
        assert group.pids() == [proc.pid]
    finally:
        proc.kill()
        proc.wait()


# --- the service spec -------------------------------------------------------------------


def test_spec_refuses_systemd_with_scripts() -> None:
    with pytest.raises(ServiceError, match="either systemd or start/stop scripts"):
        ServiceSpec(start="/srv/start.sh", systemd="web.service")


def test_spec_refuses_bad_timeouts_and_empty_commands() -> None:
    with pytest.raises(ServiceError, match=r"service\.start_timeout is 0"):
        ServiceSpec(start="x", start_timeout=0)
    with pytest.raises(ServiceError, match=r"service\.stop: a command is empty"):
        ServiceSpec(stop="  ")
    with pytest.raises(ServiceError, match=r"service\.start: a command is an empty list"):
        ServiceSpec(start=[])


def test_describe_says_what_happened() -> None:
    shell = ScriptResult(("/bin/sh", "-c", "/srv/start.sh"), 0, "", False, 0.214)
    assert shell.describe() == "`/srv/start.sh` exited 0 after 0.21 s"
    assert shell.ok
    hung = ScriptResult(("sleep", "9"), None, "", True, 5.0)
    assert hung.describe() == "`sleep 9` timed out and was killed after 5.00 s"
    assert not hung.ok


# --- the service controller -------------------------------------------------------------


@pytest.mark.root
def test_start_daemonizes_and_stop_removes_every_process(
    group: ModuleGroup, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    spec = ServiceSpec(start=daemon_script(pidfile), stop="echo stopping", stop_timeout=10)
    service = ServiceController(spec, group, {"EXTRA": "extra"}, term_grace=5.0)

    async def scenario() -> tuple[ScriptResult | None, bool, int, list[ScriptResult | str], bool]:
        started = await service.start()
        running = await service.is_running()
        daemon = read_pid(pidfile)
        steps = await service.stop()
        return started, running, daemon, steps, await service.is_running()

    started, running, daemon, steps, still_running = asyncio.run(scenario())
    assert started is not None and started.ok, started
    assert f"starting web on {group.node} with extra" in started.output
    assert "started" in started.output
    assert running is True
    stop_script = steps[0]
    assert isinstance(stop_script, ScriptResult) and stop_script.ok
    assert stop_script.output == "stopping\n"
    # The stop script left the daemon alone: the escalation ended it with SIGTERM.
    assert steps[1:] == [
        "sent SIGTERM to 2 process(es) left in the module's cgroup",
        "they ended within the grace period",
    ]
    assert still_running is False
    assert gone(daemon)
    assert group.pids() == []


@pytest.mark.root
def test_a_hanging_stop_script_is_escalated_to_cgroup_kill(
    group: ModuleGroup, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    stubborn = 'trap "" TERM; while :; do sleep 0.1; done'
    spec = ServiceSpec(
        start=daemon_script(pidfile, f"sh -c '\\''{stubborn}'\\''"),
        stop="echo stopping; sleep 1000",
        stop_timeout=0.5,
    )
    service = ServiceController(spec, group, term_grace=0.5)

    async def scenario() -> tuple[int, list[ScriptResult | str]]:
        started = await service.start()
        assert started is not None and started.ok, started
        return read_pid(pidfile), await service.stop()

    daemon, steps = asyncio.run(scenario())
    stop_script = steps[0]
    assert isinstance(stop_script, ScriptResult)
    assert stop_script.timed_out and stop_script.exit_code is None
    assert stop_script.output == "stopping\n"
    assert isinstance(steps[1], str) and steps[1].startswith("sent SIGTERM to")
    assert isinstance(steps[2], str) and steps[2].endswith("killed with cgroup.kill")
    assert len(steps) == 3
    assert gone(daemon)
    assert group.is_empty()


@pytest.mark.root
def test_a_hanging_start_script_is_killed_at_its_timeout(group: ModuleGroup) -> None:
    spec = ServiceSpec(start="echo begin; sleep 1000", start_timeout=0.5)
    result = asyncio.run(ServiceController(spec, group).start())
    assert result is not None
    assert result.timed_out and result.exit_code is None and not result.ok
    assert result.output == "begin\n"
    wait_for("the start script's processes to end", group.is_empty)


@pytest.mark.root
def test_exit_code_and_both_output_streams_are_captured(group: ModuleGroup) -> None:
    spec = ServiceSpec(start="echo out; echo err >&2; exit 3")
    result = asyncio.run(ServiceController(spec, group).start())
    assert result is not None
    assert (result.exit_code, result.timed_out, result.ok) == (3, False, False)
    assert result.output == "out\nerr\n"
    assert result.describe().startswith("`echo out; echo err >&2; exit 3` exited 3 after")


@pytest.mark.root
def test_output_keeps_only_its_last_4_kib(group: ModuleGroup) -> None:
    spec = ServiceSpec(start="head -c 10000 /dev/zero | tr '\\0' a; echo; echo END")
    result = asyncio.run(ServiceController(spec, group).start())
    assert result is not None and result.ok
    assert len(result.output) == OUTPUT_TAIL
    assert result.output.endswith("aaa\nEND\n")


@pytest.mark.root
def test_a_daemon_that_keeps_stdout_open_does_not_hold_start(group: ModuleGroup) -> None:
    # The daemon inherits the output pipe and writes to it after the script has returned.
    spec = ServiceSpec(start="(sleep 0.2; echo later; sleep 1000) & echo now")
    service = ServiceController(spec, group)

    async def scenario() -> ScriptResult | None:
        result = await service.start()
        await asyncio.sleep(0)
        await service.force_stop()
        return result

    result = asyncio.run(scenario())
    assert result is not None and result.ok and result.output == "now\n"
    assert group.is_empty()


@pytest.mark.root
def test_a_missing_program_is_reported_not_raised(group: ModuleGroup) -> None:
    result = asyncio.run(
        ServiceController(ServiceSpec(start=["/nonexistent/start"]), group).start()
    )
    assert result is not None
    assert result.exit_code == 127
    assert "cannot run /nonexistent/start: No such file or directory" in result.output
    shell = asyncio.run(ServiceController(ServiceSpec(start="/nonexistent/start"), group).start())
    assert shell is not None and shell.exit_code == 127 and "not found" in shell.output


@pytest.mark.root
def test_force_stop_kills_at_once_without_the_stop_script(
    group: ModuleGroup, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    marker = tmp_path / "stop-ran"
    spec = ServiceSpec(start=daemon_script(pidfile), stop=f"touch {marker}")
    service = ServiceController(spec, group)

    async def scenario() -> tuple[int, list[ScriptResult | str]]:
        await service.start()
        return read_pid(pidfile), await service.force_stop()

    daemon, steps = asyncio.run(scenario())
    assert steps == ["killed 2 process(es) with cgroup.kill"]
    assert gone(daemon) and group.is_empty()
    assert not marker.exists()


@pytest.mark.root
def test_nothing_to_start_or_stop(group: ModuleGroup) -> None:
    service = ServiceController(ServiceSpec(), group)

    async def scenario() -> tuple[ScriptResult | None, list[ScriptResult | str], bool]:
        return await service.start(), await service.stop(), await service.is_running()

    assert asyncio.run(scenario()) == (None, [], False)
