"""An interrupted resync resumes: what the peer already got is not sent again.

A real primary and secondary mirror process (tests/mirror_pair.py). The primary runs alone and
writes 32 MiB; the resync back, held to 4 MiB/s, is cut short by the agent's `alone` while a
live rename moves a file it has not finished sending. The next connect must send only what
still differs (counted block by block on the real files), and leave both copies equal.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab import wait_for
from tests.mirror_pair import (
    MirrorPair,
    assert_same_copies,
    fill,
    holds_in_flight_write,
    run_in_mount_ns,
    start_write_in_flight,
)

MIB = 1 << 20
RATE = 4 * MIB  # slow enough that the cut lands seconds before the resync would end
BLOCK = 64 * 1024  # the resync's hash block


def differing_bytes(primary: Path, secondary: Path) -> int:
    """Bytes of `primary` in 64 KiB blocks that `secondary` does not hold the same."""
    data = primary.read_bytes()
    other = secondary.read_bytes() if secondary.exists() else b""
    return sum(
        min(BLOCK, len(data) - at)
        for at in range(0, len(data), BLOCK)
        if data[at : at + BLOCK] != other[at : at + BLOCK]
    )


def wait_resync_progress(pair: MirrorPair, mark: int, at_least: int) -> dict[str, int]:
    """The first `resync` figures (sent every second) showing at least `at_least` bytes done."""

    def shown() -> list[dict[str, int]]:
        return [f["resync"] for f in pair.figures(mark) if f.get("resync")]

    reached = wait_for(lambda: bool(shown()) and shown()[-1]["done_bytes"] >= at_least, 60)
    assert reached, f"the resync did not reach {at_least} bytes within 60 s"
    return dict(shown()[-1])


@pytest.mark.root
def test_an_interrupted_resync_resumes_where_it_stopped(tmp_path: Path) -> None:
    with MirrorPair(tmp_path / "pair", mode="sync", resync_rate=RATE) as pair:
        assert pair.primary is not None
        pid, mount = pair.primary_pid, pair.primary_mount
        pair.connect("none")
        pair.alone()
        fill(pid, mount / "a", 24 * MIB)
        fill(pid, mount / "b", 8 * MIB)
        run_in_mount_ns(pid, ["mkdir", str(mount / "d")])
        fill(pid, mount / "d" / "x", MIB)

        mark = pair.begin_connect("incremental")
        first = wait_resync_progress(pair, mark, 10 * MIB)
        # A live rename of a file the resync may not have sent yet, then the peer is lost.
        run_in_mount_ns(pid, ["mv", str(mount / "b"), str(mount / "e")])
        pair.alone()
        pair.primary.wait_event(["resync_interrupted"], mark)
        assert pair.primary.since(mark, "resync_done") == []

        left = sum(
            differing_bytes(pair.primary_dir / name, pair.secondary_dir / name)
            for name in ("a", "e", "d/x")
        )
        assert 0 < left < first["total_bytes"] - 8 * MIB, (
            f"the first resync should have left part of its {first['total_bytes']} bytes "
            f"undone, and sent at least 10 MiB: {left} bytes differ"
        )
        fill(pid, mount / "f", MIB)  # written alone, after the cut

        done = pair.connect("incremental")

        assert done["connected"]["resync"] == "resume"
        assert done["total_bytes"] <= left + MIB, (
            f"the resumed resync planned {done['total_bytes']} bytes, but only {left} bytes "
            "still differed and 1 MiB was written since: it sent again what the peer had"
        )
        assert_same_copies(pair, ["a", "e", "d/x", "f"])
        assert not (pair.secondary_dir / "b").exists(), "the renamed file's old name remains"


@pytest.mark.root
def test_a_resync_cut_by_a_dead_link_also_resumes(tmp_path: Path) -> None:
    with MirrorPair(tmp_path / "pair", mode="sync", resync_rate=RATE, ack_timeout=1.0) as pair:
        assert pair.primary is not None
        pid, mount = pair.primary_pid, pair.primary_mount
        pair.connect("none")
        pair.alone()
        fill(pid, mount / "a", 24 * MIB)

        mark = pair.begin_connect("incremental")
        wait_resync_progress(pair, mark, 8 * MIB)
        pair.ip(pair.ns_secondary, "link", "set", "eth0", "down")
        try:
            pair.primary.wait_event(["resync_interrupted"], mark, 30)
            pair.alone()
        finally:
            pair.ip(pair.ns_secondary, "link", "set", "eth0", "up")
        left = differing_bytes(pair.primary_dir / "a", pair.secondary_dir / "a")

        done = pair.connect("incremental")

        assert done["connected"]["resync"] == "resume"
        assert done["total_bytes"] <= left, (
            f"the resumed resync planned {done['total_bytes']} bytes for {left} that differed"
        )
        assert_same_copies(pair, ["a"])


@pytest.mark.root
def test_a_file_whose_other_names_the_journal_never_saw_gets_a_full_comparison(
    tmp_path: Path,
) -> None:
    """A write alone through one name of a file linked before, then that name removed: the
    journal knows no name left for those bytes, so the next resync compares everything."""
    with MirrorPair(tmp_path / "pair", mode="sync") as pair:
        pid, mount = pair.primary_pid, pair.primary_mount
        pair.connect("none")
        fill(pid, mount / "a", MIB)
        run_in_mount_ns(pid, ["ln", str(mount / "a"), str(mount / "b")])
        pair.alone()
        writer = start_write_in_flight(pid, mount / "a", 4096, 4096)  # alone: it returns
        assert writer.wait(timeout=30) == 0
        run_in_mount_ns(pid, ["rm", str(mount / "a")])

        done = pair.connect("incremental")

        assert done["connected"]["resync"] == "full"
        assert_same_copies(pair, ["b"])
        assert holds_in_flight_write(pair.secondary_dir / "b", 4096)
        assert not (pair.secondary_dir / "a").exists()
