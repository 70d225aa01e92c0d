"""Who sends and who receives on the primary's stream: every mode and flag, and each bound."""

from __future__ import annotations

import itertools

import pytest

from agent.core.stream_roles import (
    COALESCE_BYTES,
    COALESCE_SECONDS,
    INLINE_SEND_BYTES,
    SELF_READ_GRACE,
    Mode,
    ack_thread_receives,
    batch_due,
    sends_itself,
    writer_receives,
)

MODES: tuple[Mode, ...] = ("sync", "flush", "async")


@pytest.mark.parametrize("mode", MODES)
def test_only_a_sync_writer_receives_its_own_ack(mode: Mode) -> None:
    assert writer_receives(mode) is (mode == "sync")


@pytest.mark.parametrize(
    ("mode", "live", "queued"),
    list(itertools.product(MODES, (True, False), (1, INLINE_SEND_BYTES, INLINE_SEND_BYTES + 1))),
)
def test_a_writer_sends_itself_only_live_ops_in_sync_mode_up_to_the_bound(
    mode: Mode, live: bool, queued: int
) -> None:
    expected = mode == "sync" and live and queued <= INLINE_SEND_BYTES
    assert sends_itself(mode, live, queued) is expected


def test_a_backlog_others_queued_goes_to_the_sender_thread() -> None:
    assert not sends_itself("sync", True, 4 << 20)  # e.g. a resync's batch ahead of the op


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("urgent", [True, False])
@pytest.mark.parametrize("queued", [0, COALESCE_BYTES - 1, COALESCE_BYTES])
@pytest.mark.parametrize("age", [0.0, COALESCE_SECONDS / 2, COALESCE_SECONDS])
def test_a_batch_leaves_at_once_in_sync_mode_and_when_waited_for_large_or_old_otherwise(
    mode: Mode, urgent: bool, queued: int, age: float
) -> None:
    expected = mode == "sync" or urgent or queued >= COALESCE_BYTES or age >= COALESCE_SECONDS
    assert batch_due(mode, urgent, queued, age) is expected


def test_small_writes_in_flush_mode_wait_to_leave_together() -> None:
    assert not batch_due("flush", False, 4096, 0.0)
    assert not batch_due("async", False, 4096, 0.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("resyncing", [True, False])
@pytest.mark.parametrize("receiving", [True, False])
@pytest.mark.parametrize("waiting", [0, 1, 3])
@pytest.mark.parametrize("quiet", [0.0, SELF_READ_GRACE / 2, SELF_READ_GRACE, 5.0])
def test_the_ack_thread_receives_what_no_writer_waits_for(
    mode: Mode, resyncing: bool, receiving: bool, waiting: int, quiet: float
) -> None:
    got = ack_thread_receives(mode, resyncing, receiving, waiting, quiet)
    if receiving:
        assert not got, "two threads never receive from one stream at once"
    elif mode != "sync" or resyncing:
        assert got, "flush/async acks and resync answers are nobody's to wait for"
    else:
        assert got is (waiting == 0 and quiet >= SELF_READ_GRACE)


def test_between_two_sync_writes_the_stream_is_left_to_the_next_writer() -> None:
    # The last writer returned just now: the next one, due within microseconds, receives its
    # own ack; only a stream idle for the grace period goes back to the ack thread.
    assert not ack_thread_receives("sync", False, False, 0, 0.0)
    assert ack_thread_receives("sync", False, False, 0, SELF_READ_GRACE)
