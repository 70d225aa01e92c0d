"""The primary's replicator over a real stream to a real receiver: what each mode waits for."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.core.mirror_ops import Create, Fsync, Write
from agent.core.stream_roles import sends_itself
from agent.mirror import link
from agent.mirror.apply import Applier
from agent.mirror.fs import MAX_WRITE
from agent.mirror.journal import Journal
from agent.mirror.receiver import Receiver
from agent.mirror.replicator import WaitPoint
from agent.mirror.sender import LinkState, MirrorReplicator
from tests.lab import wait_for

KEY = bytes(range(32))


@dataclass
class Pair:
    """A replicator streaming to a receiver that applies into `target` (loopback TCP)."""

    replicator: MirrorReplicator
    target: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    receiver_events: list[dict[str, Any]] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)  # clear: the receiver stalls


@contextlib.contextmanager
def start_pair(tmp_path: Path, mode: str, ack_timeout: float = 30.0) -> Iterator[Pair]:
    target = tmp_path / "target"
    target.mkdir()
    events: list[dict[str, Any]] = []
    journal = Journal(tmp_path / "web.journal")
    replicator = MirrorReplicator(
        mode,  # type: ignore[arg-type]
        journal,
        ack_timeout=ack_timeout,
        on_event=events.append,
        async_max_bytes=1 << 20,
        async_max_age=30.0,
    )
    pair = Pair(replicator, target, events)
    pair.gate.set()
    server = socket.create_server(("127.0.0.1", 0))
    root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)

    class GatedApplier(Applier):
        def apply(self, op: Any) -> None:
            pair.gate.wait(30)
            super().apply(op)

    applier = GatedApplier([root_fd])

    def serve() -> None:
        conn, _ = server.accept()
        hello = link.read_hello(conn, KEY)
        stream = link.accept(conn, hello, KEY, "node2")
        Receiver(stream, applier, [root_fd], pair.receiver_events.append, [None]).run()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = server.getsockname()[1]
    stream = link.connect("127.0.0.1", port, KEY, cluster="c", module="web", node="node1")
    replicator.attach(stream)
    try:
        yield pair
    finally:
        pair.gate.set()
        replicator.step_down("test over")
        thread.join(10)
        server.close()
        applier.close()
        os.close(root_fd)
        journal.close()


@pytest.fixture
def sync_pair(tmp_path: Path) -> Iterator[Pair]:
    with start_pair(tmp_path, "sync") as pair:
        yield pair


@pytest.fixture
def flush_pair(tmp_path: Path) -> Iterator[Pair]:
    with start_pair(tmp_path, "flush") as pair:
        yield pair


def write(pair: Pair, op: Any, point: WaitPoint = WaitPoint.WRITE) -> threading.Thread:
    """Enqueue and wait as the file system does, in a thread (the wait may block)."""

    def run() -> None:
        with pair.replicator.ordered():
            ticket = pair.replicator.enqueue(op)
        try:
            pair.replicator.wait(ticket, point)
        except OSError as exc:
            pair.events.append({"event": "app_error", "errno": exc.errno})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_sync_writer_sends_every_frame_of_the_largest_write_fuse_passes_itself() -> None:
    # A hand-off to the sender thread cost more than the local write it let overlap. Even with
    # all of the write's frames still queued (the sender thread busy), the writer sends them.
    assert sends_itself("sync", True, MAX_WRITE)


def test_sync_mode_returns_only_once_the_secondary_applied_the_write(sync_pair: Pair) -> None:
    write(sync_pair, Create(0, "f", 0o644, 0, 0)).join(10)
    sync_pair.gate.clear()  # the secondary stalls before applying
    waiting = write(sync_pair, Write(0, "f", 0, b"hello"))
    waiting.join(0.5)
    assert waiting.is_alive(), "a sync write must wait for the secondary"
    sync_pair.gate.set()
    waiting.join(10)
    assert not waiting.is_alive()
    assert (sync_pair.target / "f").read_bytes() == b"hello"


def test_flush_mode_streams_writes_and_waits_at_durability_points(flush_pair: Pair) -> None:
    write(flush_pair, Create(0, "f", 0o644, 0, 0)).join(10)
    flush_pair.gate.clear()
    streamed = write(flush_pair, Write(0, "f", 0, b"abc"))
    streamed.join(5)
    assert not streamed.is_alive(), "a flush-mode write streams without waiting"
    durable = write(flush_pair, Fsync(0, "f"), WaitPoint.DURABLE)
    durable.join(0.5)
    assert durable.is_alive(), "fsync waits for the secondary"
    flush_pair.gate.set()
    durable.join(10)
    assert (flush_pair.target / "f").read_bytes() == b"abc"


def test_held_writes_complete_once_the_primary_goes_alone_and_are_journalled(
    sync_pair: Pair,
) -> None:
    write(sync_pair, Create(0, "f", 0o644, 0, 0)).join(10)
    sync_pair.gate.clear()
    held = write(sync_pair, Write(0, "f", 0, b"x" * 4096))
    held.join(0.5)
    assert held.is_alive()
    sync_pair.replicator.go_alone("peer lost")
    held.join(10)
    assert not held.is_alive() and not [e for e in sync_pair.events if e["event"] == "app_error"]
    assert sync_pair.replicator.state is LinkState.ALONE
    plan = sync_pair.replicator.journal.plan()
    assert list(plan.ranges[(0, "f")]) == [(0, 4096)], "the held write is in the journal"


def test_held_writes_fail_with_eio_when_the_primary_steps_down(sync_pair: Pair) -> None:
    write(sync_pair, Create(0, "f", 0o644, 0, 0)).join(10)
    sync_pair.gate.clear()
    held = write(sync_pair, Write(0, "f", 0, b"never acknowledged"))
    held.join(0.5)
    assert held.is_alive(), "held: the secondary has not applied it"
    sync_pair.replicator.step_down("no witness lease")
    held.join(10)
    assert {"event": "app_error", "errno": errno.EIO} in sync_pair.events


def test_an_overdue_ack_holds_writes_and_tells_the_agent(tmp_path: Path) -> None:
    with start_pair(tmp_path, "sync", ack_timeout=0.5) as pair:
        write(pair, Create(0, "f", 0o644, 0, 0)).join(10)
        pair.gate.clear()
        held = write(pair, Write(0, "f", 0, b"late"))
        assert wait_for(
            lambda: any(
                e["event"] == "link_lost" and "acknowledgement" in e["reason"] for e in pair.events
            ),
            10,
        )
        assert held.is_alive(), "held until the agent decides"
        assert pair.replicator.state is LinkState.HELD
        pair.replicator.go_alone("ack timeout")
        held.join(10)
        assert not held.is_alive()


@pytest.mark.parametrize(("size", "count"), [(60 << 10, 300), (MAX_WRITE, 32)])
def test_going_alone_is_prompt_while_a_writer_is_blocked_sending_to_a_stalled_peer(
    sync_pair: Pair, size: int, count: int
) -> None:
    # In sync mode a writer sends its own op (small, or as large as FUSE passes) while it
    # holds the file system's order lock; once the stalled peer's socket buffers are full,
    # that send blocks. The agent's decision to go alone must not wait for the ack timeout
    # (30 s here) to free it.
    write(sync_pair, Create(0, "f", 0o644, 0, 0)).join(10)
    sync_pair.gate.clear()
    writers = [
        write(sync_pair, Write(0, "f", n * size, bytes([n % 251]) * size)) for n in range(count)
    ]
    assert not wait_for(lambda: not any(w.is_alive() for w in writers), 2), "held by the peer"
    decided = threading.Thread(target=sync_pair.replicator.go_alone, args=("peer lost",))
    decided.start()
    decided.join(10)
    assert not decided.is_alive(), "go_alone waited for a writer blocked on the stalled peer"
    for w in writers:
        w.join(10)
    assert not any(w.is_alive() for w in writers)
    assert not [e for e in sync_pair.events if e["event"] == "app_error"]
    plan = sync_pair.replicator.journal.plan()
    assert list(plan.ranges[(0, "f")]) == [(0, count * size)], "every held write is journalled"


def test_an_overdue_ack_is_caught_while_the_one_writer_reads_and_the_sender_is_blocked(
    tmp_path: Path,
) -> None:
    # One writer, its write (larger than FUSE passes) sent by the sender thread, which blocks
    # once the stalled peer's buffers are full; the writer itself waits in receive() for its
    # ack. Neither checks for an overdue ack, so the ack thread must, or the write hangs.
    with start_pair(tmp_path, "sync", ack_timeout=0.5) as pair:
        write(pair, Create(0, "f", 0o644, 0, 0)).join(10)
        pair.gate.clear()
        with pair.replicator.ordered():  # stalls the peer's receiver; no one waits for it
            pair.replicator.enqueue(Write(0, "f", 0, b"first"))
        held = write(pair, Write(0, "f", 0, b"z" * (16 << 20)))
        assert wait_for(
            lambda: any(
                e["event"] == "link_lost" and "acknowledgement" in e["reason"] for e in pair.events
            ),
            10,
        ), "the stalled peer was never noticed"
        assert pair.replicator.state is LinkState.HELD
        pair.replicator.go_alone("ack timeout")
        held.join(10)
        assert not held.is_alive()
        assert not [e for e in pair.events if e["event"] == "app_error"]
