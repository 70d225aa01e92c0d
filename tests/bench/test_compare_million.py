"""Benchmark: comparing two trees of 1,000,000 small files by block hashes.

Both trees live in a tmpfs mounted for the run (and unmounted after), 1,000 directories of
1,000 files of 5-200 bytes; the target differs in 1,000 files' content, lacks 10 files and
has 10 extra ones. Measured: the scan of each side, the target's manifest encoded in chunks
of at most 4 MiB (encode_chunks) and decoded, and the plan. On two nodes the scans run at
once, so the figure that counts is the slower scan + encode + decode + plan. Goal: 60 s.
Printed (wall and CPU time), never asserted; it fails only if the plan misses or invents a
difference.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core.resync import plan
from agent.mirror.manifest import Entry, ManifestReader, encode_chunks, scan

pytestmark = [pytest.mark.root, pytest.mark.timeout(3600)]

DIRS = 1000
PER_DIR = 1000
GOAL_S = 60.0


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "fs"
    where.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8g,nr_inodes=4m", "tmpfs", str(where)], check=True
    )
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)


def make_tree(root: Path, variant: bool) -> None:
    root.mkdir()
    flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC
    for i in range(DIRS):
        d = root / f"dir{i:04}"
        d.mkdir()
        dir_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for j in range(PER_DIR):
                if variant and i < 10 and j == 0:
                    continue  # files the target lacks
                data = b"%d/%d " % (i, j) * (1 + j % 20)
                if variant and j == 500:
                    data = b"changed " + data
                fd = os.open(f"f{j}", flags, 0o644, dir_fd=dir_fd)
                os.write(fd, data)
                os.close(fd)
                os.utime(f"f{j}", ns=(1, 10**18), dir_fd=dir_fd)
            if variant and i < 10:
                (d / "extra").write_bytes(b"only on the target")
        finally:
            os.close(dir_fd)
        os.utime(d, ns=(1, 10**18))


class Clock:
    """Wall and CPU seconds of one phase (CPU time hardly moves with other load here)."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def timed_scan(root: Path) -> tuple[list[Entry], Clock]:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with Clock() as clock:
            entries = list(scan(fd))
        return entries, clock
    finally:
        os.close(fd)


def test_compare_a_million_files(tmpfs: Path) -> None:
    start = time.perf_counter()
    make_tree(tmpfs / "source", variant=False)
    make_tree(tmpfs / "target", variant=True)
    made = time.perf_counter() - start

    source, scan_source = timed_scan(tmpfs / "source")
    target, scan_target = timed_scan(tmpfs / "target")

    with Clock() as encode:
        chunks = list(encode_chunks(target))
    with Clock() as decode:
        reader = ManifestReader()
        received = [e for chunk in chunks for e in reader.feed(chunk)]
        reader.close()
    with Clock() as planning:
        steps = plan(source, received)

    files = DIRS * PER_DIR
    mib = sum(map(len, chunks)) / 2**20
    print()
    print(f"made the two trees in {made:.1f} s (not counted); wall s, CPU s, entries/s (wall)")
    for name, clock, n in [
        ("scan source", scan_source, len(source)),
        ("scan target", scan_target, len(target)),
        (f"encode ({mib:.0f} MiB in {len(chunks)} chunks)", encode, len(target)),
        ("decode", decode, len(target)),
        ("plan", planning, len(source)),
    ]:
        print(f"{name:34} {clock.wall:6.2f} {clock.cpu:6.2f} {n / clock.wall:10,.0f}")
    rest = [encode, decode, planning]
    for label, what in [("wall", "wall"), ("CPU", "cpu")]:
        scans = [getattr(scan_source, what), getattr(scan_target, what)]
        after = sum(getattr(c, what) for c in rest)
        two = max(scans) + after
        one = sum(scans) + after
        print(f"{label}: two nodes (scans at once) {two:6.2f} s = {files / two:,.0f} files/s;")
        print(f"{label}: one machine (in a row)   {one:6.2f} s = {files / one:,.0f} files/s")
    print(f"goal: {GOAL_S:.0f} s for {files:,} files")

    changed = {f"dir{i:04}/f500" for i in range(DIRS)}
    lacking = {f"dir{i:04}/f0" for i in range(10)}
    assert {e.path for e in steps.creates} == lacking
    assert {r.path for r in steps.ranges} == changed | lacking
    assert set(steps.removes) == {f"dir{i:04}/extra" for i in range(10)}
