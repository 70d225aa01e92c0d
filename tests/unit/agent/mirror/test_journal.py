"""The ALONE journal and the activity log on real files: reopen, damage, bounds, threads."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.core import mirror_ops as mo
from agent.core.activity import ActivityKey, Kind
from agent.core.ranges import RangeSet
from agent.mirror.journal import ActivityLog, Journal

KIB4 = 4096


def _write(path: str, offset: int, size: int = KIB4, root: int = 0) -> mo.Write:
    return mo.Write(root, path, offset, b"x" * size)


def _session() -> list[mo.Op]:
    return [
        mo.Mkdir(0, "d", 0o755, 0, 0),
        mo.Create(0, "d/f", 0o644, 0, 0),
        _write("d/f", 0),
        _write("d/f", 8192),
        mo.Chmod(1, "g", 0o600),
        mo.Rename(0, "d", "e"),
        mo.Truncate(0, "e/f", 10_000),
        mo.Fsync(0, "e/f"),
    ]


def test_what_was_recorded_is_there_after_reopening(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.record(_session())
    plan = journal.plan()
    journal.close()
    again = Journal(tmp_path / "j")
    try:
        assert again.trusted and not again.overflowed and again.usable
        assert again.plan() == plan
        namespace, ranges, metadata = plan
        assert namespace[-1] == mo.Truncate(0, "e/f", 10_000)
        assert ranges == {(0, "e/f"): RangeSet([(0, 4096), (8192, 10_000)])}
        assert metadata == [(1, "g")]
    finally:
        again.close()


def test_a_torn_last_record_is_dropped_and_appending_goes_on(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.record([_write("a", 0)])
    journal.record([_write("b", 0)])
    journal.close()
    with open(tmp_path / "j", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "j") - 3)  # the crash cut the last append short
    journal = Journal(tmp_path / "j")
    assert journal.trusted
    assert set(journal.plan().ranges) == {(0, "a")}
    journal.record([_write("c", 0)])
    journal.close()
    journal = Journal(tmp_path / "j")
    assert journal.trusted
    assert set(journal.plan().ranges) == {(0, "a"), (0, "c")}
    journal.close()


def test_a_zero_filled_tail_is_a_torn_append(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.record([_write("a", 0)])
    journal.close()
    with open(tmp_path / "j", "ab") as f:
        f.write(bytes(100))
    journal = Journal(tmp_path / "j")
    assert journal.trusted and set(journal.plan().ranges) == {(0, "a")}
    journal.close()


@pytest.mark.parametrize("where", ["header", "payload"])
def test_a_damaged_record_in_the_middle_makes_the_journal_untrusted(
    tmp_path: Path, where: str
) -> None:
    journal = Journal(tmp_path / "j")
    for name in "abc":
        journal.record([_write(name, 0)])
    journal.close()
    raw = bytearray((tmp_path / "j").read_bytes())
    second = 16 + (len(raw) - 16) // 3  # the records have the same size
    raw[second + (1 if where == "header" else 20)] ^= 0x40
    (tmp_path / "j").write_bytes(bytes(raw))
    journal = Journal(tmp_path / "j")
    try:
        assert not journal.trusted and not journal.usable
        assert f"byte {second}" in journal.reason
        assert "compare every block" in journal.reason
        journal.record([_write("d", 0)])  # the full resync carries it: no error for the app
        journal.clear()
        assert journal.trusted and journal.state.empty
        journal.record([_write("e", 0)])
    finally:
        journal.close()
    journal = Journal(tmp_path / "j")
    assert journal.trusted and set(journal.plan().ranges) == {(0, "e")}
    journal.close()


def test_a_file_that_is_not_a_journal_is_not_trusted(tmp_path: Path) -> None:
    (tmp_path / "j").write_bytes(b"hello, this is not a journal at all")
    journal = Journal(tmp_path / "j")
    assert not journal.trusted
    assert "not a TNDJRNL file" in journal.reason
    journal.close()


def test_a_hot_range_costs_one_record_and_one_sync(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    try:
        journal.record([_write("db", 1 << 20)])
        size = journal.size_bytes
        for _ in range(10_000):
            journal.record([_write("db", 1 << 20)])
        assert journal.size_bytes == size == os.path.getsize(tmp_path / "j")
        assert journal.syncs == 1
    finally:
        journal.close()


def test_compaction_keeps_the_state_and_shrinks_the_file(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", compact_at=1 << 30)
    try:
        for i in range(500):
            journal.record([_write("log", i * KIB4)])  # adjacent: one range in the state
        journal.record([mo.Unlink(0, "gone"), _write("other", 0)])
        plan = journal.plan()
        before = journal.size_bytes
        journal.compact()
        assert journal.size_bytes < before / 50
        assert journal.plan() == plan
        journal.record([_write("late", 0)])
    finally:
        journal.close()
    reopened = Journal(tmp_path / "j")
    assert reopened.plan().ranges == {**plan.ranges, (0, "late"): RangeSet([(0, KIB4)])}
    reopened.close()
    assert not (tmp_path / "j.rewrite").exists()


def test_the_file_is_compacted_as_it_grows(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", compact_at=2048)
    try:
        for i in range(300):
            journal.record([_write("log", i * KIB4)])
            assert journal.size_bytes <= 2048
        assert list(journal.plan().ranges[(0, "log")]) == [(0, 300 * KIB4)]
    finally:
        journal.close()


def test_past_its_bound_the_journal_overflows_durably_and_stops_growing(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", max_bytes=8192)
    try:
        for i in range(400):
            journal.record([_write(f"file-{i}", 0)])
            assert os.path.getsize(tmp_path / "j") <= 8192
        assert journal.overflowed and not journal.usable and journal.trusted
        assert "8192" in journal.reason
        assert journal.state.empty  # its memory is freed: the resync is a full one anyway
    finally:
        journal.close()
    journal = Journal(tmp_path / "j", max_bytes=8192)
    try:
        assert journal.overflowed
        journal.clear()
        assert not journal.overflowed and journal.usable
    finally:
        journal.close()
    journal = Journal(tmp_path / "j", max_bytes=8192)
    assert not journal.overflowed
    journal.close()


def test_concurrent_callers_all_return_and_every_range_is_recorded(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    errors: list[BaseException] = []
    per_thread = 150

    def writer(n: int) -> None:
        try:
            for i in range(per_thread):
                journal.record([_write(f"t{n}", i * 2 * KIB4)])  # gaps: each is a new range
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert not errors and not any(t.is_alive() for t in threads)
        assert 1 <= journal.syncs <= 8 * per_thread
        expected = {(0, f"t{n}"): 150 for n in range(8)}
        assert {key: len(spans) for key, spans in journal.plan().ranges.items()} == expected
    finally:
        journal.close()
    reopened = Journal(tmp_path / "j")
    assert {k: len(v) for k, v in reopened.plan().ranges.items()} == expected
    reopened.close()


def test_appending_under_a_lock_then_waiting_outside_it_shares_syncs(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    try:
        first = journal.append([_write("a", 0)])
        second = journal.append([_write("b", 0)])
        hot = journal.append([_write("a", 0)])  # adds nothing, yet relies on the first record
        assert first < second == hot
        journal.wait_durable(hot)
        journal.wait_durable(first)
        assert journal.syncs == 1
    finally:
        journal.close()


def test_a_closed_journal_refuses_to_record(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.close()
    with pytest.raises(OSError, match="closed"):
        journal.record([_write("a", 0)])


def test_a_bound_too_small_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 4096"):
        Journal(tmp_path / "j", max_bytes=100)


# --- the activity log ---------------------------------------------------------------------


def _extent(path: str, index: int) -> ActivityKey:
    return (Kind.EXTENT, 0, path, index)


def _pinned(log: ActivityLog, ticket: int, *keys: ActivityKey, acked: int = 0) -> None:
    log.pin(list(keys), acked)
    log.settle(ticket)


def test_pinning_a_hot_key_again_costs_nothing(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "al", extent_size=1 << 20, slots=4)
    try:
        _pinned(log, 1, _extent("db", 0))
        size = os.path.getsize(tmp_path / "al")
        _pinned(log, 2, _extent("db", 0))
        log.pin([], 0)
        assert log.syncs == 1
        assert os.path.getsize(tmp_path / "al") == size
        assert log.hot() == [_extent("db", 0)]
    finally:
        log.close()


def test_after_a_crash_the_hot_keys_are_known(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "al", extent_size=1 << 20, slots=8)
    keys = [_extent("a", 0), _extent("a", 1), (Kind.NAME, 1, "b/c", 0), (Kind.META, 0, "é", 0)]
    _pinned(log, 1, *keys)
    log.close()  # as a crash leaves it: nothing more is written at close
    loaded = ActivityLog.load(tmp_path / "al", extent_size=4 << 20)
    try:
        assert loaded.usable
        assert loaded.extent_size == 1 << 20  # the file's own extent size counts
        assert loaded.hot() == keys
        loaded.settled(acked=0)  # keys from a crash carry no ticket: all of them leave
        assert loaded.hot() == []
    finally:
        loaded.close()
    empty = ActivityLog.load(tmp_path / "al")
    assert empty.hot() == [] and empty.usable
    empty.close()


def test_a_key_leaves_the_set_only_once_the_peer_acknowledged_it(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "al", extent_size=4096, slots=2)
    _pinned(log, 1, _extent("f", 0))
    _pinned(log, 2, _extent("f", 1))
    _pinned(log, 3, _extent("f", 0))  # extent 0 is the most recent now
    _pinned(log, 4, _extent("f", 2), acked=2)  # extent 1 (ticket 2) was acknowledged
    assert log.hot() == [_extent("f", 0), _extent("f", 2)]
    _pinned(log, 5, _extent("f", 3), acked=2)  # nothing acknowledged: the set grows
    _pinned(log, 6, _extent("f", 4), acked=2)
    assert len(log.hot()) == 4
    log.pin([_extent("f", 5)], acked=6)  # its operation has no ticket yet: never evicted
    _pinned(log, 7, _extent("f", 6), acked=6)
    assert log.hot() == [_extent("f", 5), _extent("f", 6)]
    log.close()
    reloaded = ActivityLog.load(tmp_path / "al", extent_size=4096, slots=2)
    assert reloaded.hot() == [_extent("f", 5), _extent("f", 6)]
    reloaded.close()


def test_writes_made_alone_leave_the_log_unusable_until_settled(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "al", extent_size=4096)
    _pinned(log, 1, _extent("f", 0))
    _pinned(log, 2, _extent("g", 0))
    log.mark_alone()
    log.close()
    loaded = ActivityLog.load(tmp_path / "al", extent_size=4096)
    try:
        assert loaded.trusted and not loaded.usable
        _pinned(loaded, 3, _extent("h", 0))
        loaded.settled(acked=2)  # a resync ended; ticket 3 is still in flight
        assert loaded.usable and loaded.hot() == [_extent("h", 0)]
    finally:
        loaded.close()
    again = ActivityLog.load(tmp_path / "al", extent_size=4096)
    assert again.usable and again.hot() == [_extent("h", 0)]
    again.close()


def test_the_activity_log_file_stays_small(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "al", extent_size=4096, slots=4)
    try:
        for i in range(300):
            _pinned(log, i + 1, _extent("f", i), acked=i)
            assert os.path.getsize(tmp_path / "al") <= 8192
        assert [k[3] for k in log.hot()] == list(range(296, 300))
    finally:
        log.close()
    reloaded = ActivityLog.load(tmp_path / "al", extent_size=4096, slots=4)
    assert len(reloaded.hot()) == 4
    reloaded.close()


def test_a_torn_activity_record_is_dropped(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "al", extent_size=4096)
    _pinned(log, 1, _extent("f", 0))
    _pinned(log, 2, _extent("g", 0))
    log.close()
    with open(tmp_path / "al", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "al") - 2)
    loaded = ActivityLog.load(tmp_path / "al", extent_size=4096)
    assert loaded.usable and loaded.hot() == [_extent("f", 0)]
    loaded.close()


def test_bad_activity_log_settings_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        ActivityLog(tmp_path / "al", slots=0)


def test_every_record_that_returned_survives_a_kill_9(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _RECORDER, str(tmp_path / "j")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[4],  # the repository: `agent` imports from there
    )
    returned: list[int] = []
    try:
        assert child.stdout is not None
        while len(returned) < 300:
            line = child.stdout.readline()
            assert line, "the recording process ended early"
            returned.append(int(line))
        child.kill()
    finally:
        child.kill()
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
    journal = Journal(tmp_path / "j")
    try:
        assert journal.trusted
        ranges = journal.plan().ranges
        assert all((0, f"f{i}") in ranges for i in returned)
    finally:
        journal.close()


_RECORDER = """
import sys
from pathlib import Path
from agent.core.mirror_ops import Write
from agent.mirror.journal import Journal
journal = Journal(Path(sys.argv[1]))
i = 0
while True:
    journal.record([Write(0, f"f{i}", 0, b"x" * 4096)])
    print(i, flush=True)
    i += 1
"""


def test_a_begun_resync_is_remembered_until_the_journal_is_cleared(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", compact_at=4096)
    journal.record([_write("a", 0)])
    assert not journal.resyncing
    journal.begin_resync()
    for n in range(200):  # compacted meanwhile: the flag is in the rewritten header too
        journal.record([_write("b", n * 2 * KIB4)])
    journal.close()
    again = Journal(tmp_path / "j")
    try:
        assert again.resyncing and again.usable
        assert {(0, "a"), (0, "b")} <= again.names()
        again.clear()
        assert not again.resyncing
    finally:
        again.close()
    reopened = Journal(tmp_path / "j")
    assert not reopened.resyncing
    reopened.close()


def test_a_name_leaves_once_acknowledged_and_a_step_settles_with_its_last_ticket(
    tmp_path: Path,
) -> None:
    log = ActivityLog(tmp_path / "al", extent_size=4096, slots=64)
    try:
        name = (Kind.NAME, 0, "new", 0)
        _pinned(log, 1, name)
        _pinned(log, 2, _extent("f", 0), acked=0)
        assert name in log.hot()  # not acknowledged yet
        _pinned(log, 3, _extent("f", 1), acked=1)
        assert name not in log.hot()  # acknowledged: gone with the next record
        # One step enqueues several operations (a write cut into frames): the key stays until
        # the last of them is acknowledged.
        log.pin([_extent("g", 0)], acked=3)
        log.settle(4)
        log.settle(5)
        for index in range(70):
            _pinned(log, 6 + index, _extent("h", index), acked=4)
        assert _extent("g", 0) in log.hot()
    finally:
        log.close()


def test_a_log_that_cannot_record_removes_itself(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "al", extent_size=4096)
    _pinned(log, 1, _extent("f", 0))
    os.close(log._fd)  # the disk fails under it
    log._fd = os.open(os.devnull, os.O_RDONLY)
    _pinned(log, 2, _extent("g", 0))
    assert not log.usable and not (tmp_path / "al").exists()
    log.close()
