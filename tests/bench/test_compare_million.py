"""Benchmark: comparing two trees of 1,000,000 small files by block hashes.

Both trees live in a tmpfs mounted for the run (and unmounted after), 1,000 directories of
1,000 files of 1–200 bytes; the target differs in 1,000 files' content, 10 files it lacks
and 10 extra ones. Measured: the scan of each side, the target's manifest encoded in the
receiver's chunks and decoded, and the plan. On two nodes the scans run at once, so the
figure that counts is the slower scan + encode + decode + plan. Goal: ≤ 60 s. Printed,
never asserted as a time; it fails only if the plan misses or invents a difference.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core.resync import plan
from agent.mirror.manifest import Entry, decode_entries, encode_entries, scan

pytestmark = [pytest.mark.root, pytest.mark.timeout(3600)]

DIRS = 1000
PER_DIR = 1000
CHUNK = 20_000  # entries per MANIFEST frame, as the receiver sends them
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


def timed_scan(root: Path) -> tuple[list[Entry], float]:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        start = time.perf_counter()
        entries = list(scan(fd))
        return entries, time.perf_counter() - start
    finally:
        os.close(fd)


def test_compare_a_million_files(tmpfs: Path) -> None:
    start = time.perf_counter()
    make_tree(tmpfs / "source", variant=False)
    make_tree(tmpfs / "target", variant=True)
    made = time.perf_counter() - start

    source, scan_source = timed_scan(tmpfs / "source")
    target, scan_target = timed_scan(tmpfs / "target")

    start = time.perf_counter()
    chunks = [encode_entries(target[i : i + CHUNK]) for i in range(0, len(target), CHUNK)]
    encode = time.perf_counter() - start
    start = time.perf_counter()
    received = [e for chunk in chunks for e in decode_entries(chunk)]
    decode = time.perf_counter() - start

    start = time.perf_counter()
    steps = plan(source, received)
    planning = time.perf_counter() - start

    files = DIRS * PER_DIR
    two_nodes = max(scan_source, scan_target) + encode + decode + planning
    one_machine = scan_source + scan_target + encode + decode + planning
    print()
    print(f"made the two trees in {made:.1f} s (not counted)")
    print(f"scan source  {scan_source:6.2f} s  {len(source) / scan_source:9,.0f} entries/s")
    print(f"scan target  {scan_target:6.2f} s  {len(target) / scan_target:9,.0f} entries/s")
    print(
        f"encode       {encode:6.2f} s  ({sum(map(len, chunks)) / 2**20:.0f} MiB in {len(chunks)})"
    )
    print(f"decode       {decode:6.2f} s")
    print(f"plan         {planning:6.2f} s")
    print(f"two nodes (scans at once): {two_nodes:6.2f} s, {files / two_nodes:,.0f} files/s")
    print(f"one machine (in a row):    {one_machine:6.2f} s, {files / one_machine:,.0f} files/s")
    print(f"goal: {GOAL_S:.0f} s for {files:,} files")

    changed = {f"dir{i:04}/f500" for i in range(DIRS)}
    lacking = {f"dir{i:04}/f0" for i in range(10)}
    assert {e.path for e in steps.creates} == lacking
    assert {r.path for r in steps.ranges} == changed | lacking
    assert set(steps.removes) == {f"dir{i:04}/extra" for i in range(10)}
