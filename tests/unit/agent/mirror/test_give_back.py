"""A primary that crashes with changes in flight gives them back, by its activity log, when it
returns as the secondary: an incremental resync, not a comparison of everything.

Real mirror processes (tests/mirror_pair.py). node1 is primary and in sync; its secondary is
frozen (SIGSTOP), so that writers' changes land on node1's copy and are never applied on node2:
an overwrite inside a large file, a new file, a rename, a chmod. Then node1's power is lost
(kill -9), node2 becomes primary and changes the data alone, and node1 returns as secondary.
"""

from __future__ import annotations

import subprocess
import sys
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

IN_FLIGHT = """
import os, sys
what, directory = sys.argv[1], sys.argv[2]
if what == "create":
    open(os.path.join(directory, "inflight"), "w").close()
elif what == "rename":
    os.rename(os.path.join(directory, "sub", "x"), os.path.join(directory, "sub", "y"))
elif what == "chmod":
    os.chmod(os.path.join(directory, "keep"), 0o600)
"""


@pytest.mark.root
def test_a_crashed_primary_gives_back_its_changes_in_flight_by_its_activity_log(
    tmp_path: Path,
) -> None:
    with MirrorPair(tmp_path / "pair", mode="sync") as pair:
        assert pair.primary is not None and pair.secondary is not None
        pid, mount = pair.primary_pid, pair.primary_mount
        pair.connect("none")
        fill(pid, mount / "db", 32 * MIB)
        fill(pid, mount / "keep", MIB)
        # Each in a directory of its own: the kernel holds a directory's lock while an
        # operation in it waits for the peer.
        run_in_mount_ns(pid, ["mkdir", str(mount / "sub")])
        run_in_mount_ns(pid, ["touch", str(mount / "sub" / "x")])
        node1 = pair.primary_dir

        writers: list[subprocess.Popen[bytes]] = []
        try:
            with pair.frozen_secondary():
                writers.append(start_write_in_flight(pid, mount / "db", 4 * MIB, MIB))
                writers += [
                    subprocess.Popen(
                        ["nsenter", "-t", str(pid), "-m", "--", sys.executable, "-c", IN_FLIGHT,
                         what, str(mount)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )
                    for what in ("create", "rename", "chmod")
                ]  # fmt: skip
                for what, arrived in (
                    ("overwrite", lambda: holds_in_flight_write(node1 / "db", 4 * MIB)),
                    ("create", lambda: (node1 / "inflight").exists()),
                    ("rename", lambda: (node1 / "sub" / "y").exists()),
                    ("chmod", lambda: (node1 / "keep").stat().st_mode & 0o777 == 0o600),
                ):
                    assert wait_for(arrived, 20), f"the {what} in flight never reached node1"
                assert all(w.poll() is None for w in writers), "a write returned without the peer"
                pair.crash(swap=True)
        finally:
            for w in writers:  # after the secondary resumed (or died): they can end now
                w.kill()
                w.wait(timeout=60)

        # node2 serves alone and changes the data; node1 is back as its secondary.
        assert pair.nodes == ("node2", "node1")
        pair.alone()
        new_pid, new_mount = pair.primary_pid, pair.primary_mount
        run_in_mount_ns(
            new_pid,
            ["dd", "if=/dev/urandom", f"of={new_mount / 'db'}", "bs=1M", "count=1", "seek=20",
             "conv=notrunc,fsync"],
        )  # fmt: skip
        fill(new_pid, new_mount / "after", MIB)

        done = pair.connect("incremental", activity=True)

        connected = done["connected"]
        assert connected["resync"] == "incremental" and connected["given_back"] > 0
        # The overwrite in flight (1 MiB), what node2 wrote (2 MiB), a little more for the
        # rest: the activity log's other extents hold the same bytes on both sides.
        assert done["sent_bytes"] <= 4 * MIB, (
            f"{done['sent_bytes']} bytes resent: only what differs in the extents the "
            "activity log named, and what node2 wrote, should cross"
        )
        assert_same_copies(pair, ["db", "keep", "after", "sub/x"])
        back = pair.secondary_dir  # node1's copy, a secondary now
        assert not (back / "inflight").exists(), "a file created in flight survived"
        assert not (back / "sub" / "y").exists(), "a rename made in flight survived"
        assert (back / "keep").stat().st_mode & 0o777 == (pair.primary_dir / "keep").stat(
        ).st_mode & 0o777  # fmt: skip
        assert not (back.parent / "mirror" / "bench.activity").exists(), (
            "the returning node kept its activity log after the resync made it the primary's"
        )


@pytest.mark.root
def test_a_write_in_flight_to_a_hard_linked_file_gets_a_full_comparison(tmp_path: Path) -> None:
    """The journals know a file by the names they saw; an older second name would be missed:
    the returning node says its log cannot be used, and both trees are compared."""
    with MirrorPair(tmp_path / "pair", mode="sync") as pair:
        assert pair.primary is not None
        pid, mount = pair.primary_pid, pair.primary_mount
        pair.connect("none")
        fill(pid, mount / "a", MIB)
        run_in_mount_ns(pid, ["ln", str(mount / "a"), str(mount / "b")])
        fill(pid, mount / "c", MIB)  # the link's names leave the log (acknowledged)
        pair.crash_with_write_in_flight("a", 0, 4096, swap=True, seen_as="b")
        pair.alone()
        assert pair.primary is not None
        # node2 removes the name the write went through: no journal names "b" any more.
        run_in_mount_ns(pair.primary_pid, ["rm", str(pair.primary_mount / "a")])
        mark = pair.primary.mark()

        done = pair.connect("incremental", activity=True)

        refused = pair.primary.since(mark, "activity_refused")
        assert refused and "hard links" in refused[0]["reason"], refused
        assert done["connected"]["resync"] == "full"
        assert_same_copies(pair, ["b"])
        assert not (pair.secondary_dir / "a").exists()
        assert not holds_in_flight_write(pair.secondary_dir / "b", 0), "the write in flight stayed"


@pytest.mark.root
def test_a_primary_that_crashes_and_serves_again_sends_its_activity_log_places(
    tmp_path: Path,
) -> None:
    """Both nodes lose power and node1 comes back as primary: what it held in flight goes to
    node2 from its journal, where its activity log's places were adopted (no full compare)."""
    with MirrorPair(tmp_path / "pair", mode="sync") as pair:
        pid, mount = pair.primary_pid, pair.primary_mount
        pair.connect("none")
        fill(pid, mount / "db", 32 * MIB)
        pair.crash_with_write_in_flight("db", 8 * MIB, MIB, swap=False, adopt_activity=True)

        assert pair.nodes == ("node1", "node2") and pair.ready.get("adopted", 0) > 0, pair.ready
        done = pair.connect("incremental")

        assert done["connected"]["resync"] == "incremental"
        assert done["sent_bytes"] <= MIB, f"{done['sent_bytes']} bytes sent for 1 MiB in flight"
        assert_same_copies(pair, ["db"])
        assert holds_in_flight_write(pair.secondary_dir / "db", 8 * MIB)
