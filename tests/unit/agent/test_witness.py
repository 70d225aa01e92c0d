"""tandem-witness as a real process on loopback, driven by the agent's WitnessClient.

Also covers the key files it reads and the structured log lines it writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.core.frames import Action, LeaseItem, LeaseReply, LeaseRequest, Verdict, decode, encode
from agent.keys import KeyFileError, generate_key_file, load_key
from agent.logs import log_event, setup_logging
from agent.net.witness_client import WitnessClient

DEADLINE = 15.0
REPO = Path(__file__).resolve().parents[3]


class WitnessProcess:
    """One `python -m agent.witness` process; its stderr goes to a file the test reads."""

    def __init__(self, tmp: Path, keys: list[Path], state: Path) -> None:
        self.tmp = tmp
        self.keys = keys
        self.state = state
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.runs = 0

    @property
    def log(self) -> Path:
        return self.tmp / f"witness-{self.runs}.log"

    def start(self, port: int = 0) -> None:
        self.runs += 1
        args = [sys.executable, "-m", "agent.witness", "--listen", f"127.0.0.1:{port}"]
        for key in self.keys:
            args += ["--secret-file", str(key)]
        args += ["--state-dir", str(self.state)]
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(args, stderr=err, cwd=REPO)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def ready(self) -> int:
        """Wait for the "listening" line; the port it bound."""
        assert self.proc is not None
        deadline = time.monotonic() + DEADLINE
        while (found := re.search(r"event=listening .*port=(\d+)", self.text())) is None:
            if self.proc.poll() is not None:
                raise AssertionError(f"witness exited {self.proc.returncode}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"witness not listening:\n{self.text()}")
            await asyncio.sleep(0.02)
        self.port = int(found.group(1))
        return self.port

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=DEADLINE)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    generate_key_file(path)
    return path


@pytest.fixture
def witness(tmp_path: Path, key_file: Path) -> Iterator[WitnessProcess]:
    process = WitnessProcess(tmp_path, [key_file], tmp_path / "state")
    try:
        yield process
    finally:
        process.kill()


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


async def client(port: int, key: bytes, node: str, cluster: str = "shop") -> WitnessClient:
    c = WitnessClient("127.0.0.1", port, key, cluster, node, time.time_ns())
    await c.start()
    return c


async def ask(c: WitnessClient, action: Action, duration: float, module: str = "web") -> Verdict:
    verdicts = await c.request([LeaseItem(module, action)], duration, timeout=2.0)
    assert verdicts is not None, "the witness did not answer"
    return verdicts[module]


async def acquire_when_free(c: WitnessClient, duration: float, module: str = "web") -> Verdict:
    """Ask until granted, then renew for `duration`.

    A witness first started without records waits one lease period (of the duration
    asked) before granting a newcomer: the wait uses a short lease to keep tests quick.
    """
    deadline = time.monotonic() + DEADLINE
    while not (verdict := await ask(c, "acquire", min(duration, 0.5), module)).granted:
        assert time.monotonic() < deadline, verdict.reason
        await asyncio.sleep(0.05)
    return await ask(c, "renew", duration, module)


def test_the_witness_grants_one_node_and_makes_the_other_wait(
    witness: WitnessProcess, key_file: Path
) -> None:
    key = load_key(key_file)

    async def scenario() -> None:
        witness.start()
        port = await witness.ready()
        node1, node2 = await client(port, key, "node1"), await client(port, key, "node2")
        try:
            granted = await acquire_when_free(node1, 30.0)
            assert granted.holder == "node1"
            assert 0 < granted.expires_in <= 30.0
            denied = await ask(node2, "acquire", 30.0)
            assert not denied.granted
            assert denied.holder == "node1"
            assert denied.reason.startswith("lease held by node1 for another")
            assert (await ask(node1, "renew", 30.0)).granted
            state = json.loads((witness.state / "leases.json").read_text())
            assert [(e["cluster"], e["module"], e["holder"]) for e in state["leases"]] == [
                ("shop", "web", "node1")
            ]
            assert (await ask(node1, "release", 30.0)).granted
            # Granted at once: the witness has run longer than the 0.5 s asked for.
            assert (await ask(node2, "acquire", 0.5)).granted
            assert (await ask(node2, "renew", 30.0)).granted
            several = await node1.request(
                [LeaseItem("web", "acquire"), LeaseItem("db", "acquire")], 0.5, timeout=2.0
            )
            assert several is not None
            assert not several["web"].granted and several["db"].granted
        finally:
            node1.close()
            node2.close()
        assert "event=holder" in witness.text()

    run(scenario)


def test_a_witness_killed_and_restarted_never_grants_the_other_node_early(
    witness: WitnessProcess, key_file: Path
) -> None:
    key = load_key(key_file)
    duration = 2.0

    async def scenario() -> None:
        witness.start()
        port = await witness.ready()
        node1, node2 = await client(port, key, "node1"), await client(port, key, "node2")
        try:
            await acquire_when_free(node1, duration)
            witness.kill()  # kill -9: no chance to write anything more
            restarted = time.monotonic()
            witness.start(port)
            await witness.ready()
            assert "event=restore" in witness.text()
            answers: list[tuple[float, Verdict]] = []
            while not answers or not answers[-1][1].granted:
                verdict = await ask(node2, "acquire", duration)
                answers.append((time.monotonic(), verdict))
                assert time.monotonic() < restarted + DEADLINE
                await asyncio.sleep(0.05)
            granted_at, granted = answers[-1]
            # The restored lease runs a full duration from the restart, which came after
            # `restarted`: whatever the machine's speed, the grant cannot come earlier.
            assert granted_at >= restarted + duration
            assert "node1" in granted.reason and "expired" in granted.reason
            for _, verdict in answers[:-1]:
                assert verdict.holder == "node1"
                assert verdict.reason.startswith("lease held by node1")
        finally:
            node1.close()
            node2.close()

    run(scenario)


def test_a_restarted_witness_keeps_the_holder_and_lets_it_renew(
    witness: WitnessProcess, key_file: Path
) -> None:
    key = load_key(key_file)

    async def scenario() -> None:
        witness.start()
        port = await witness.ready()
        node1 = await client(port, key, "node1")
        try:
            await acquire_when_free(node1, 30.0)
            assert witness.terminate() == 0
            witness.start(port)
            await witness.ready()
            renewed = await ask(node1, "renew", 30.0)
            assert renewed.granted and renewed.reason.startswith("lease renewed")
        finally:
            node1.close()
        assert re.search(
            r"event=stopped .*requests=\d+", witness.log.with_name("witness-1.log").read_text()
        )

    run(scenario)


def test_only_a_witness_without_records_makes_newcomers_wait(
    witness: WitnessProcess, key_file: Path
) -> None:
    key = load_key(key_file)

    async def scenario() -> None:
        witness.start()
        port = await witness.ready()
        node1 = await client(port, key, "node1")
        try:
            # First start: the witness cannot know whether someone held a lease before.
            waiting = await ask(node1, "acquire", 600.0)
            assert not waiting.granted
            assert "without its lease records" in waiting.reason
            assert (witness.state / "leases.json").exists()
            witness.kill()
            witness.start(port)
            await witness.ready()
            # It wrote a record at its first start: a restart knows nobody holds a lease.
            assert (await ask(node1, "acquire", 600.0)).granted
        finally:
            node1.close()

    run(scenario)


def test_forged_and_replayed_requests_get_no_answer(
    witness: WitnessProcess, key_file: Path
) -> None:
    key = load_key(key_file)

    async def scenario() -> None:
        witness.start()
        port = await witness.ready()
        liar = await client(port, os.urandom(32), "node1")
        try:
            assert await liar.request([LeaseItem("web", "acquire")], 1.5, timeout=0.3) is None
        finally:
            liar.close()
        forged = liar.stats.sent + 1

        # Replies arrive in order on one socket: if the forged or replayed datagram were
        # answered, that answer would come before the answer to the fresh request after it.
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(DEADLINE)
        sock.connect(("127.0.0.1", port))

        def request(seq: int) -> bytes:
            items = (LeaseItem("web", "renew"),)
            return encode(key, LeaseRequest("shop", "node3", 42, seq, 1.5, items))

        def reply_seq() -> int:
            reply = decode(key, sock.recv(65536))
            assert isinstance(reply, LeaseReply)
            return reply.seq

        try:
            captured = request(1)
            sock.send(captured)
            assert reply_seq() == 1
            sock.send(captured)
            sock.send(encode(os.urandom(32), LeaseRequest("shop", "node3", 42, 2, 1.5, ())))
            sock.send(b"\x00" * 64)
            sock.send(request(3))
            assert reply_seq() == 3
        finally:
            sock.close()
        assert witness.terminate() == 0
        stopped = witness.text().splitlines()[-1]
        assert "event=stopped" in stopped
        assert f"forged={forged} " in stopped
        assert "replayed=1 " in stopped and "malformed=1 " in stopped
        assert "event=dropped" in witness.text()

    run(scenario)


def test_each_cluster_key_has_its_own_leases(tmp_path: Path, key_file: Path) -> None:
    other_file = tmp_path / "other.key"
    generate_key_file(other_file)
    key, other = load_key(key_file), load_key(other_file)
    process = WitnessProcess(tmp_path, [key_file, other_file], tmp_path / "state")

    async def scenario() -> None:
        process.start()
        port = await process.ready()
        shop1 = await client(port, key, "node1")
        # A node holding another cluster's key, claiming this cluster's name.
        intruder = await client(port, other, "node2")
        try:
            await acquire_when_free(shop1, 30.0)
            mine = await acquire_when_free(intruder, 30.0)
            assert (
                mine.granted and mine.holder == "node2"
            )  # its own lease under its own key: shop1's is untouched
            assert (await ask(shop1, "renew", 30.0)).granted
        finally:
            shop1.close()
            intruder.close()

    try:
        run(scenario)
    finally:
        process.kill()


def witness_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.witness", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=DEADLINE,
        check=False,
    )


def test_bad_arguments_are_explained_without_a_traceback(tmp_path: Path, key_file: Path) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("not a key\n")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "leases.json").write_text("{")
    cases = [
        (["--secret-file", str(key_file)], "--listen"),
        (["--listen", "127.0.0.1", "--secret-file", str(key_file)], "ADDR:PORT"),
        (["--listen", "localhost:7710", "--secret-file", str(key_file)], "IP address"),
        (["--listen", "127.0.0.1:99999", "--secret-file", str(key_file)], "port must be"),
        (["--listen", "127.0.0.1:0", "--secret-file", str(tmp_path / "none"), *state], "no such"),
        (["--listen", "127.0.0.1:0", "--secret-file", str(bad_key), *state], "not a cluster key"),
        (
            [
                "--listen",
                "127.0.0.1:0",
                "--secret-file",
                str(key_file),
                "--state-dir",
                str(corrupt),
            ],
            "corrupt lease records",
        ),
        (
            ["--listen", "198.51.100.7:7710", "--secret-file", str(key_file), *state],
            "cannot listen",
        ),
    ]
    for args, message in cases:
        result = witness_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_key_files(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    generate_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}\n", path.read_text())
    key = load_key(path)
    assert len(key) == 32 and key.hex() == path.read_text().strip()
    with pytest.raises(KeyFileError, match="exists; remove it or choose another name"):
        generate_key_file(path)
    assert load_key(path) == key
    with pytest.raises(KeyFileError, match="does not exist"):
        generate_key_file(tmp_path / "missing" / "k")
    with pytest.raises(KeyFileError, match="no such key file; create one with `tandemctl keygen"):
        load_key(tmp_path / "nope")
    with pytest.raises(KeyFileError, match="is a directory"):
        load_key(tmp_path)
    for content in (b"", b"abc\n", b"zz" * 32, b"\xff" * 64, (b"ab" * 33) + b"\n"):
        (tmp_path / "bad").write_bytes(content)
        with pytest.raises(KeyFileError, match="not a cluster key"):
            load_key(tmp_path / "bad")
    if os.geteuid() != 0:
        path.chmod(0)
        with pytest.raises(KeyFileError, match="permission denied"):
            load_key(path)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)


def test_log_lines_are_one_line_key_values(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    setup_logging("agent", "node1")
    setup_logging("agent", "node1")  # idempotent: one handler, one line per record
    logger = logging.getLogger("agent.test")
    log_event(logger, 'peer "lost"\nagain', module="web", event="transition", lag_ms=12)
    log_event(logger, "quiet", level=logging.DEBUG)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(
        r'ts=\S+Z level=INFO component=agent node=node1 module=web msg="peer \\"lost\\"\\nagain" '
        r"event=transition lag_ms=12 logger=agent.test",
        lines[0],
    ), lines[0]


def test_the_client_ignores_forged_and_stale_replies(key_file: Path) -> None:
    key = load_key(key_file)
    fake = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fake.bind(("127.0.0.1", 0))
    fake.settimeout(DEADLINE)

    async def scenario() -> None:
        c = WitnessClient("127.0.0.1", fake.getsockname()[1], key, "shop", "node1", 77)
        await c.start()
        try:
            pending = asyncio.create_task(c.request([LeaseItem("web", "acquire")], 1.5, 30.0))
            data, addr = await asyncio.to_thread(fake.recvfrom, 65536)
            request = decode(key, data)
            assert isinstance(request, LeaseRequest)
            assert (request.node, request.incarnation, request.items) == (
                "node1",
                77,
                (LeaseItem("web", "acquire"),),
            )

            def reply(seq: int, node: str = "node1", signer: bytes = key) -> bytes:
                verdict = Verdict("web", True, node, 1.5, "lease granted for 1.5 s")
                return encode(signer, LeaseReply("shop", node, 77, seq, (verdict,)))

            fake.sendto(reply(request.seq, signer=os.urandom(32)), addr)
            fake.sendto(reply(request.seq + 100), addr)
            fake.sendto(reply(request.seq, node="node2"), addr)
            fake.sendto(b"junk", addr)
            fake.sendto(reply(request.seq), addr)
            verdicts = await pending
            assert verdicts is not None and verdicts["web"].granted
            assert (c.stats.forged, c.stats.stale, c.stats.malformed) == (1, 2, 1)
            assert c.stats.replies == 1
        finally:
            c.close()

    try:
        run(scenario)
    finally:
        fake.close()


def test_a_restarted_witness_still_knows_whose_data_is_newest(
    witness: WitnessProcess, key_file: Path
) -> None:
    key = load_key(key_file)

    async def scenario() -> None:
        witness.start()
        port = await witness.ready()
        node1 = await client(port, key, "node1")
        node2 = await client(port, key, "node2")
        try:
            await acquire_when_free(node1, 0.3)
            verdicts = await node1.request([LeaseItem("web", "renew", 0xA1)], 0.3, timeout=2.0)
            assert verdicts is not None and verdicts["web"].generation == 0xA1
            assert witness.terminate() == 0
            witness.start(port)
            await witness.ready()
            behind = await node2.request([LeaseItem("web", "acquire", 0xB0)], 0.3, timeout=2.0)
            assert behind is not None
            assert not behind["web"].granted and "data outdated" in behind["web"].reason
            # With node1's data, node2 is let in once node1's restored lease has run out.
            deadline = time.monotonic() + DEADLINE
            while True:
                caught_up = await node2.request(
                    [LeaseItem("web", "acquire", 0xA1)], 0.3, timeout=2.0
                )
                assert caught_up is not None
                if caught_up["web"].granted or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert caught_up["web"].granted, caught_up["web"].reason
        finally:
            node1.close()
            node2.close()

    run(scenario)
