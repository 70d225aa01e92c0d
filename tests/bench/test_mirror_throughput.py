"""Benchmark: what mirroring costs a writer, against a plain directory and FUSE alone.

Workloads, run by a writer inside the mount namespace that sees the mount: 1 MiB writes
overwriting a file then fdatasync (dd), 4 KiB random overwrites each with its fsync, and
4 KiB random overwrites with an fsync every 64. Where they write:
- plain: the directory itself;
- FUSE alone: MirrorFS with a LocalReplicator (the passthrough's own cost, no journal);
- ALONE: a primary mirror process with no peer (it journals what changed);
- sync / flush: a primary mirroring to a secondary across a bare veth pair (tests/mirror_pair.py).
Then the link shaped to 1 Gbit/s with tbf (against a plain TCP transfer on the same link), and
a delay proxy adding ~1 ms of round trip (flush against sync for small writes).

Rounds are interleaved (baselines and measurements alternate) and medians of
TANDEM_BENCH_ROUNDS (default 3) reported as ratios; sizes scale with TANDEM_BENCH_SCALE
(default 1; 0.1 for a quick run). Measures only: no assertion on time. A benchmark fails
only when the product misbehaves (a copy differs from its primary).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.bench.conftest import bench_rounds, median, met, ratio, report
from tests.mirror_pair import (
    FuseAlone,
    MirrorPair,
    PairError,
    SoloMirror,
    assert_same_copies,
    bench_scale,
    cpu_seconds,
    dd_write,
    small_writes,
)

pytestmark = [pytest.mark.timeout(5400), pytest.mark.usefixtures("quiet_host")]


def _setting(name: str, default: float, low: float, high: float, example: str) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise pytest.UsageError(
            f"{name}={raw!r}: give a number from {low:g} to {high:g}, {example}"
        )
    return value


try:
    SCALE = bench_scale()
except PairError as exc:
    raise pytest.UsageError(str(exc)) from None
ROUNDS = bench_rounds()
DELAY_MS = _setting("TANDEM_BENCH_DELAY_MS", 0.4, 0, 100, "e.g. TANDEM_BENCH_DELAY_MS=0.4")
SEQ_MIB = max(16, int(1024 * SCALE))
SMALL_FILE = 64 << 20
FSYNC_EACH = max(100, int(2000 * SCALE))
EVERY_64 = max(64, int(32768 * SCALE) // 64 * 64)
DELAYED_64 = max(256, int(4096 * SCALE) // 64 * 64)
MIB = 1 << 20


class Target:
    """Where a workload writes: a directory seen in the mount namespace of `pid`."""

    def __init__(
        self, name: str, directory: Path, pid: int | None, serving: tuple[int, ...] = ()
    ) -> None:
        self.name = name
        self.directory = directory
        self.pid = pid
        self.serving = serving  # the processes doing the work for the writer (their CPU)

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.serving)

    def seq(self) -> float:
        return dd_write(self.pid, self.directory / "big", SEQ_MIB)

    def small(self, count: int, every: int) -> dict[str, float]:
        return small_writes(self.pid, self.directory / "small", SMALL_FILE, count, every)

    def prepare(self) -> None:
        """Create both files once (untimed), so every round overwrites."""
        dd_write(self.pid, self.directory / "big", SEQ_MIB)
        dd_write(self.pid, self.directory / "small", SMALL_FILE // MIB)


def rotated(items: list[Target], by: int) -> list[Target]:
    """The order changes each round, so no target always runs first (or after the same one)."""
    k = by % len(items)
    return items[k:] + items[:k]


def fmt_rate(bps: float) -> str:
    return f"{bps / 1e6:.0f} MB/s"


@contextlib.contextmanager
def closing_all() -> Iterator[Callable[[object], None]]:
    """Close everything registered, in reverse, even when the benchmark fails."""
    closers: list[object] = []
    try:
        yield closers.append
    finally:
        errors = []
        for thing in reversed(closers):
            try:
                thing.close()  # type: ignore[attr-defined]
            except Exception as exc:
                errors.append(str(exc))
        if errors:
            raise PairError("; ".join(errors))


def test_mirror_throughput_bare_veth(tmp_path: Path) -> None:
    with closing_all() as closing:
        fuse = FuseAlone(tmp_path / "fuse")
        closing(fuse)
        solo = SoloMirror(tmp_path / "solo")
        closing(solo)
        pairs = {}
        for mode in ("sync", "flush"):
            pair = MirrorPair(tmp_path / mode, mode=mode)
            closing(pair)
            pair.connect("none")
            pairs[mode] = pair
        (tmp_path / "plain").mkdir()
        targets = [
            Target("plain directory", tmp_path / "plain", None),
            Target("FUSE alone (MirrorFS + LocalReplicator)", fuse.directory, fuse.pid,
                   (fuse.pid,)),
            Target("ALONE (mirror process journalling, no peer)", solo.directory, solo.pid,
                   (solo.pid,)),
        ]  # fmt: skip
        for mode, pair in pairs.items():
            assert pair.secondary is not None
            serving = (pair.primary_pid, pair.secondary.pid)
            targets.append(
                Target(f"mirrored, {mode}", pair.primary_mount, pair.primary_pid, serving)
            )
        for target in targets:
            target.prepare()
        seq: dict[str, list[float]] = {t.name: [] for t in targets}
        each: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
        every: dict[str, list[float]] = {t.name: [] for t in targets}
        cpu: dict[str, list[float]] = {t.name: [] for t in targets}
        rtts: list[float] = []
        for r in range(ROUNDS):
            rtts.append(pairs["sync"].rtt())
            for target in rotated(targets, r):
                seq[target.name].append(target.seq())
            for target in rotated(targets, r):
                each[target.name].append(target.small(FSYNC_EACH, 1))
            for target in rotated(targets, r):
                before = target.cpu()
                every[target.name].append(target.small(EVERY_64, 64)["ops_per_s"])
                cpu[target.name].append((target.cpu() - before) / EVERY_64)
        for pair in pairs.values():
            assert_same_copies(pair, ["big", "small"])

    plain, fuse_name = targets[0].name, targets[1].name
    rtt = median(rtts)
    base_seq, fuse_seq = median(seq[plain]), median(seq[fuse_name])
    rows = []
    for t in targets:
        value = median(seq[t.name])
        goal = ""
        if t.name.startswith("mirrored"):
            goal = f"≥ 0.50× FUSE alone: {met(value >= 0.5 * fuse_seq)}"
        rows.append([t.name, fmt_rate(value), ratio(value, base_seq), ratio(value, fuse_seq), goal])
    report(
        f"Sequential 1 MiB writes, {SEQ_MIB} MiB overwritten + fdatasync (dd), bare veth",
        ["where", "median", "÷ plain", "÷ FUSE alone", "goal"],
        rows,
    )

    plain_lat = median([x["p50_s"] for x in each[plain]])
    rows = []
    for t in targets:
        lat = median([x["p50_s"] for x in each[t.name]])
        p99 = median([x["p99_s"] for x in each[t.name]])
        ops = median([x["ops_per_s"] for x in each[t.name]])
        goal = ""
        if t.name.startswith("mirrored"):
            bound = plain_lat + rtt + 0.0003
            goal = f"≤ plain + RTT + 0.3 ms = {bound * 1e6:.0f} µs: {met(lat <= bound)}"
        rows.append(
            [t.name, f"{lat * 1e6:.0f} µs", f"{p99 * 1e6:.0f} µs", f"{ops:.0f}/s",
             f"+{(lat - plain_lat) * 1e6:.0f} µs", goal]
        )  # fmt: skip
    report(
        f"4 KiB random writes, each with its fsync ({FSYNC_EACH} writes); TCP ping-pong RTT "
        f"across the veth {rtt * 1e6:.0f} µs",
        ["where", "p50 write+fsync", "p99", "rate", "− plain", "goal"],
        rows,
    )

    base_64, fuse_64 = median(every[plain]), median(every[fuse_name])
    rows = [
        [t.name, f"{median(every[t.name]):.0f}/s", ratio(median(every[t.name]), base_64),
         ratio(median(every[t.name]), fuse_64),
         f"{median(cpu[t.name]) * 1e6:.0f} µs" if t.serving else ""]
        for t in targets
    ]  # fmt: skip
    report(
        f"4 KiB random writes, an fsync every 64 ({EVERY_64} writes), bare veth",
        ["where", "median", "÷ plain", "÷ FUSE alone", "CPU per write (primary + secondary)"],
        rows,
    )


def test_mirror_throughput_shaped_link(tmp_path: Path) -> None:
    """Both modes on a link shaped to 1 Gbit/s. In sync mode one writer has one write in flight:
    each write's own round trip through FUSE adds to its time on the wire; flush streams."""
    with (
        MirrorPair(tmp_path / "sync", mode="sync", shaped="1gbit") as sync,
        MirrorPair(tmp_path / "flush", mode="flush", shaped="1gbit") as flush,
    ):
        targets = []
        for pair in (sync, flush):
            pair.connect("none")
            target = Target(f"mirrored, {pair.mode}", pair.primary_mount, pair.primary_pid)
            target.prepare()
            targets.append(target)
        raw: list[float] = []
        stop_and_wait: list[float] = []
        mirrored: dict[str, list[float]] = {t.name: [] for t in targets}
        for r in range(ROUNDS):
            raw.append(sync.tcp_rate(SEQ_MIB * MIB))
            stop_and_wait.append(sync.tcp_rate(SEQ_MIB * MIB, reply_every=MIB))
            for target in rotated(targets, r):
                mirrored[target.name].append(target.seq())
        for pair in (sync, flush):
            assert_same_copies(pair, ["big"])
    link, saw = median(raw), median(stop_and_wait)
    rows = [
        ["plain TCP transfer (the link's rate)", fmt_rate(link), "1.00×", ""],
        ["plain TCP, 1 MiB then wait for a 1-byte reply (stop-and-wait)", fmt_rate(saw),
         ratio(saw, link), ""],
    ]  # fmt: skip
    for name, values in mirrored.items():
        value = median(values)
        rows.append(
            [name, fmt_rate(value), ratio(value, link), f"≥ 0.90× link: {met(value >= 0.9 * link)}"]
        )
    report(
        f"Sequential 1 MiB writes, {SEQ_MIB} MiB, veth shaped to 1 Gbit/s (tbf)",
        ["what", "median", "÷ link", "goal"],
        rows,
    )


def test_flush_against_sync_with_delay(tmp_path: Path) -> None:
    with (
        MirrorPair(tmp_path / "sync", mode="sync", delay_ms=DELAY_MS) as sync,
        MirrorPair(tmp_path / "flush", mode="flush", delay_ms=DELAY_MS) as flush,
    ):
        targets = []
        for pair in (sync, flush):
            pair.connect("none")
            target = Target(f"mirrored, {pair.mode}", pair.primary_mount, pair.primary_pid)
            dd_write(target.pid, target.directory / "small", SMALL_FILE // MIB)
            targets.append(target)
        bare: list[float] = []
        delayed: list[float] = []
        rates: dict[str, list[float]] = {t.name: [] for t in targets}
        for r in range(ROUNDS):
            bare.append(sync.rtt(500))
            delayed.append(sync.rtt(500, via_proxy=True))
            for target in rotated(targets, r):
                rates[target.name].append(target.small(DELAYED_64, 64)["ops_per_s"])
        for pair in (sync, flush):
            assert_same_copies(pair, ["small"])
    s, f = median(rates["mirrored, sync"]), median(rates["mirrored, flush"])
    added = median(delayed) - median(bare)
    report(
        f"4 KiB random writes, an fsync every 64 ({DELAYED_64} writes), through a delay proxy "
        f"({DELAY_MS:g} ms each way: RTT {median(delayed) * 1e3:.2f} ms, "
        f"{added * 1e3:.2f} ms more than the bare veth)",
        ["mode", "median", "÷ sync", "goal"],
        [
            ["sync", f"{s:.0f}/s", "1.00×", ""],
            ["flush", f"{f:.0f}/s", ratio(f, s), f"≥ 5× sync: {met(f >= 5 * s)}"],
        ],
    )
