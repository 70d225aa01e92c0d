"""The mirror file system behaves as the directory beneath it, and its ops rebuild the tree.

A script of file-system operations runs in a plain directory and through a real
MirrorMount whose replicator records every op; the trees must match, and the
recorded ops replayed by the secondary's Applier into an empty directory must
rebuild the same tree (the core promise of mirroring). The recording
replicator is a test of the file system's contract with its replicator.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.core.activity import ActivityKey, Kind, activity_keys
from agent.core.mirror_ops import (
    Create,
    Fsync,
    Mkdir,
    Op,
    Rename,
    Rmdir,
    SetXattr,
    Truncate,
    Unlink,
    Write,
)
from agent.mirror.apply import Applier
from agent.mirror.excludes import Excludes
from agent.mirror.fs import CHUNK, MirrorMount, clear_stale_mount
from agent.mirror.replicator import LocalReplicator, WaitPoint

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

BIG_OFFSET = (4 << 30) + 12345  # beyond 4 GiB: 64-bit offsets all the way
OTHER_UID = 65534  # nobody
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


EXTENT = 4096


class Recorder:
    """A replicator that keeps every op and every wait; `fail` makes waits refuse (EIO)."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.waits: list[tuple[int, WaitPoint]] = []
        self.fail = False
        self.unannounced: list[Op] = []  # enqueued without an `intend` that covers them
        self._pinned: set[ActivityKey] = set()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def ordered(self) -> Iterator[None]:
        with self._lock:
            self._pinned = set()
            yield

    def intend(self, op: Op, links: int = 1) -> None:
        self._pinned.update(activity_keys(op, EXTENT))

    def enqueue(self, op: Op) -> int:
        if not all(self._covered(key) for key in activity_keys(op, EXTENT)):
            self.unannounced.append(op)
        if isinstance(op, Write):  # lent by the FUSE request: kept here, so copied
            op = dataclasses.replace(op, data=bytes(op.data))
        self.ops.append(op)
        return len(self.ops)

    def _covered(self, key: ActivityKey) -> bool:
        """Pinned itself, or below a name pinned (a rename out of an excluded name sends the
        tree it moved)."""
        if key in self._pinned:
            return True
        _kind, root, path, _index = key
        parts = path.split("/")
        return any(
            (Kind.NAME, root, "/".join(parts[:n]), 0) in self._pinned
            for n in range(1, 1 + len(parts))
        )

    def wait(self, ticket: int, point: WaitPoint) -> None:
        self.waits.append((ticket, point))
        if self.fail:
            raise OSError(errno.EIO, "stepping down")


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp_path is root-only)."""
    top = Path(tempfile.mkdtemp(prefix="tandem-fs-", dir="/tmp"))
    top.chmod(0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


@contextlib.contextmanager
def mounted(path: Path, replicator: Any, patterns: tuple[str, ...] = ()) -> Iterator[MirrorMount]:
    path.mkdir(exist_ok=True)
    mount = MirrorMount(path, 0, replicator, Excludes(patterns))
    try:
        mount.start()
        yield mount
    finally:
        mount.stop()


# --- the script ---------------------------------------------------------------------------


def write_file(path: Path, data: bytes, flags: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def exchange(a: Path, b: Path) -> None:
    at_fdcwd = -100
    if _libc.renameat2(at_fdcwd, bytes(a), at_fdcwd, bytes(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


MMAP_WRITER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, 65536)
with mmap.mmap(fd, 65536, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as region:
    region[100:105] = b"hello"
    region[40000:40005] = b"world"
    region.flush()
os.close(fd)
"""


def exercise(d: Path) -> None:
    """Every kind of operation the mirror handles, as an application would do them."""
    write_file(d / "a", b"first version, longer than the next")
    write_file(d / "a", b"second", os.O_TRUNC)
    # A sparse file with a write beyond 4 GiB: holes must not be materialised.
    fd = os.open(d / "big", os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(fd, b"far away", BIG_OFFSET)
    os.pwrite(fd, b"near", 4096)
    os.fdatasync(fd)
    os.close(fd)
    # Two appenders interleave; each write lands at the end as it is then.
    one = os.open(d / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    two = os.open(d / "log", os.O_WRONLY | os.O_APPEND)
    for i in range(5):
        os.write(one, b"one %d\n" % i)
        os.write(two, b"two %d\n" % i)
    os.fsync(one)
    os.close(one)
    os.close(two)
    # Shared writable mmap: the kernel sends the pages at msync. In another process, as
    # applications are: a page fault here would wait for a FUSE thread that needs our GIL.
    subprocess.run([sys.executable, "-c", MMAP_WRITER, str(d / "mapped")], check=True)
    fd = os.open(d / "alloc", os.O_RDWR | os.O_CREAT, 0o644)
    os.posix_fallocate(fd, 0, 8192)
    os.close(fd)
    # Directories.
    (d / "dir" / "gone").mkdir(parents=True)
    (d / "dir" / "gone").rmdir()
    (d / "dir" / "keep").mkdir(mode=0o750)
    # Rename over an existing name, and an exchange (renameat2 flags).
    write_file(d / "r1", b"r1")
    write_file(d / "r2", b"r2 old")
    os.rename(d / "r1", d / "r2")
    write_file(d / "x1", b"x1")
    (d / "x2").mkdir()
    exchange(d / "x1", d / "x2")
    # Links.
    os.link(d / "a", d / "dir" / "a-link")
    os.symlink("../a", d / "dir" / "sl")
    os.symlink("nowhere", d / "dangling")
    os.mkfifo(d / "fifo", 0o640)
    # Attributes.
    os.chmod(d / "a", 0o640)
    os.chmod(d / "dir", 0o711)
    os.chown(d / "mapped", 1234, 5678)
    os.chown(d / "dangling", 4321, 8765, follow_symlinks=False)
    os.setxattr(d / "a", "user.one", b"1")
    os.setxattr(d / "a", "user.two", b"2")
    os.removexattr(d / "a", "user.two")
    os.setxattr(d / "dir", "user.on-dir", b"\x00binary\xff")
    # A file unlinked while open keeps being written, then is closed.
    fd = os.open(d / "doomed", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"before")
    os.unlink(d / "doomed")
    os.write(fd, b"after")
    os.fsync(fd)
    os.close(fd)
    # Another user creates a file: it must be theirs.
    (d / "shared").mkdir()
    (d / "shared").chmod(0o777)
    subprocess.run(
        ["sh", "-c", 'echo theirs > "$1" && mkdir "$1.d"', "sh", str(d / "shared" / "theirs")],
        user=OTHER_UID,
        group=OTHER_UID,
        check=True,
    )
    # Fixed times last, deepest first, so no later change moves a directory's mtime.
    entries = sorted(d.rglob("*"), key=lambda p: -len(p.parts))
    for n, path in enumerate([*entries, d]):
        os.utime(path, ns=(1_600_000_000_123_456_789 + n, 1_500_000_000_987_654_321 + n),
                 follow_symlinks=False)  # fmt: skip


# --- comparing trees ----------------------------------------------------------------------


def digest(path: Path) -> dict[int, str]:
    """Hashes of the non-zero 64 KiB blocks of a file, read by data extents (holes skipped)."""
    block = 65536
    found: dict[int, str] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while True:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return found
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            for at in range(start - start % block, end, block):
                chunk = os.pread(fd, block, at)
                if chunk.count(0) != len(chunk):
                    found[at] = hashlib.sha256(chunk).hexdigest()
            pos = end
    finally:
        os.close(fd)


def never(rel: str) -> bool:
    return False


def snapshot(top: Path, skip: Callable[[str], bool] = never) -> dict[str, Any]:
    """Everything mirroring promises to keep, per path (atime and ctime are not mirrored)."""
    tree: dict[str, Any] = {}
    for path in [top, *top.rglob("*")]:
        rel = str(path.relative_to(top))
        if skip(rel):
            continue
        st = os.lstat(path)
        entry: dict[str, Any] = {
            "mode": oct(st.st_mode),
            "owner": (st.st_uid, st.st_gid),
            "mtime": st.st_mtime_ns,
            "nlink": st.st_nlink,
        }
        if stat.S_ISLNK(st.st_mode):
            entry["target"] = os.readlink(path)
        else:
            names = sorted(os.listxattr(path, follow_symlinks=False))
            entry["xattrs"] = {n: os.getxattr(path, n, follow_symlinks=False) for n in names}
        if stat.S_ISDIR(st.st_mode) and skip is not never:
            del entry["nlink"]  # counts excluded subdirectories, which the peer lacks
        if stat.S_ISREG(st.st_mode):
            entry["size"] = st.st_size
            entry["data"] = digest(path)
        tree[rel] = entry
    return tree


def replay(ops: list[Op], into: Path) -> None:
    into.mkdir()
    fd = os.open(into, os.O_RDONLY | os.O_DIRECTORY)
    applier = Applier([fd])
    try:
        for op in ops:
            applier.apply(op)
    finally:
        applier.close()
        os.close(fd)


# --- tests ----------------------------------------------------------------------------------


def test_the_mirror_behaves_as_the_plain_directory_and_its_ops_rebuild_the_tree(
    base: Path,
) -> None:
    plain, mirrored, rebuilt = base / "plain", base / "mirrored", base / "rebuilt"
    plain.mkdir()
    exercise(plain)
    expected = snapshot(plain)
    recorder = Recorder()
    with mounted(mirrored, recorder):
        exercise(mirrored)
        # A hard link's other name is another FUSE node: its cached attributes (mtime set
        # through "a") may lag up to the 1 s attribute timeout.
        deadline = time.monotonic() + 5
        while (seen := snapshot(mirrored)) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == expected
    assert snapshot(mirrored) == expected
    assert expected["shared/theirs"]["owner"] == (OTHER_UID, OTHER_UID)
    assert expected["big"]["size"] == BIG_OFFSET + len(b"far away")
    assert os.lstat(mirrored / "big").st_blocks * 512 < 1 << 20, "holes were materialised"
    replay(recorder.ops, rebuilt)
    assert snapshot(rebuilt) == expected
    assert os.lstat(rebuilt / "big").st_blocks * 512 < 1 << 20, "holes were materialised"
    appends = [op for op in recorder.ops if isinstance(op, Write) and op.path == "log"]
    assert [op.offset for op in appends] == [6 * i for i in range(10)]
    assert Truncate(0, "a", 0) in recorder.ops  # O_TRUNC is mirrored as a truncate
    assert Rename(0, "x1", "x2", RENAME_EXCHANGE) in recorder.ops
    # Each change was announced before it was made here (what a crash could leave unsent).
    assert recorder.unannounced == []


def test_local_errors_reach_the_application_and_enqueue_nothing(base: Path) -> None:
    recorder = Recorder()
    with mounted(base / "m", recorder) as mount:
        d = mount.path
        (d / "full").mkdir()
        write_file(d / "full" / "f", b"x")
        before = list(recorder.ops)
        cases: list[tuple[int, Callable[[], object]]] = [
            (errno.ENOENT, lambda: os.open(d / "missing", os.O_RDONLY)),
            (errno.ENOENT, lambda: os.unlink(d / "missing")),
            (errno.ENOENT, lambda: os.rename(d / "missing", d / "other")),
            (errno.EEXIST, lambda: (d / "full").mkdir()),
            (errno.EEXIST, lambda: os.open(d / "full" / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
            (errno.ENOTEMPTY, lambda: (d / "full").rmdir()),
            (errno.ENOTDIR, lambda: (d / "full" / "f" / "x").mkdir()),
        ]
        for code, action in cases:
            with pytest.raises(OSError) as caught:
                action()
            assert caught.value.errno == code, action
        assert recorder.ops == before


def test_reads_cross_nothing(base: Path) -> None:
    recorder = Recorder()
    with mounted(base / "m", recorder) as mount:
        d = mount.path
        write_file(d / "f", b"data" * 1000)
        os.symlink("f", d / "l")
        os.setxattr(d / "f", "user.k", b"v")
        before = list(recorder.ops)
        assert (d / "f").read_bytes() == b"data" * 1000
        assert os.readlink(d / "l") == "f"
        assert os.getxattr(d / "f", "user.k") == b"v"
        assert sorted(os.listdir(d)) == ["f", "l"]
        os.statvfs(d)
        os.stat(d / "f")
        assert recorder.ops == before


def test_wait_points_follow_what_the_application_asked(base: Path) -> None:
    recorder = Recorder()
    with mounted(base / "m", recorder) as mount:
        d = mount.path
        fd = os.open(d / "plain", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"x")
        write_ticket = len(recorder.ops)
        assert recorder.waits[-1] == (write_ticket, WaitPoint.WRITE)
        os.fdatasync(fd)
        assert recorder.ops[-1] == Fsync(0, "plain", datasync=True)
        assert recorder.waits[-1] == (len(recorder.ops), WaitPoint.DURABLE)
        os.write(fd, b"y")
        last_write = len(recorder.ops)
        os.close(fd)
        assert recorder.waits[-1] == (last_write, WaitPoint.CLOSE)

        fd = os.open(d / "synced", os.O_WRONLY | os.O_CREAT | os.O_DSYNC, 0o644)
        mark = len(recorder.ops)
        os.write(fd, b"durable")
        # The kernel follows an O_DSYNC write with an fdatasync of its own: both are durable.
        assert recorder.ops[mark:] == [Write(0, "synced", 0, b"durable", sync=True),
                                       Fsync(0, "synced", datasync=True)]  # fmt: skip
        assert recorder.waits[-2:] == [(mark + 1, WaitPoint.DURABLE), (mark + 2, WaitPoint.DURABLE)]
        os.close(fd)

        fd = os.open(d / "synced", os.O_RDONLY)
        count = len(recorder.waits)
        os.close(fd)
        assert len(recorder.waits) == count, "a close with nothing written waits for nothing"


def test_a_refused_wait_fails_the_application_with_eio(base: Path) -> None:
    recorder = Recorder()
    with mounted(base / "m", recorder) as mount:
        fd = os.open(mount.path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
        recorder.fail = True
        with pytest.raises(OSError) as caught:
            os.write(fd, b"never acknowledged")
        assert caught.value.errno == errno.EIO
        with pytest.raises(OSError) as caught:
            os.mkdir(mount.path / "d")
        assert caught.value.errno == errno.EIO
        recorder.fail = False
        os.close(fd)


EXCLUDES = ("*.tmp", "cache/")


def test_excluded_paths_are_served_but_not_mirrored(base: Path) -> None:
    recorder = Recorder()
    with mounted(base / "m", recorder, EXCLUDES) as mount:
        d = mount.path
        write_file(d / "x.tmp", b"scratch")
        os.chmod(d / "x.tmp", 0o600)
        os.setxattr(d / "x.tmp", "user.k", b"v")
        (d / "cache" / "deep").mkdir(parents=True)
        write_file(d / "cache" / "deep" / "f", b"cached")
        os.truncate(d / "cache" / "deep" / "f", 2)
        fd = os.open(d / "cache" / "deep" / "f", os.O_RDWR)
        os.fsync(fd)
        os.close(fd)
        os.unlink(d / "x.tmp")
        assert (d / "cache" / "deep" / "f").read_bytes() == b"ca"
        assert recorder.ops == []
        write_file(d / "kept", b"kept")
        assert [type(op) for op in recorder.ops] == [Create, Write]


def test_renames_across_the_exclusion_boundary_keep_the_peer_equal(base: Path) -> None:
    recorder = Recorder()
    mirrored, rebuilt = base / "m", base / "rebuilt"
    payload = os.urandom(CHUNK * 2 + 5000)
    with mounted(mirrored, recorder, EXCLUDES) as mount:
        d = mount.path
        write_file(d / "w.tmp", payload)
        os.chmod(d / "w.tmp", 0o604)
        os.setxattr(d / "w.tmp", "user.k", b"v")
        (d / "cache" / "sub").mkdir(parents=True)
        write_file(d / "cache" / "sub" / "f", b"in a cache")
        write_file(d / "cache" / "skip.tmp", b"never")
        os.symlink("sub/f", d / "cache" / "link")
        assert recorder.ops == []
        os.rename(d / "w.tmp", d / "w.bin")  # out of an excluded name: sent whole
        sent = [op for op in recorder.ops if isinstance(op, Write)]
        assert all(len(op.data) <= CHUNK for op in sent) and len(sent) == 3
        assert SetXattr(0, "w.bin", "user.k", b"v") in recorder.ops
        os.rename(d / "cache", d / "kept")  # a directory: sent recursively
        assert Mkdir(0, "kept", 0o755, 0, 0) in recorder.ops
        assert not any(op.path.endswith("skip.tmp") for op in recorder.ops)
        (d / "kept" / "sub2").mkdir()
        os.rename(d / "kept" / "sub2", d / "kept" / "cache")  # into an excluded name
        assert recorder.ops[-1] == Rmdir(0, "kept/sub2")
        write_file(d / "gone", b"soon excluded")
        os.rename(d / "gone", d / "gone.tmp")
        assert recorder.ops[-1:] == [Unlink(0, "gone")]
        for n, path in enumerate(sorted(d.rglob("*"), key=lambda p: -len(p.parts))):
            os.utime(path, ns=(n, n), follow_symlinks=False)
    ex = Excludes(EXCLUDES)
    skip = lambda rel: rel != "." and ex.excluded(rel, (mirrored / rel).is_dir())  # noqa: E731
    replay(recorder.ops, rebuilt)
    got = snapshot(rebuilt, skip)
    want = snapshot(mirrored, skip)
    del got["."], want["."]  # the top's mtime moved with excluded entries, not mirrored
    assert got == want
    assert (rebuilt / "w.bin").read_bytes() == payload
    assert recorder.unannounced == []


def test_two_mounts_in_one_process_and_an_idempotent_stop(base: Path) -> None:
    first, second = Recorder(), Recorder()
    with mounted(base / "one", first) as one, mounted(base / "two", second) as two:
        write_file(one.path / "f", b"1")
        write_file(two.path / "g", b"2")
        assert one.dir_fd >= 0 and two.dir_fd >= 0
        # Different directories are different mounts: the kernel refuses the rename.
        with pytest.raises(OSError) as caught:
            os.rename(one.path / "f", two.path / "f")
        assert caught.value.errno == errno.EXDEV
        one.stop()
        one.stop()
        assert one.dir_fd == -1
    assert [op.path for op in first.ops] == ["f", "f"]
    assert [op.path for op in second.ops] == ["g", "g"]


STALE_MOUNTER = """
import sys, time
from pathlib import Path
from agent.mirror.excludes import Excludes
from agent.mirror.fs import MirrorMount
from agent.mirror.replicator import LocalReplicator
MirrorMount(Path(sys.argv[1]), 0, LocalReplicator(), Excludes([])).start()
print("mounted", flush=True)
time.sleep(60)
"""


def test_a_mount_left_by_a_killed_daemon_is_cleared(base: Path) -> None:
    target = base / "stale"
    target.mkdir()
    assert clear_stale_mount(target) is False
    root = Path(__file__).resolve().parents[4]
    daemon = subprocess.Popen(
        [sys.executable, "-c", STALE_MOUNTER, str(target)],
        cwd=root, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert daemon.stdout is not None
        assert daemon.stdout.readline().strip() == "mounted"
        daemon.kill()
        daemon.wait(timeout=10)
        with pytest.raises(OSError) as caught:
            os.stat(target)
        assert caught.value.errno == errno.ENOTCONN
        assert clear_stale_mount(target) is True
        assert os.stat(target).st_ino
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=10)
        if daemon.stdout is not None:
            daemon.stdout.close()
        clear_stale_mount(target)


def test_local_replicator_orders_and_never_waits(base: Path) -> None:
    local = LocalReplicator()
    with mounted(base / "m", local) as mount:
        write_file(mount.path / "f", b"fast")
        assert (mount.path / "f").read_bytes() == b"fast"
    assert (base / "m" / "f").read_bytes() == b"fast"
