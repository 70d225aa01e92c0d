"""The primary's replicator: orders operations onto the stream, waits for acks as the mode says.

States: CONNECTED (ops stream to the secondary), HELD (the link was lost or an
ack is overdue; applications' waits are held until the agent decides), ALONE
(every op is journalled durably instead; the held ops first), DOWN (the node
steps down: held and future waits fail with EIO, so nothing unmirrored is ever
acknowledged). The agent drives HELD → ALONE or DOWN through the mirror
process's control channel; the replicator never promotes itself to ALONE,
because only the agent knows whether the witness still lets it serve.

Which thread sends and which receives is decided in agent.core.stream_roles: in sync mode
an application's writer sends its own op (any write FUSE passes) and receives its own ack.
"""

from __future__ import annotations

import contextlib
import errno
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from agent.core import mirror_frames as mf
from agent.core.activity import activity_keys
from agent.core.mirror_ops import (
    Buffer,
    Op,
    Rename,
    Write,
    durable,
    encode_op_parts,
    paths_of,
    payload_bytes,
)
from agent.core.stream_roles import (
    COALESCE_SECONDS,
    SELF_READ_GRACE,
    Mode,
    ack_thread_receives,
    batch_due,
    sends_itself,
    writer_receives,
)
from agent.mirror.journal import ActivityLog, Journal, JournalError
from agent.mirror.link import LinkClosed, Stream
from agent.mirror.replicator import WaitPoint

STEPPED_DOWN = "the node stepped down; this write is not mirrored"
SEND_BATCH_BYTES = 4 << 20
SEND_BATCH_FRAMES = 512


class LinkState(StrEnum):
    CONNECTED = "connected"
    HELD = "held"
    ALONE = "alone"
    DOWN = "down"


@dataclass
class Figures:
    """What status shows of replication (DESIGN.md: lag_ms, ack_latency_ms, pending_bytes...)."""

    lag_ms: float
    ack_latency_ms_p50: float
    ack_latency_ms_p99: float
    pending_bytes: int
    throughput_bps: float
    state: str


class _Latencies:
    """A window of recent ack latencies for p50/p99, cheap enough for the hot path."""

    def __init__(self, size: int = 2048) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self._values.append(seconds)

    def quantile(self, q: float) -> float:
        if not self._values:
            return 0.0
        ordered = sorted(self._values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0


class MirrorReplicator:
    """Implements the Replicator protocol of agent.mirror.replicator over one Stream."""

    def __init__(
        self,
        mode: Mode,
        journal: Journal,
        *,
        ack_timeout: float,
        on_event: Callable[[dict[str, Any]], None],
        async_max_bytes: int = 64 << 20,
        async_max_age: float = 5.0,
        flush_window_bytes: int = 256 << 20,
        activity: ActivityLog | None = None,
    ) -> None:
        self.mode: Mode = mode
        self.journal = journal
        self.activity = activity  # what a crash could leave here unknown to the peer
        self.ack_timeout = ack_timeout
        self._on_event = on_event
        self._max_pending = async_max_bytes if mode == "async" else flush_window_bytes
        self._max_age = async_max_age if mode == "async" else float("inf")
        self._order = threading.Lock()
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # acks, state changes: what waiters wait for
        self._send_ready = threading.Condition(lock)  # the sender's own: work to send
        self._seq = 0
        self._acked = 0
        self._unacked: OrderedDict[int, tuple[Op, float]] = OrderedDict()
        self._pending_bytes = 0
        self._outbox: deque[Op | dict[str, Any]] = deque()
        self._outbox_bytes = 0
        self._outbox_since = 0.0  # when the oldest op in the outbox was queued
        self._urgent = False  # someone waits for an op still in the outbox
        self._base = 0  # the ticket the current session started after
        self.incoming: queue.Queue[tuple[mf.FrameKind, bytes]] = queue.Queue()
        # Until the agent says where writes go (a stream, or the journal once the witness has
        # recorded the new generation), they wait.
        self._state = LinkState.HELD
        self._stream: Stream | None = None
        self._threads: list[threading.Thread] = []
        self._latencies = _Latencies()
        self._sent_payload = 0
        self._rate_mark = (time.monotonic(), 0)
        self._throughput = 0.0
        self.reason = "waiting for the agent: mirror to the peer or journal"
        self._ack_deadline = ack_timeout
        # An incremental resync sends dirty ranges by name: a rename while it runs may move
        # a file it has not sent yet, so the resync then finishes with a pass by hashes.
        self.resync_active = False
        self.renamed_during_resync = False
        self.touched: set[tuple[int, str]] = set()  # paths live ops touched during a resync
        self._journal_ticket = 0
        self._last_ack_at = 0.0
        self._sending = 0  # batches being written to the socket right now
        self._wire = threading.Lock()  # held by whoever sends a batch: batches leave in order
        self._reading: Stream | None = None  # the stream a thread is receiving from right now
        self._self_readers = 0  # sync-mode writers waiting, who read their acks themselves
        self._quiet_since = 0.0  # when the last of them stopped waiting

    # --- the Replicator protocol -------------------------------------------------------------

    def ordered(self) -> AbstractContextManager[object]:
        return self._order

    def intend(self, op: Op, links: int = 1) -> None:
        """While the peer may lack what this copy holds (mirroring, or holding writes), the
        activity log pins what `op` may change before it changes here. Alone, the journal
        covers it; stepped down, nothing changes."""
        if (
            links > 1
            and self._state in (LinkState.ALONE, LinkState.HELD)
            and not self.journal.knows_names(op.root, op.path, links)
        ):
            # Its other names are not in the journal (they existed before): an incremental
            # resync would miss them once this name is gone. Hashes of everything will not.
            self.journal.distrust(
                f"{op.path} has {links} names and changed while the peer was away"
            )
        activity = self.activity
        if activity is not None and self._state in (LinkState.CONNECTED, LinkState.HELD):
            activity.pin(activity_keys(op, activity.extent_size), self._acked)

    def enqueue(self, op: Op, *, live: bool = True) -> int:
        """`live`: an application's operation (a resync's own are not `live`)."""
        if live and self.resync_active and self._state is LinkState.CONNECTED:
            # The journal keeps following the names while the resync runs (not durably: a
            # crash here means a full resync anyway), so that one interrupted now is resumed
            # over every name that may differ, a live rename's new name included. Written
            # before taking the lock the ack thread needs (ordered() keeps the order).
            with contextlib.suppress(JournalError):
                self.journal.append([op])
        with self._cond:
            self._seq += 1
            seq = self._seq
            if live and self.activity is not None:
                self.activity.settle(seq)
            if self._state is LinkState.ALONE:
                # Appended in order here; made durable in wait(), where concurrent writers
                # share one fdatasync instead of queueing behind each other's.
                self._journal_ticket = self.journal.append([op])
                self._acked = seq
                return seq
            if self._state is LinkState.DOWN:
                return seq
            if self.resync_active and live:
                if isinstance(op, Rename):
                    self.renamed_during_resync = True
                for path in paths_of(op):
                    self.touched.add((op.root, path))
                    parent = path.rpartition("/")[0]
                    if parent:
                        self.touched.add((op.root, parent))
            if self.mode != "sync" and isinstance(op, Write) and isinstance(op.data, memoryview):
                # Borrowed from the FUSE request, which ends before the op is sent in these
                # modes (in sync mode the request waits for the ack, so the view stays valid).
                op = Write(op.root, op.path, op.offset, bytes(op.data), op.sync)
            self._unacked[seq] = (op, time.monotonic())
            self._pending_bytes += payload_bytes(op)
            if self._state is not LinkState.CONNECTED:
                return seq
            # An fsync is waited for: it leaves at once, to run beside the local one.
            self._urgent = self._urgent or durable(op)
            stream = self._stream
            inline = stream is not None and sends_itself(
                self.mode, live, self._outbox_bytes + payload_bytes(op)
            )
            self._push(op, payload_bytes(op), wake=not inline)
        if inline and stream is not None:
            self._send_inline(stream)
        return seq

    def _send_inline(self, stream: Stream) -> None:
        """Send the outbox from the enqueuing thread: an op waited for at once leaves without
        waking the sender thread (the hand-off costs more than sending it here). If a batch is
        being sent, the sender thread takes it after that one, in order."""
        if self._wire.acquire(blocking=False):
            try:
                self._send_queued(stream)
            finally:
                self._wire.release()
        else:
            with self._cond:
                if self._outbox:
                    self._send_ready.notify()

    def enqueue_control(self, message: dict[str, Any]) -> int:
        """A control message in stream order (resync markers); its ticket can be waited on."""
        with self._cond:
            if self._state is not LinkState.CONNECTED:
                raise LinkClosed(self.reason)
            self._seq += 1
            self._urgent = True
            self._push(message, 0)
            return self._seq

    def _push(self, item: Op | dict[str, Any], size: int, wake: bool = True) -> None:
        """Queue for the sender (with the lock held), waking it only when the batch is due, so
        a burst of small writes leaves in one sendmsg. `wake` False: the caller sends the
        outbox itself."""
        first = not self._outbox
        self._outbox.append(item)
        self._outbox_bytes += size
        if first:
            self._outbox_since = time.monotonic()
        if wake and (first or self._due()):
            self._send_ready.notify()

    def _due(self) -> bool:
        """The queued ops leave now (lock held)."""
        return batch_due(
            self.mode, self._urgent, self._outbox_bytes, time.monotonic() - self._outbox_since
        )

    def _hurry(self) -> None:
        """Someone is about to wait for an ack (lock held): what is queued leaves now."""
        if self._outbox and not self._urgent:
            self._urgent = True
            self._send_ready.notify()

    def wait_acked(self, ticket: int) -> None:
        """Wait until the peer processed `ticket`; LinkClosed if the link is lost first."""
        with self._cond:
            self._hurry()
            while self._acked < ticket:
                if self._state is not LinkState.CONNECTED:
                    raise LinkClosed(self.reason)
                self._cond.wait(0.5)
                self._check_overdue()

    def wait(self, ticket: int, point: WaitPoint) -> None:
        if self._state is LinkState.ALONE:
            if self.mode == "sync" or point is not WaitPoint.WRITE:
                self.journal.wait_durable(self._journal_ticket)
            return
        if self.mode == "flush" and point is WaitPoint.WRITE:
            self._wait_for_room()
            return
        if self.mode == "async" and point is WaitPoint.WRITE:
            self._wait_for_room()
            return
        reads = writer_receives(self.mode)
        with self._cond:
            self._hurry()
            if reads:
                self._self_readers += 1
            try:
                while self._acked < ticket:
                    if self._state is LinkState.DOWN:
                        raise OSError(errno.EIO, STEPPED_DOWN)
                    stream = self._stream
                    if reads and stream is not None and self._reading is not stream:
                        # No one is receiving: this writer does, so the ack wakes it directly.
                        # A silent peer is caught by the ack thread's overdue check, which
                        # closes the stream and so ends this receive.
                        self._reading = stream
                        self._cond.release()
                        try:
                            self._read_frame(stream)
                        finally:
                            self._cond.acquire()
                        continue
                    self._cond.wait(0.5)
                    self._check_overdue()
            finally:
                if reads:
                    self._self_readers -= 1
                    if not self._self_readers:
                        self._quiet_since = time.monotonic()
                # Released without the peer's ack (alone, stepped down): the sender may still be
                # writing this op, whose data the FUSE request lends until it returns.
                while self._sending and self._state is not LinkState.CONNECTED:
                    self._cond.wait(0.5)

    def last_ticket(self) -> int:
        with self._cond:
            return self._seq

    def _wait_for_room(self) -> None:
        """flush/async: writes stream freely until the bound on what is not yet acknowledged."""
        with self._cond:
            while self._state in (LinkState.CONNECTED, LinkState.HELD) and (
                self._pending_bytes > self._max_pending or self._oldest_age() > self._max_age
            ):
                self._hurry()
                self._cond.wait(0.1)
                self._check_overdue()
            if self._state is LinkState.DOWN:
                raise OSError(errno.EIO, STEPPED_DOWN)

    def _oldest_age(self) -> float:
        if not self._unacked:
            return 0.0
        _, first = next(iter(self._unacked.values()))
        return time.monotonic() - first

    def _check_overdue(self) -> None:
        # Called with _cond held: acks that stop coming while the TCP link looks alive still
        # end the wait. Counted from the last ack (or the oldest op, if later): a long queue
        # draining over a slow link is progress, not a dead peer.
        if self._state is not LinkState.CONNECTED or not self._unacked or self._stream is None:
            return  # (no stream: go_alone or step_down is ending it)
        silent = min(self._oldest_age(), time.monotonic() - self._last_ack_at)
        if silent > self._ack_deadline:
            self._lost_locked(f"no acknowledgement from the peer for {self._ack_deadline:g} s")

    def wait_room(self, limit: int) -> None:
        """Resync flow control: wait while more than `limit` bytes are unacknowledged."""
        with self._cond:
            while self._state is LinkState.CONNECTED and self._pending_bytes > limit:
                self._hurry()
                self._cond.wait(0.5)
                self._check_overdue()
            if self._state is not LinkState.CONNECTED:
                raise LinkClosed(self.reason)

    # --- driven by the mirror process -----------------------------------------------------------

    def suspect(self, within: float | None) -> None:
        """Heartbeats are lost: an ack overdue by `within` seconds now ends the wait (None: back
        to ack_timeout)."""
        with self._cond:
            self._ack_deadline = (
                self.ack_timeout if within is None else min(within, self.ack_timeout)
            )
            self._cond.notify_all()

    def take_touched(self) -> set[tuple[int, str]]:
        with self._cond:
            touched, self.touched = self.touched, set()
            return touched

    def holds_ops(self) -> bool:
        with self._cond:
            return bool(self._unacked) and self._state is LinkState.HELD

    def absorb_held(self) -> None:
        """Journal the ops held while no stream was attached (call under ordered())."""
        with self._cond:
            held = [op for op, _ in self._unacked.values()]
            if held:
                self.journal.record(held)
            self._unacked.clear()
            self._pending_bytes = 0
            self._acked = self._seq
            self._cond.notify_all()

    def attach(self, stream: Stream) -> None:
        """Start streaming: everything enqueued from now on goes to the peer (call under
        ordered())."""
        self._journal_settled()
        with self._cond:
            self._stream = stream
            self._state = LinkState.CONNECTED
            self.reason = f"mirroring to {stream.peer}"
            self._acked = self._seq
            self._base = self._seq
            self._last_ack_at = time.monotonic()
            self.incoming = queue.Queue()
        sender = threading.Thread(target=self._send_loop, args=(stream,), daemon=True)
        acker = threading.Thread(target=self._ack_loop, args=(stream,), daemon=True)
        self._threads = [sender, acker]
        sender.start()
        acker.start()

    def go_alone(self, reason: str) -> None:
        """The agent serves without the peer: journal every held op, then release their waits."""
        self._end_stream()
        with self._order:
            if self.activity is not None:
                self.activity.mark_alone()  # before any write is made without it
            self._go_alone(reason)

    def _end_stream(self) -> None:
        """Close the stream before taking ordered(): a sync writer sending its own op holds
        that lock, and a peer that stopped reading would keep it blocked there. Both callers
        drop the stream anyway; the writer's send fails and its op is journalled or failed
        with the others."""
        with self._cond:
            self._drop_stream()

    def _go_alone(self, reason: str) -> None:
        with self._cond:
            held = [op for op, _ in self._unacked.values()]
            if held:
                self.journal.record(held)
            self._unacked.clear()
            self._clear_outbox()
            self._pending_bytes = 0
            self._acked = self._seq
            self._state = LinkState.ALONE
            self.reason = reason
            self._drop_stream()
            self._cond.notify_all()

    def step_down(self, reason: str) -> None:
        """The agent must not serve: held waits fail, nothing unmirrored is acknowledged."""
        self._end_stream()
        with self._order:
            if self.activity is not None:
                # Changes still made here (they fail only when waited for) are not pinned.
                self.activity.mark_alone()
            self._journal_settled()
            self._step_down(reason)

    def _journal_settled(self) -> None:
        """Leaving ALONE (ordered() held, so nothing is being journalled): a write journalled
        whose waiter has not looked at the state yet will see another state and not wait for
        its record, so every record is made durable first. A journal that cannot is untrusted
        from then on, and a full resync carries those writes."""
        if self._state is LinkState.ALONE:
            with contextlib.suppress(OSError):
                self.journal.wait_durable(self._journal_ticket)

    def _step_down(self, reason: str) -> None:
        with self._cond:
            self._state = LinkState.DOWN
            self.reason = reason
            self._clear_outbox()
            self._drop_stream()
            self._cond.notify_all()

    @property
    def state(self) -> LinkState:
        return self._state

    def figures(self) -> Figures:
        with self._cond:
            now = time.monotonic()
            mark_time, mark_bytes = self._rate_mark
            if now - mark_time >= 1.0:
                self._throughput = (self._sent_payload - mark_bytes) / (now - mark_time)
                self._rate_mark = (now, self._sent_payload)
            return Figures(
                lag_ms=self._oldest_age() * 1000.0,
                ack_latency_ms_p50=self._latencies.quantile(0.5),
                ack_latency_ms_p99=self._latencies.quantile(0.99),
                pending_bytes=self._pending_bytes,
                throughput_bps=self._throughput,
                state=self._state.value,
            )

    # --- threads ----------------------------------------------------------------------------

    def _send_loop(self, stream: Stream) -> None:
        while True:
            with self._cond:
                while self._stream is stream:
                    if self._outbox:
                        if self._due():
                            break
                        self._send_ready.wait(
                            COALESCE_SECONDS - (time.monotonic() - self._outbox_since)
                        )
                    else:
                        self._send_ready.wait(0.5)
                        self._check_overdue()
                if self._stream is not stream:
                    return
            with self._wire:
                if not self._send_queued(stream):
                    return

    def _send_queued(self, stream: Stream) -> bool:
        """Send what the outbox holds, in one sendmsg up to a bound (the caller holds _wire,
        so batches leave in order); False once `stream` is no longer the one in use."""
        with self._cond:
            if self._stream is not stream:
                return False
            if not self._outbox:
                return True  # an enqueuing thread sent it already
            # A burst of small writes costs one system call and one wake-up, not one each.
            batch: list[tuple[mf.FrameKind, Sequence[Buffer]]] = []
            size = 0
            while self._outbox and size < SEND_BATCH_BYTES and len(batch) < SEND_BATCH_FRAMES:
                item = self._outbox.popleft()
                if isinstance(item, dict):
                    batch.append((mf.FrameKind.CONTROL, [mf.encode_json(item)]))
                else:
                    batch.append((mf.FrameKind.OP, encode_op_parts(item)))
                    size += payload_bytes(item)
            self._outbox_bytes -= size
            if not self._outbox:
                self._urgent = False
            self._sending += 1
        try:
            stream.send_frames(batch)
        except (LinkClosed, ValueError) as exc:  # ValueError: a frame over the size limit
            self._lost(stream, str(exc))
            return False
        finally:
            with self._cond:
                self._sending -= 1
                self._sent_payload += size
                if self._state is not LinkState.CONNECTED:
                    # Only a waiter released without its ack waits for this (see wait());
                    # waking every writer after each send would cost each a wake-up.
                    self._cond.notify_all()
        return True

    def _ack_loop(self, stream: Stream) -> None:
        """Receives what no writer is waiting to receive itself: acks in flush and async modes,
        answers to control messages, and an idle stream's end."""
        while True:
            with self._cond:
                while self._stream is stream and not self._ack_thread_reads(stream):
                    self._cond.wait(SELF_READ_GRACE)
                    # A writer reading its own ack waits in receive() without a timeout, and
                    # the sender thread may be blocked sending: acks overdue are caught here.
                    self._check_overdue()
                if self._stream is not stream:
                    return
                self._reading = stream
            if not self._read_frame(stream):
                return

    def _ack_thread_reads(self, stream: Stream) -> bool:
        """Whether the ack thread receives the next frame (lock held)."""
        return ack_thread_receives(
            self.mode,
            self.resync_active,
            self._reading is stream,
            self._self_readers,
            time.monotonic() - self._quiet_since,
        )

    def _read_frame(self, stream: Stream) -> bool:
        """Receive and handle one frame; the caller took the reading role, given back here.
        False once the stream is lost."""
        try:
            header, payload = stream.receive()
            if header.kind in (mf.FrameKind.CONTROL, mf.FrameKind.MANIFEST):
                with self._cond:
                    if self._stream is stream:  # not into a newer session's queue
                        self.incoming.put((header.kind, bytes(payload)))
                return True
            body = mf.decode_json(payload)
            if header.kind is mf.FrameKind.ERROR:
                self._lost(stream, f"the peer refused an operation: {body.get('reason', '?')}")
                return False
            self._acknowledge(stream, int(body["n"]))
            return True
        except (LinkClosed, mf.StreamError, KeyError, ValueError, TypeError) as exc:
            # TypeError: an ack whose count is not a number; read by a writer, it must end
            # the stream, not the application's request.
            self._lost(stream, str(exc))
            return False
        finally:
            with self._cond:
                if self._reading is stream:
                    self._reading = None
                if self._self_readers:
                    self._cond.notify_all()  # one of them receives next

    def _acknowledge(self, stream: Stream, n: int) -> None:
        """The peer applied the first `n` ops `stream` carried (an ack read from a stream
        already replaced says nothing of the new one's ops)."""
        now = time.monotonic()
        with self._cond:
            if self._stream is not stream:
                return
            seq = self._base + n
            self._last_ack_at = now
            while self._unacked:
                first = next(iter(self._unacked))
                if first > seq:
                    break
                op, sent_at = self._unacked.pop(first)
                self._pending_bytes -= payload_bytes(op)
                self._latencies.add(now - sent_at)
            self._acked = max(self._acked, seq)
            self._cond.notify_all()

    def abandon(self, reason: str) -> None:
        """Drop the stream (the peer sent something unusable): the agent reconnects."""
        with self._cond:
            if self._state is LinkState.CONNECTED:
                self._lost_locked(reason)

    def _lost(self, stream: Stream, reason: str) -> None:
        with self._cond:
            if self._stream is stream:
                self._lost_locked(reason)

    def _lost_locked(self, reason: str) -> None:
        self._state = LinkState.HELD
        self._clear_outbox()
        self.reason = f"replication link lost: {reason}"
        self._drop_stream()
        self._cond.notify_all()
        self._on_event({"event": "link_lost", "reason": reason})

    def _clear_outbox(self) -> None:
        self._outbox.clear()
        self._outbox_bytes = 0
        self._urgent = False

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
            self._send_ready.notify_all()
