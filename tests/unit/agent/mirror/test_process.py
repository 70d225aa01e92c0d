"""The mirror process, run for real: what it leaves behind when its agent dies."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab import wait_for
from tests.mirror_pair import MirrorPair, SoloMirror, fill, run_in_mount_ns

# An application in the mirror's mount namespace: it writes through the mount, then, once told
# the agent is gone, tries to create another file there and says what happened.
APPLICATION = """
import os, sys
directory = sys.argv[1]
with open(os.path.join(directory, "before"), "w") as f:
    f.write("mirrored")
print("ready", flush=True)
sys.stdin.readline()
try:
    with open(os.path.join(directory, "after"), "w") as f:
        f.write("never acknowledged")
    print("written", flush=True)
except OSError as exc:
    print(exc.errno, flush=True)
"""


@pytest.mark.root
def test_a_mirror_whose_agent_dies_leaves_a_dead_mount_never_the_bare_directory(
    tmp_path: Path,
) -> None:
    solo = SoloMirror(tmp_path / "solo")
    application: subprocess.Popen[str] | None = None
    try:
        application = subprocess.Popen(
            ["nsenter", "-t", str(solo.pid), "-m", "--", sys.executable, "-c", APPLICATION,
             str(solo.directory)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert application.stdin is not None and application.stdout is not None
        assert application.stdout.readline().strip() == "ready"

        solo.process.lose_agent()
        solo.process.proc.wait(timeout=20)
        application.stdin.write("go\n")
        application.stdin.flush()
        answer = application.stdout.readline().strip()

        assert answer == str(errno.ENOTCONN), (
            f"after its agent died the application's write gave {answer!r}: "
            "it must fail on the dead mount"
        )
        assert not (solo.directory / "after").exists(), "an unmirrored write reached the disk"
        assert (solo.directory / "before").read_text() == "mirrored"
    finally:
        if application is not None:
            application.kill()
            application.wait(timeout=10)
            for pipe in (application.stdin, application.stdout):
                if pipe is not None:
                    pipe.close()
        solo.close()


# Writes 3 MiB in 1 MiB writes into a new file and reports what each write returned.
WRITER = """
import json, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
results = []
for n in range(3):
    try:
        results.append(os.pwrite(fd, bytes([65 + n]) * (1 << 20), n << 20))
    except OSError as exc:
        results.append(-exc.errno)
os.fsync(fd)
os.close(fd)
print(json.dumps(results))
"""


@pytest.mark.root
def test_a_write_that_falls_short_on_the_primary_leaves_the_same_bytes_on_the_secondary(
    tmp_path: Path,
) -> None:
    """The primary sends a write before making it locally; when the local write falls short
    (here its file size limit: a short write, then EFBIG), the peer's copy is mended."""
    with MirrorPair(tmp_path / "pair", mode="sync") as pair:
        pair.connect("none")
        limit = (1 << 20) + (1 << 19)  # 1.5 MiB: the second write is cut, the third refused
        subprocess.run(
            ["prlimit", f"--pid={pair.primary_pid}", f"--fsize={limit}:{limit}"], check=True
        )
        done = run_in_mount_ns(
            pair.primary_pid, [sys.executable, "-c", WRITER, str(pair.primary_mount / "f")]
        )
        assert json.loads(done.stdout) == [1 << 20, 1 << 19, -errno.EFBIG]
        primary = (pair.primary_dir / "f").read_bytes()
        assert primary == b"A" * (1 << 20) + b"B" * (1 << 19)
        assert (pair.secondary_dir / "f").read_bytes() == primary


@pytest.mark.root
def test_a_second_verify_is_refused_while_one_runs_and_answers_carry_their_id(
    tmp_path: Path,
) -> None:
    with MirrorPair(tmp_path / "pair", mode="sync") as pair:
        assert pair.primary is not None
        primary = pair.primary
        pair.connect("none")
        fill(pair.primary_pid, pair.primary_mount / "big", 64 << 20)  # hashed for a while
        mark = primary.mark()
        primary.send({"cmd": "verify", "id": 1})
        primary.send({"cmd": "verify", "id": 2})
        both = wait_for(lambda: len(primary.since(mark, "verify_done")) == 2, 60)
        answers = {a["id"]: a for a in primary.since(mark, "verify_done")}
        assert both, f"two answers expected, got {answers}"
        # Two at once would take each other's manifests off the stream: the second waits
        # for nothing and says why, and each answer names the verify it belongs to.
        assert "still running" in answers[2]["error"]
        assert answers[1]["differing"] == [] and "error" not in answers[1]
