"""Benchmark: what a resync sends, and how fast, after the peer was away.

A primary and a secondary mirror process (tests/mirror_pair.py) hold a 2 GiB file in sync.
Then the agent's `alone` drops the stream, the primary changes the file while alone, and a
reconnect resyncs:
- incremental, 1% changed in random 4 KiB blocks, then 1% changed in 1 MiB runs: bytes the
  primary sent (TCP payload of the replication connection, from `ss`) against bytes changed;
- full, nothing changed: bytes sent against the file's size (both sides hash by blocks);
- on the veth shaped to 1 Gbit/s (tbf), an incremental resync of a large rewrite: its rate
  against a plain TCP transfer on the same link, rounds interleaved;
- after a primary's crash with a write in flight (its secondary frozen, then both killed -9,
  roles swapped): the new primary changes 1% alone, and the resync back, helped by the
  crashed node's activity log, against a full comparison by hashes of the same data (what
  such a crash cost without the log), in the same run.
Sizes scale with TANDEM_BENCH_SCALE (default 1; 0.1 for a quick run); TANDEM_BENCH_ROUNDS
(default 3) rounds of the rate. Measures only; fails only if a copy ends up different.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.conftest import bench_rounds, median, met, ratio, report
from tests.mirror_pair import (
    MirrorPair,
    PairError,
    PeakRss,
    assert_same_copies,
    bench_scale,
    dd_write,
    fill,
    scatter,
)

pytestmark = [pytest.mark.timeout(5400), pytest.mark.usefixtures("quiet_host")]

try:
    SCALE = bench_scale()
except PairError as exc:
    raise pytest.UsageError(str(exc)) from None
ROUNDS = bench_rounds()
MIB = 1 << 20
FILE_BYTES = max(64, int(2048 * SCALE)) * MIB
RATE_MIB = max(32, int(1024 * SCALE))  # rewritten while alone, then resynced on the shaped link
CHANGED = 0.01


def seconds(done: dict[str, object]) -> float:
    connected = done["connected"]
    assert isinstance(connected, dict)
    return float(done["at"]) - float(connected["at"])  # type: ignore[arg-type]


def test_resync_bytes(tmp_path: Path) -> None:
    rows = []
    with MirrorPair(tmp_path / "pair", mode="sync") as pair:
        pair.connect("none")
        big = pair.primary_mount / "big"
        fill(pair.primary_pid, big, FILE_BYTES)
        assert_same_copies(pair, ["big"])
        for label, run, seed in (("random 4 KiB blocks", 4096, 1), ("1 MiB runs", MIB, 2)):
            pair.alone()
            changed = scatter(pair.primary_pid, big, FILE_BYTES, CHANGED, run, seed)
            done = pair.connect("incremental")
            sent, received = pair.stream_bytes()
            assert_same_copies(pair, ["big"])
            rows.append(
                [f"incremental, 1% changed in {label}", f"{changed / MIB:.1f} MiB changed",
                 f"{sent / MIB:.2f} MiB", ratio(sent, changed), f"{received / 1024:.0f} KiB",
                 f"{seconds(done):.2f} s", f"≤ 1.10× changed: {met(sent <= 1.1 * changed)}"]
            )  # fmt: skip
        pair.alone()
        done = pair.connect("full")
        sent, received = pair.stream_bytes()
        assert_same_copies(pair, ["big"])
        rows.append(
            ["full, nothing changed", f"{FILE_BYTES / MIB:.0f} MiB held", f"{sent / 1024:.1f} KiB",
             f"{sent / FILE_BYTES * 100:.4f}% of the data", f"{received / 1024:.0f} KiB",
             f"{seconds(done):.2f} s", f"≤ 1% of the data: {met(sent <= 0.01 * FILE_BYTES)}"]
        )  # fmt: skip
    report(
        f"Resync bytes, one {FILE_BYTES / MIB:.0f} MiB file, bare veth",
        ["resync", "baseline", "primary sent", "÷ baseline", "received (acks, hashes)",
         "connect → resync_done", "goal"],
        rows,
    )  # fmt: skip


def test_resync_rate_shaped(tmp_path: Path) -> None:
    raw: list[float] = []
    rates: list[float] = []
    by_bytes: list[float] = []
    peaks: list[int] = []
    claimed: list[float] = []
    with MirrorPair(tmp_path / "pair", mode="sync", shaped="1gbit") as pair:
        pair.connect("none")
        big = pair.primary_mount / "big"
        dd_write(pair.primary_pid, big, RATE_MIB)  # in sync: the peer has it too
        for _ in range(ROUNDS):
            raw.append(pair.tcp_rate(RATE_MIB * MIB))
            pair.alone()
            fill(pair.primary_pid, big, RATE_MIB * MIB)  # every byte differs now
            mark = pair.primary.mark() if pair.primary is not None else 0
            with PeakRss(pair.primary_pid) as rss:
                done = pair.connect("incremental")
            peaks.append(rss.peak_bytes)
            # What status showed as the resync's rate while it ran (its `resync` figures).
            shown = [f["resync"]["rate_bps"] for f in pair.figures(mark) if f.get("resync")]
            claimed.append(max(shown, default=0.0))
            took = seconds(done)
            sent, _ = pair.stream_bytes()
            rates.append(float(done["done_bytes"]) / took)
            by_bytes.append(sent / took)
        assert_same_copies(pair, ["big"])
    link, rate = median(raw), median(rates)
    report(
        f"Resync rate, {RATE_MIB} MiB rewritten while alone, veth shaped to 1 Gbit/s (tbf)",
        ["what", "median", "÷ link", "goal"],
        [
            ["plain TCP transfer (the link's rate)", f"{link / 1e6:.0f} MB/s", "1.00×", ""],
            ["incremental resync (file bytes / time)", f"{rate / 1e6:.0f} MB/s",
             ratio(rate, link), f"≥ 0.90× link: {met(rate >= 0.9 * link)}"],
            ["same, bytes on the wire / time", f"{median(by_bytes) / 1e6:.0f} MB/s",
             ratio(median(by_bytes), link), ""],
            ["rate status showed during the resync (highest `resync.rate_bps`)",
             f"{median(claimed) / 1e6:.0f} MB/s", ratio(median(claimed), link), ""],
            ["peak resident memory of the primary's mirror process during the resync",
             f"{median(peaks) / MIB:.0f} MiB", "", ""],
        ],
    )  # fmt: skip


def test_resync_after_a_primary_crash(tmp_path: Path) -> None:
    in_flight = MIB  # one FUSE request (max_write): the writer waits in it for the frozen peer
    with MirrorPair(tmp_path / "pair", mode="sync") as pair:
        assert pair.secondary is not None
        pair.connect("none")
        big = pair.primary_mount / "big"
        fill(pair.primary_pid, big, FILE_BYTES)
        pair.crash_with_write_in_flight("big", FILE_BYTES // 2, in_flight, swap=True)
        pair.alone()
        changed = scatter(pair.primary_pid, pair.primary_mount / "big", FILE_BYTES, CHANGED,
                          4096, 3)  # fmt: skip
        done = pair.connect("incremental", activity=True)
        sent, _ = pair.stream_bytes()
        assert_same_copies(pair, ["big"])
        pair.alone()
        full = pair.connect("full")  # the baseline: what the crash cost before the log
        full_sent, _ = pair.stream_bytes()
        assert_same_copies(pair, ["big"])
    took, full_took = seconds(done), seconds(full)
    report(
        f"Resync after a primary crash ({in_flight / MIB:.0f} MiB in flight), one "
        f"{FILE_BYTES / MIB:.0f} MiB file, 1% changed since by the new primary, bare veth",
        ["resync", "primary sent", "÷ changed + in flight", "connect → resync_done",
         "÷ full comparison"],
        [
            ["incremental, with the crashed node's activity log", f"{sent / MIB:.2f} MiB",
             ratio(sent, changed + in_flight), f"{took:.2f} s", ratio(took, full_took)],
            ["full comparison by hashes (baseline, nothing left to send)",
             f"{full_sent / MIB:.2f} MiB", "", f"{full_took:.2f} s", "1.00×"],
        ],
    )  # fmt: skip
