"""Benchmark: what a Python FUSE passthrough costs, and why mfusepy was chosen.

The same workloads run on a plain directory, through MirrorFS with a LocalReplicator
(mfusepy, the mirror's own code with no peer) and through a minimal pyfuse3 passthrough
when pyfuse3 can be built here (in a throwaway venv under /tmp; never a project
dependency). Workloads: 1 GiB overwritten in 1 MiB writes then fdatasync (dd), and 4 KiB
random writes with an fsync every 64 (a Python writer in a subprocess). Rounds are
interleaved and medians reported as ratios to the plain directory: this VM's memory is
lazily backed, so absolute figures swing. Measures only; asserts no time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.mirror.excludes import Excludes
from agent.mirror.fs import FUSE_THREADS, MirrorMount
from agent.mirror.replicator import LocalReplicator
from tests.bench.conftest import median, ratio, report

pytestmark = pytest.mark.timeout(1800)

ROUNDS = 3
BIG_MIB = 1024
SMALL_FILE = 64 << 20
SMALL_WRITES = 16384
PYFUSE3_VENV = Path("/tmp/tandem-pyfuse3-venv")

SMALL_WRITER = """
import os, random, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
rng = random.Random(7)
block = os.urandom(4096)
blocks = int(sys.argv[2]) // 4096
count = int(sys.argv[3])
start = time.monotonic()
for i in range(1, count + 1):
    os.pwrite(fd, block, rng.randrange(blocks) * 4096)
    if i % 64 == 0:
        os.fsync(fd)
print(count / (time.monotonic() - start))
"""

PYFUSE3_PASSTHROUGH = """
import os, sys
import pyfuse3, trio

class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, fd):
        super().__init__()
        self.fd = fd
        self.paths = {pyfuse3.ROOT_INODE: "."}

    def _entry(self, st, inode):
        entry = pyfuse3.EntryAttributes()
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_rdev",
                     "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(entry, name, getattr(st, name))
        entry.st_ino = inode
        entry.attr_timeout = entry.entry_timeout = 1.0
        return entry

    def _stat(self, path):
        try:
            return os.stat(path, dir_fd=self.fd, follow_symlinks=False)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None

    async def lookup(self, parent, name, ctx=None):
        path = os.path.join(self.paths[parent], os.fsdecode(name))
        st = self._stat(path)
        self.paths[st.st_ino] = path
        return self._entry(st, st.st_ino)

    async def getattr(self, inode, ctx=None):
        return self._entry(self._stat(self.paths[inode]), inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        return await self.getattr(inode)

    async def forget(self, inodes):
        pass

    async def open(self, inode, flags, ctx):
        flags &= ~(os.O_CREAT | os.O_APPEND)
        return pyfuse3.FileInfo(fh=os.open(self.paths[inode], flags, dir_fd=self.fd))

    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    async def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    async def fsync(self, fh, datasync):
        (os.fdatasync if datasync else os.fsync)(fh)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        os.close(fh)

fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
options = set(pyfuse3.default_options) | {"fsname=pyfuse3bench", "allow_other"}
pyfuse3.init(Passthrough(fd), sys.argv[1], options)
print("mounted", flush=True)
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close(unmount=False)
"""


# --- pyfuse3, when it can be had -------------------------------------------------------------


def pyfuse3_python() -> tuple[str | None, str]:
    """The throwaway venv's python with pyfuse3, building it if needed; or None and why not."""
    python = PYFUSE3_VENV / "bin" / "python"
    check = [str(python), "-c", "import pyfuse3, trio"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return str(python), "pyfuse3 from " + str(PYFUSE3_VENV)
    steps = [
        ["apt-get", "install", "-y", "-qq", "libfuse3-dev", "pkg-config"],
        [shutil.which("python3") or "python3", "-m", "venv", str(PYFUSE3_VENV)],
        [str(PYFUSE3_VENV / "bin" / "pip"), "install", "-q", "pyfuse3"],
    ]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            return None, f"pyfuse3 could not be built ({' '.join(step[:3])}: {tail})"
    if subprocess.run(check, capture_output=True).returncode != 0:
        return None, "pyfuse3 installed but does not import"
    return str(python), "pyfuse3 built in " + str(PYFUSE3_VENV)


@contextlib.contextmanager
def pyfuse3_mount(python: str, path: Path) -> Iterator[None]:
    daemon = subprocess.Popen(
        [python, "-c", PYFUSE3_PASSTHROUGH, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert daemon.stdout is not None
        if daemon.stdout.readline().strip() != "mounted":
            raise RuntimeError("the pyfuse3 passthrough did not mount")
        yield
    finally:
        subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, check=False)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True, check=False)
            daemon.kill()
            daemon.wait(timeout=30)
        if daemon.stdout is not None:
            daemon.stdout.close()


# --- workloads ---------------------------------------------------------------------------------


def big_writes(target: Path) -> float:
    """GB/s of dd overwriting 1 GiB in 1 MiB writes, fdatasync included."""
    argv = ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={BIG_MIB}"]
    start = time.monotonic()
    subprocess.run([*argv, "conv=fdatasync,notrunc"], capture_output=True, check=True)
    return BIG_MIB * (1 << 20) / (time.monotonic() - start) / 1e9


def small_writes(target: Path) -> float:
    """4 KiB random writes per second, fsync every 64."""
    argv = [sys.executable, "-c", SMALL_WRITER, str(target), str(SMALL_FILE), str(SMALL_WRITES)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


class ThreadPeak:
    """The most threads this process had while sampling (libfuse's workers are C threads)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, len(os.listdir("/proc/self/task")))

    def __enter__(self) -> ThreadPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def base() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="tandem-fuse-bench-", dir="/tmp"))
    top.chmod(0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_fuse_library_figures(base: Path) -> None:
    python, pyfuse3_note = pyfuse3_python()
    print(f"\n{pyfuse3_note}")
    targets = {"plain": base / "plain", "mfusepy": base / "mfusepy", "pyfuse3": base / "pyfuse3"}
    if python is None:
        del targets["pyfuse3"]
    for top in targets.values():
        top.mkdir()
        # Files made once, outside the mounts: every timed round overwrites them.
        subprocess.run(["dd", "if=/dev/zero", f"of={top / 'big'}", "bs=1M", f"count={BIG_MIB}"],
                       capture_output=True, check=True)  # fmt: skip
        with open(top / "small", "wb") as f:
            f.truncate(SMALL_FILE)
    mount = MirrorMount(targets["mfusepy"], 0, LocalReplicator(), Excludes([]))
    idle_threads = len(os.listdir("/proc/self/task"))
    big: dict[str, list[float]] = {name: [] for name in targets}
    small: dict[str, list[float]] = {name: [] for name in targets}
    peak = 0
    with contextlib.ExitStack() as stack:
        mount.start()
        stack.callback(mount.stop)
        mounted_threads = len(os.listdir("/proc/self/task"))
        if python is not None:
            stack.enter_context(pyfuse3_mount(python, targets["pyfuse3"]))
        for _ in range(ROUNDS):
            for name, top in targets.items():
                sampler: Callable[[], contextlib.AbstractContextManager[object]] = (
                    ThreadPeak if name == "mfusepy" else contextlib.nullcontext
                )
                with sampler() as probe:
                    big[name].append(big_writes(top / "big"))
                    small[name].append(small_writes(top / "small"))
                if isinstance(probe, ThreadPeak):
                    peak = max(peak, probe.peak)
    rows = []
    for name in targets:
        b, s = median(big[name]), median(small[name])
        rows.append([name, f"{b:.2f} GB/s", ratio(b, median(big["plain"])),
                     f"{s / 1000:.1f} k/s", ratio(s, median(small["plain"]))])  # fmt: skip
    report(
        f"FUSE passthrough vs plain directory (median of {ROUNDS}, interleaved)",
        ["target", "1 GiB bs=1M + fdatasync", "ratio", "4 KiB random, fsync/64", "ratio"],
        rows,
    )
    print(
        f"mfusepy threads: {mounted_threads - idle_threads} when mounted, "
        f"{peak - idle_threads} at peak under load (max_threads={FUSE_THREADS}); {pyfuse3_note}"
    )
