"""The secondary's end of the stream: apply each operation in order, then acknowledge.

An ack says "the first n frames of this session are applied" (made durable
first where the operation asked for it: the Applier fsyncs those). Acks are
cumulative and sent when the socket has nothing more to read, so a burst of
small writes costs one ack, and a lone write is acked at once. An operation
that cannot be applied (a full disk, a path escaping the directory) is never
acknowledged: the receiver sends the reason and closes, the primary journals
what is unacknowledged and goes on alone, and the event log names the file.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Callable, Sequence
from typing import Any

from agent.core import mirror_frames as mf
from agent.core.mirror_ops import OpError, decode_op
from agent.mirror.apply import Applier, ApplyError
from agent.mirror.link import LinkClosed, Stream
from agent.mirror.manifest import encode_chunks, range_digests, scan

ACK_EVERY = 64
MAX_HASHED_SPAN = 8 << 20  # bytes of one file hashed per request: live ops wait meanwhile


class Receiver:
    """Runs one session: `run()` returns when the stream ends, with the reason."""

    def __init__(
        self,
        stream: Stream,
        applier: Applier,
        root_fds: Sequence[int],
        on_event: Callable[[dict[str, Any]], None],
        excluded: Sequence[Callable[[str, bool], bool] | None],
        quarantine: Callable[[int, list[str]], None] | None = None,
        activity: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.stream = stream
        self.applier = applier
        self.root_fds = list(root_fds)
        self.excluded = list(excluded)
        self._on_event = on_event
        self._quarantine = quarantine
        self._activity = activity or _no_activity
        self.applied = 0
        self.applied_bytes = 0
        self.resyncing = False
        self.skipped = 0
        self._stopped = threading.Event()

    def stop(self) -> None:
        """End the session: nothing more is applied, even frames already received (a newer
        stream replaces this one, or the node is promoted)."""
        self._stopped.set()
        self.stream.close()

    def run(self) -> str:
        processed = 0
        unacked = 0
        try:
            while True:
                header, payload = self.stream.receive()
                if self._stopped.is_set():
                    return "stopped"
                if header.kind is mf.FrameKind.OP:
                    op = decode_op(payload, borrow=True)  # applied before the next receive
                    try:
                        self.applier.apply(op)
                    except ApplyError as exc:
                        # During a resync a live operation may reach a path the resync has
                        # not made yet; the source compares every path live operations
                        # touched once its pass is done, so skipping here loses nothing.
                        if not (self.resyncing and exc.errno in (errno.ENOENT, errno.ENOTDIR)):
                            raise
                        self.skipped += 1
                    self.applied += 1
                elif header.kind is mf.FrameKind.CONTROL:
                    message = mf.decode_json(payload)
                    if message.get("type") == "activity":
                        # Asked before the session's operations; not one of them (not acked).
                        self.stream.send_json(mf.FrameKind.CONTROL, self._activity())
                        continue
                    self._control(message)
                else:
                    raise mf.StreamError(f"unexpected {header.kind.name} frame from the primary")
                processed += 1
                unacked += 1
                if unacked >= ACK_EVERY or not self.stream.pending():
                    self.stream.send_json(mf.FrameKind.ACK, {"n": processed})
                    unacked = 0
        except ApplyError as exc:
            self._refuse(f"cannot apply: {exc}")
            self._on_event({"event": "apply_failed", "reason": str(exc)})
            return f"cannot apply: {exc}"
        except (mf.StreamError, OpError) as exc:
            self._refuse(f"bad frame: {exc}")
            self._on_event({"event": "bad_frame", "reason": str(exc)})
            return f"bad frame: {exc}"
        except LinkClosed as exc:
            return str(exc)
        finally:
            self.stream.close()

    def _control(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "manifest":
            self._send_manifest(message)
        elif kind == "hashes":
            self._send_hashes(message)
        elif kind == "resync_begin":
            self.resyncing = True
            self.skipped = 0
        elif kind == "resync_strict":
            self.resyncing = False
        elif kind == "quarantine" and self._quarantine is not None:
            root, paths = message.get("root"), message.get("paths")
            if not (
                isinstance(root, int)
                and 0 <= root < len(self.root_fds)
                and isinstance(paths, list)
                and all(isinstance(p, str) for p in paths)
            ):
                raise mf.StreamError("malformed quarantine request")
            # In stream order, before the resync overwrites or removes any of them; a file
            # that cannot be kept stops the resync (nothing is discarded silently).
            try:
                self._quarantine(root, paths)
            except OSError as exc:
                raise ApplyError(str(exc), exc.errno) from None
        else:
            if kind == "resync_done":
                self.resyncing = False
            # resync_done: the agent's business (it adopts the primary's generations)
            self._on_event({"event": "control", **message})

    def _send_manifest(self, message: dict[str, Any]) -> None:
        root = int(message["root"])
        if not 0 <= root < len(self.root_fds):
            raise mf.StreamError(
                f"manifest asked for replicated directory {root}, which is not ours"
            )
        paths = message.get("paths")
        entries = scan(self.root_fds[root], self.excluded[root], paths=paths)
        for chunk in encode_chunks(entries):
            self.stream.send(mf.FrameKind.MANIFEST, chunk)
        self.stream.send(mf.FrameKind.MANIFEST, b"")

    def _send_hashes(self, message: dict[str, Any]) -> None:
        """Digests of one file's blocks in a byte range, so the source sends only those that
        differ (what a crashed primary's activity log names is mostly the same already)."""
        root, path = message.get("root"), message.get("path")
        start, end = message.get("start"), message.get("end")
        if not (
            isinstance(root, int)
            and 0 <= root < len(self.root_fds)
            and isinstance(path, str)
            and isinstance(start, int)
            and isinstance(end, int)
            and 0 <= start <= end
            and end - start <= MAX_HASHED_SPAN
        ):
            raise mf.StreamError("malformed hashes request")
        try:
            size, digests = range_digests(self.root_fds[root], path, start, end)
        except ValueError as exc:  # a path that would leave the directory
            raise mf.StreamError(f"hashes request: {exc}") from None
        except OSError:
            size, digests = -1, {}  # unreadable here: every block is sent
        reply = {
            "type": "hashes",
            "size": size,
            "digests": {str(index): digest.hex() for index, digest in digests.items()},
        }
        self.stream.send_json(mf.FrameKind.CONTROL, reply)

    def _refuse(self, reason: str) -> None:
        with contextlib.suppress(LinkClosed):
            self.stream.send_json(mf.FrameKind.ERROR, {"reason": reason})


def _no_activity() -> dict[str, Any]:
    return {"type": "activity", "usable": False, "reason": "this node keeps no activity log"}
