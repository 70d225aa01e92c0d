"""The secondary's receiver over a real socket pair: a stopped session applies nothing more."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

from agent.core import mirror_frames as mf
from agent.core.mirror_ops import Create, Op, Write, encode_op
from agent.mirror.apply import Applier
from agent.mirror.link import Stream
from agent.mirror.receiver import Receiver

KEY = bytes(range(32))


def test_a_stopped_session_applies_none_of_the_frames_it_already_received(
    tmp_path: Path,
) -> None:
    """A newer stream replaces a session thought dead: the old one's late frames, even those
    already in its buffer, must never be applied after the new session's resync."""
    (tmp_path / "f").write_bytes(b"resynced by the newer session")
    ours, theirs = socket.socketpair()
    root_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    applying, release = threading.Event(), threading.Event()
    applied: list[Op] = []

    class GatedApplier(Applier):
        def apply(self, op: Any) -> None:
            applied.append(op)
            applying.set()
            release.wait(10)
            super().apply(op)

    primary = Stream(ours, KEY, "node1")
    receiver = Receiver(Stream(theirs, KEY, "node1"), GatedApplier([root_fd]), [root_fd],
                        lambda _event: None, [None])  # fmt: skip
    try:
        frames: list[Op] = [
            Create(0, "g", 0o644, 0, 0),  # being applied when the newer stream arrives
            Create(0, "f", 0o644, 0, 0),  # late: would truncate the resynced file
            Write(0, "f", 0, b"x"),
        ]
        primary.send_frames([(mf.FrameKind.OP, [encode_op(op)]) for op in frames])
        result: list[str] = []
        thread = threading.Thread(target=lambda: result.append(receiver.run()), daemon=True)
        thread.start()
        assert applying.wait(10), "the receiver never applied the first frame"
        receiver.stop()
        release.set()
        thread.join(10)
        assert result == ["stopped"]
        assert applied == frames[:1]
        assert (tmp_path / "f").read_bytes() == b"resynced by the newer session"
    finally:
        primary.close()
        os.close(root_fd)
