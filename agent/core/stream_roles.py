"""Who sends and who receives on a primary's replication stream, and when. Pure: no I/O.

Every hand-off between threads costs a wake-up (50-130 µs on the virtual machines measured,
BENCHMARKS.md §10). In `sync` mode the application's writer waits for each op's ack right
after queueing it, so it sends its own op and receives its own ack: no thread stands between
it and the wire. A large write too: its local pwrite then runs while the peer applies the
last frames, and that overlap is worth less than the sender thread's wake-up (+11-14% for
sequential 1 MiB writes, BENCHMARKS.md §11). The sender thread sends the rest (a backlog
queued by others, such as a resync's ops; every op in `flush` and `async` mode, batched), and
the ack thread receives what no writer waits for.
"""

from __future__ import annotations

from typing import Literal

Mode = Literal["sync", "flush", "async"]

# flush and async modes: small writes wait this long (or until this much is queued, or an
# fsync/close waits) to leave together; sync mode sends each at once.
COALESCE_SECONDS = 0.002
COALESCE_BYTES = 256 << 10
# The most a writer sends itself, counting what is queued with its op (its write goes in frames,
# each sent as it is queued): above any one application write (FUSE passes at most 1 MiB), so
# a writer sends every frame of its own, and leaves a larger backlog (a resync's batches,
# queued by others) to the sender thread.
INLINE_SEND_BYTES = 2 << 20
# The ack thread leaves the stream to sync writers until none has waited for this long, so
# that an idle stream is still watched (its end, a peer's answer).
SELF_READ_GRACE = 0.02


def batch_due(mode: Mode, urgent: bool, queued_bytes: int, queued_for: float) -> bool:
    """Whether the queued ops leave now: in sync mode always; in flush and async mode once
    someone waits for them (`urgent`) or they are large or old enough."""
    return (
        mode == "sync" or urgent or queued_bytes >= COALESCE_BYTES or queued_for >= COALESCE_SECONDS
    )


def sends_itself(mode: Mode, live: bool, queued_bytes: int) -> bool:
    """Whether the thread that just queued an op sends the queue itself (`queued_bytes`
    includes the op): an application's writer in sync mode, unless a backlog is queued."""
    return live and mode == "sync" and queued_bytes <= INLINE_SEND_BYTES


def writer_receives(mode: Mode) -> bool:
    """Whether a writer waiting for its ack receives it from the stream itself."""
    return mode == "sync"


def ack_thread_receives(
    mode: Mode,
    resyncing: bool,
    someone_receiving: bool,
    writers_waiting: int,
    quiet_for: float,
) -> bool:
    """Whether the ack thread receives the next frame. Not while another thread does; always
    in flush and async mode (writers do not wait for each op there) and during a resync (its
    answers are waited for on a queue); in sync mode only once no writer has waited for
    SELF_READ_GRACE seconds (`quiet_for`)."""
    if someone_receiving:
        return False
    if not writer_receives(mode) or resyncing:
        return True
    return writers_waiting == 0 and quiet_for >= SELF_READ_GRACE
