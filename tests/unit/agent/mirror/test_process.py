"""The mirror process, run for real: what it leaves behind when its agent dies."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mirror_pair import SoloMirror

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
