"""The applier does on a real directory what the primary's syscalls did, and nothing outside it."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import mirror_ops as mo
from agent.mirror import beneath
from agent.mirror.apply import RENAME_EXCHANGE, RENAME_NOREPLACE, Applier, ApplyError

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
AS_ROOT = os.geteuid() == 0
ME = (os.getuid(), os.getgid())  # owners anyone may give, so tests not marked root run as anyone
needs_root = pytest.mark.root


@dataclass
class Area:
    """A replicated directory open as the applier's root, with a sentinel directory beside it."""

    root: Path
    outside: Path
    fd: int
    applier: Applier


def open_area(base: Path) -> Area:
    outside = base / "outside"
    outside.mkdir(parents=True)
    (outside / "secret").write_bytes(b"secret")
    os.chmod(outside / "secret", 0o640)
    root = base / "root"
    root.mkdir()
    (root / "out").symlink_to(outside)
    (root / "out_rel").symlink_to("../outside")
    (root / "out_file").symlink_to(outside / "secret")
    (root / "real").write_bytes(b"real")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    return Area(root, outside, fd, Applier([fd]))


def close_area(area: Area) -> None:
    area.applier.close()
    os.close(area.fd)


@pytest.fixture
def area(tmp_path: Path) -> Iterator[Area]:
    opened = open_area(tmp_path)
    try:
        yield opened
    finally:
        close_area(opened)


def snapshot(top: Path) -> dict[str, tuple[object, ...]]:
    """Everything replication must reproduce, by relative path (times and inode numbers aside)."""
    entries: dict[str, tuple[object, ...]] = {}
    links: dict[int, list[str]] = {}

    def visit(path: Path, rel: str) -> None:
        st_ = os.lstat(path)
        kind = stat.S_IFMT(st_.st_mode)
        names = sorted(os.listxattr(path, follow_symlinks=False))
        xattrs = tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)
        info: tuple[object, ...] = (kind, stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid, xattrs)
        if stat.S_ISREG(kind):
            links.setdefault(st_.st_ino, []).append(rel)
            info += (st_.st_size, hashlib.sha256(path.read_bytes()).hexdigest(), st_.st_ino)
        elif stat.S_ISLNK(kind):
            # the area's own absolute links differ only by where the area is
            info += (os.readlink(path).replace(str(top.parent), "<area>"),)
        elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
            info += (st_.st_rdev,)
        entries[rel] = info
        if stat.S_ISDIR(kind):
            for child in sorted(os.listdir(path)):
                visit(path / child, f"{rel}/{child}" if rel else child)

    visit(top, "")
    # inode numbers differ between trees: keep only which names share one
    return {
        rel: (*info[:-1], tuple(sorted(links[info[-1]])))  # type: ignore[index]
        if stat.S_ISREG(info[0])  # type: ignore[arg-type]
        else info
        for rel, info in entries.items()
    }


def times(path: Path) -> tuple[int, int]:
    st_ = os.lstat(path)
    return st_.st_atime_ns, st_.st_mtime_ns


# --- every operation, compared with the same syscalls done directly -------------------------

T1 = (1_600_000_000_123_456_789, 1_500_000_000_987_654_321)


def ops_for_every_type() -> list[mo.Op]:
    return [
        mo.Mkdir(0, "d", 0o750, 1000, 1001),
        mo.Mkdir(0, "sg", 0o2775, 0, 1001),
        mo.Mkdir(0, "d/empty", 0o700, 0, 0),
        mo.Create(0, "d/f", 0o640, 1000, 1001),
        mo.Write(0, "d/f", 0, b"hello"),
        mo.Write(0, "d/f", 10, b"world", sync=True),
        mo.Truncate(0, "d/f", 12),
        mo.Create(0, "big", 0o600, 0, 0),
        mo.Fallocate(0, "big", 0, 0, 65536),
        mo.Fallocate(0, "big", FALLOC_FL_KEEP_SIZE, 65536, 8192),
        mo.Write(0, "big", 0, b"\xff" * 8192),
        mo.Fallocate(0, "big", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096),
        mo.Fallocate(0, "big", FALLOC_FL_ZERO_RANGE, 4096, 100),
        mo.Link(0, "d/f", "hard"),
        mo.Symlink(0, "s", "d/f", 1000, 1001),
        mo.Symlink(0, "dangling", "/nonexistent/../x", 0, 0),
        mo.Chmod(0, "s", 0o600),
        mo.Chmod(0, "d/f", 0o4755),
        mo.Chown(0, "s", 1002, -1),
        mo.Chown(0, "d/empty", -1, 1003),
        mo.SetXattr(0, "d/f", "user.a", b"1"),
        mo.SetXattr(0, "d/f", "user.b", b"\x00\x01"),
        mo.RemoveXattr(0, "d/f", "user.a"),
        mo.SetXattr(0, "", "user.root", b"r"),
        mo.SetXattr(0, "d", "user.dir", b"x"),
        mo.SetXattr(0, "s", "trusted.t", b"on the link itself"),
        mo.Mknod(0, "fifo", stat.S_IFIFO | 0o644, 0, 1000, 1000),
        mo.Mknod(0, "sock", stat.S_IFSOCK | 0o600, 0, 0, 0),
        mo.Mknod(0, "null", stat.S_IFCHR | 0o666, os.makedev(1, 3), 0, 0),
        mo.Create(0, "x", 0o644, 0, 0),
        mo.Write(0, "x", 0, b"x"),
        mo.Create(0, "y", 0o644, 0, 0),
        mo.Rename(0, "x", "y", RENAME_EXCHANGE),
        mo.Rename(0, "y", "z", RENAME_NOREPLACE),
        mo.Rename(0, "d/f", "d/g"),
        mo.Unlink(0, "hard"),
        mo.Mkdir(0, "gone", 0o755, 0, 0),
        mo.Rmdir(0, "gone"),
        mo.Fsync(0, "d/g"),
        mo.Fsync(0, "d", datasync=True),
        mo.Fsync(0, ""),
        mo.Fsync(0, "s"),
        mo.Fsync(0, "fifo"),
        mo.Chmod(0, "", 0o751),
        mo.Chown(0, "", 1004, 1005),
        mo.Utimens(0, "d/g", *T1),
        mo.Utimens(0, "s", *T1),
        mo.Utimens(0, "", *T1),
    ]


def do_directly(root: Path) -> None:
    """What the primary's passthrough does for the same operations, with plain os calls."""
    old_umask = os.umask(0o022)
    try:
        os.mkdir(root / "d")
        os.chown(root / "d", 1000, 1001)
        os.chmod(root / "d", 0o750)
        os.mkdir(root / "sg")
        os.chown(root / "sg", 0, 1001)
        os.chmod(root / "sg", 0o2775)
        os.mkdir(root / "d" / "empty", 0o700)
        fd = os.open(root / "d" / "f", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        os.fchown(fd, 1000, 1001)
        os.pwrite(fd, b"hello", 0)
        os.pwrite(fd, b"world", 10)
        os.ftruncate(fd, 12)
        os.close(fd)
        fd = os.open(root / "big", os.O_WRONLY | os.O_CREAT, 0o600)
        os.posix_fallocate(fd, 0, 65536)
        subprocess.run(["fallocate", "-n", "-o", "65536", "-l", "8192", root / "big"], check=True)
        os.pwrite(fd, b"\xff" * 8192, 0)
        subprocess.run(["fallocate", "-p", "-o", "0", "-l", "4096", root / "big"], check=True)
        subprocess.run(["fallocate", "-z", "-o", "4096", "-l", "100", root / "big"], check=True)
        os.close(fd)
        os.link(root / "d" / "f", root / "hard")
        os.symlink("d/f", root / "s")
        os.lchown(root / "s", 1000, 1001)
        os.symlink("/nonexistent/../x", root / "dangling")
        os.chmod(root / "d" / "f", 0o4755)
        os.lchown(root / "s", 1002, -1)
        os.chown(root / "d" / "empty", -1, 1003)
        os.setxattr(root / "d" / "f", "user.b", b"\x00\x01")
        os.setxattr(root, "user.root", b"r")
        os.setxattr(root / "d", "user.dir", b"x")
        os.setxattr(root / "s", "trusted.t", b"on the link itself", follow_symlinks=False)
        os.mkfifo(root / "fifo")
        os.lchown(root / "fifo", 1000, 1000)
        os.chmod(root / "fifo", 0o644)
        os.mknod(root / "sock", stat.S_IFSOCK | 0o600)
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.chmod(root / "null", 0o666)
        (root / "x").touch()  # x and y exchanged, then y renamed to z
        (root / "z").write_bytes(b"x")
        os.rename(root / "d" / "f", root / "d" / "g")
        os.unlink(root / "hard")
        os.chmod(root, 0o751)
        os.chown(root, 1004, 1005)
        os.utime(root / "d" / "g", ns=T1)
        os.utime(root / "s", ns=T1, follow_symlinks=False)
        os.utime(root, ns=T1)
    finally:
        os.umask(old_umask)


@needs_root
def test_every_operation_does_what_the_syscalls_do_directly(tmp_path: Path) -> None:
    applied = open_area(tmp_path / "a")
    direct = open_area(tmp_path / "b")
    old_umask = os.umask(0o077)  # the applier's modes must not depend on the umask
    try:
        for op in ops_for_every_type():
            applied.applier.apply(op)
    finally:
        os.umask(old_umask)
        close_area(applied)
        close_area(direct)
    do_directly(direct.root)
    for rel in ("d/g", "s", ""):  # before anything reads them and moves their atime
        assert times(applied.root / rel) == times(direct.root / rel) == T1
    assert snapshot(applied.root) == snapshot(direct.root)
    assert (applied.root / "d" / "g").read_bytes() == b"hello\x00\x00\x00\x00\x00wo"
    assert snapshot(applied.outside) == snapshot(direct.outside)


# --- replays ------------------------------------------------------------------------------

REPLAYED: list[mo.Op] = [
    mo.Mkdir(0, "d", 0o755, *ME),
    mo.Create(0, "d/a", 0o644, *ME),
    mo.Write(0, "d/a", 0, b"first"),
    mo.Create(0, "d/b", 0o600, *ME),
    mo.Write(0, "d/b", 3, b"bee"),
    mo.Rename(0, "d/a", "d/c"),
    mo.Link(0, "d/c", "d/h"),
    mo.Symlink(0, "d/s", "c", *ME),
    mo.Mknod(0, "d/p", stat.S_IFIFO | 0o600, 0, *ME),
    mo.Write(0, "d/c", 5, b" and more"),
    mo.Unlink(0, "d/b"),
    mo.Mkdir(0, "d/tmp", 0o700, *ME),
    mo.Rmdir(0, "d/tmp"),
    mo.Create(0, "d/a", 0o644, *ME),
    mo.Write(0, "d/a", 0, b"second a"),
    mo.Rename(0, "d/a", "d/c", RENAME_NOREPLACE),
]


def test_replaying_a_sequence_ends_in_the_same_tree(area: Area) -> None:
    for op in REPLAYED:
        area.applier.apply(op)
    once = snapshot(area.root)
    for op in REPLAYED:
        area.applier.apply(op)
    assert snapshot(area.root) == once
    assert (area.root / "d" / "c").read_bytes() == b"second a"
    assert (area.root / "d" / "h").read_bytes() == b"first and more"


def test_namespace_operations_already_applied_are_done(area: Area) -> None:
    apply = area.applier.apply
    for op in REPLAYED:
        apply(op)
    apply(mo.Link(0, "d/c", "d/l"))
    once = snapshot(area.root)
    apply(mo.Unlink(0, "d/b"))  # missing name
    apply(mo.Unlink(0, "nodir/b"))  # missing parent
    apply(mo.Rmdir(0, "d/tmp"))
    apply(mo.Mkdir(0, "d", 0o755, *ME))
    apply(mo.Rename(0, "d/a", "d/c"))  # source gone, target there
    apply(mo.Link(0, "d/c", "d/l"))  # the same inode already
    apply(mo.Symlink(0, "d/s", "c", *ME))
    apply(mo.Mknod(0, "d/p", stat.S_IFIFO | 0o600, 0, *ME))
    assert snapshot(area.root) == once


def test_a_replay_replaces_a_later_state_at_the_name(area: Area) -> None:
    apply = area.applier.apply
    apply(mo.Symlink(0, "n", "real", *ME))
    apply(mo.Create(0, "n", 0o600, *ME))  # a file replaces the symlink (not its target)
    assert stat.S_ISREG(os.lstat(area.root / "n").st_mode)
    assert (area.root / "real").read_bytes() == b"real"
    apply(mo.Mknod(0, "f", stat.S_IFIFO | 0o600, 0, *ME))
    apply(mo.Create(0, "f", 0o600, *ME))  # a FIFO is replaced, never opened
    assert stat.S_ISREG(os.lstat(area.root / "f").st_mode)
    apply(mo.Create(0, "other", 0o600, *ME))
    apply(mo.Link(0, "real", "other"))
    assert os.path.samefile(area.root / "real", area.root / "other")
    apply(mo.Symlink(0, "other", "elsewhere", *ME))
    assert os.readlink(area.root / "other") == "elsewhere"


def test_what_cannot_be_a_replay_is_an_error(area: Area) -> None:
    apply = area.applier.apply
    apply(mo.Mkdir(0, "full", 0o755, *ME))
    apply(mo.Create(0, "full/x", 0o644, *ME))
    with pytest.raises(ApplyError, match=r"Rmdir <directory 0>/full: .*\(ENOTEMPTY\)") as caught:
        apply(mo.Rmdir(0, "full"))
    assert caught.value.errno == errno.ENOTEMPTY
    with pytest.raises(ApplyError, match=r"Rename <directory 0>/nope -> <directory 0>/nah"):
        apply(mo.Rename(0, "nope", "nah"))
    with pytest.raises(ApplyError, match="ENOENT"):
        apply(mo.Write(0, "missing", 0, b"x"))
    with pytest.raises(ApplyError, match="EEXIST"):
        apply(mo.Mkdir(0, "real", 0o755, *ME))
    with pytest.raises(ApplyError, match="EISDIR"):
        apply(mo.Write(0, "full", 0, b"x"))
    with pytest.raises(ApplyError, match=r"Unlink .*EISDIR"):
        apply(mo.Unlink(0, "full"))


def test_writes_to_a_fifo_or_device_are_refused_without_opening_it(area: Area) -> None:
    apply = area.applier.apply
    apply(mo.Mknod(0, "fifo", stat.S_IFIFO | 0o600, 0, *ME))
    with pytest.raises(ApplyError, match="a FIFO here, not a file"):
        apply(mo.Write(0, "fifo", 0, b"would block"))
    with pytest.raises(ApplyError, match="a FIFO here"):
        apply(mo.Truncate(0, "fifo", 0))


# --- the descriptor cache -------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_name_given_a_new_file_gets_the_writes(area: Area) -> None:
    apply = area.applier.apply
    apply(mo.Create(0, "f", 0o644, *ME))
    apply(mo.Write(0, "f", 0, b"old"))
    apply(mo.Rename(0, "f", "moved"))
    apply(mo.Create(0, "f", 0o644, *ME))
    apply(mo.Write(0, "f", 0, b"new"))
    apply(mo.Mkdir(0, "d", 0o755, *ME))
    apply(mo.Create(0, "d/g", 0o644, *ME))
    apply(mo.Write(0, "d/g", 0, b"in d"))
    apply(mo.Rename(0, "d", "e"))
    apply(mo.Mkdir(0, "d", 0o755, *ME))
    apply(mo.Create(0, "d/g", 0o644, *ME))
    apply(mo.Write(0, "d/g", 0, b"new d"))
    assert (area.root / "moved").read_bytes() == b"old"
    assert (area.root / "f").read_bytes() == b"new"
    assert (area.root / "e" / "g").read_bytes() == b"in d"
    assert (area.root / "d" / "g").read_bytes() == b"new d"


def test_writes_through_a_symlinked_directory_see_later_namespace_changes(area: Area) -> None:
    apply = area.applier.apply
    apply(mo.Mkdir(0, "d", 0o755, *ME))
    apply(mo.Create(0, "d/a", 0o644, *ME))
    apply(mo.Symlink(0, "s", "d", *ME))
    apply(mo.Write(0, "s/a", 0, b"via s"))
    apply(mo.Unlink(0, "d/a"))
    with pytest.raises(ApplyError, match="ENOENT"):
        apply(mo.Write(0, "s/a", 0, b"to a removed file"))
    apply(mo.Create(0, "d/a", 0o644, *ME))
    apply(mo.Write(0, "s/a", 0, b"new"))
    assert (area.root / "d" / "a").read_bytes() == b"new"


def test_the_cache_is_bounded_and_closed(area: Area) -> None:
    before = open_fds()
    for i in range(300):
        area.applier.apply(mo.Create(0, f"f{i}", 0o644, *ME))
        area.applier.apply(mo.Write(0, f"f{i}", 0, b"x"))
    assert open_fds() - before <= 128
    area.applier.close()
    assert open_fds() == before
    area.applier.apply(mo.Write(0, "f0", 1, b"y"))  # usable after close: reopens
    assert (area.root / "f0").read_bytes() == b"xy"


# --- escapes --------------------------------------------------------------------------------

OUTSIDE_PATHS = ["../x", "/etc/x", "out/secret", "out_rel/secret", "out/new"]


def ops_on(path: str) -> list[mo.Op]:
    return [
        mo.Write(0, path, 0, b"pwned"),
        mo.Truncate(0, path, 0),
        mo.Create(0, path, 0o666, *ME),
        mo.Mkdir(0, path, 0o777, *ME),
        mo.Unlink(0, path),
        mo.Rmdir(0, path),
        mo.Rename(0, path, "stolen"),
        mo.Rename(0, "real", path),
        mo.Rename(0, "real", path, RENAME_EXCHANGE),
        mo.Link(0, path, "stolen"),
        mo.Link(0, "real", path),
        mo.Symlink(0, path, "x", *ME),
        mo.Chmod(0, path, 0o777),
        mo.Chown(0, path, 1234, 1234),
        mo.Utimens(0, path, 0, 0),
        mo.SetXattr(0, path, "user.pwned", b"1"),
        mo.RemoveXattr(0, path, "user.x"),
        mo.Fallocate(0, path, 0, 0, 4096),
        mo.Fsync(0, path),
        mo.Mknod(0, path, stat.S_IFIFO | 0o666, 0, *ME),
    ]


@pytest.mark.parametrize("path", OUTSIDE_PATHS)
def test_no_operation_reaches_outside_the_directory(area: Area, path: str) -> None:
    os.setxattr(area.outside / "secret", "user.x", b"keep")
    outside = snapshot(area.outside)
    outside_times = times(area.outside / "secret")
    for op in ops_on(path):
        with pytest.raises(ApplyError, match="refused") as caught:
            area.applier.apply(op)
        assert caught.value.errno is None
        assert type(op).__name__ in str(caught.value)
    assert snapshot(area.outside) == outside
    assert times(area.outside / "secret") == outside_times
    assert not (area.root / "stolen").exists()


def test_without_openat2_the_walk_gives_the_same_tree_and_refuses_the_same_escapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_openat2 = open_area(tmp_path / "a")
    try:
        for op in REPLAYED:
            with_openat2.applier.apply(op)
    finally:
        close_area(with_openat2)
    monkeypatch.setattr(beneath, "_have_openat2", False)  # as on a kernel older than 5.6
    walked = open_area(tmp_path / "b")
    try:
        for op in REPLAYED:
            walked.applier.apply(op)
        for path in OUTSIDE_PATHS:
            for op in ops_on(path):
                with pytest.raises(ApplyError, match="refused"):
                    walked.applier.apply(op)
    finally:
        close_area(walked)
    assert snapshot(walked.root) == snapshot(with_openat2.root)
    assert snapshot(walked.outside) == snapshot(with_openat2.outside)


def test_a_final_symlink_to_outside_is_acted_on_itself_never_followed(area: Area) -> None:
    os.setxattr(area.outside / "secret", "user.x", b"keep")
    outside = snapshot(area.outside)
    outside_times = times(area.outside / "secret")
    for op in ops_on("out_file"):
        with contextlib.suppress(ApplyError):  # some act on the link itself, some refuse
            area.applier.apply(op)
        if not (area.root / "out_file").is_symlink():
            (area.root / "out_file").unlink(missing_ok=True)
            (area.root / "out_file").symlink_to(area.outside / "secret")
        if not (area.root / "real").exists():
            (area.root / "real").write_bytes(b"real")
    assert snapshot(area.outside) == outside
    assert times(area.outside / "secret") == outside_times


def test_an_unknown_directory_index_is_an_error(area: Area) -> None:
    with pytest.raises(ApplyError, match="replicated directory 3 is not one of this module's 1"):
        area.applier.apply(mo.Write(3, "x", 0, b""))


def test_errors_name_the_operation_the_directory_and_the_file(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    applier = Applier([fd], root_names=["/srv/data"])
    try:
        with pytest.raises(ApplyError) as caught:
            applier.apply(mo.Write(0, os.fsdecode(b"x\xff.db"), 4096, b"abc"))
        assert str(caught.value) == (
            "Write /srv/data/x\\xff.db at 4096 (3 bytes): No such file or directory (ENOENT)"
        )
        assert caught.value.errno == errno.ENOENT
    finally:
        applier.close()
        os.close(fd)


# --- the disk underneath --------------------------------------------------------------------


@needs_root
def test_a_full_disk_is_an_error_naming_the_file(tmp_path: Path) -> None:
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tandem-test", mount_point], check=True
    )
    try:
        fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
        applier = Applier([fd], root_names=["data"])
        try:
            applier.apply(mo.Create(0, "x.db", 0o600, *ME))
            chunk = b"\xaa" * (256 << 10)
            with pytest.raises(ApplyError) as caught:
                for i in range(16):
                    applier.apply(mo.Write(0, "x.db", i * len(chunk), chunk))
            assert caught.value.errno == errno.ENOSPC
            assert str(caught.value).startswith("Write data/x.db at ")
            assert "No space left on device (ENOSPC)" in str(caught.value)
            applier.sync()
        finally:
            applier.close()
            os.close(fd)
    finally:
        subprocess.run(["umount", "-l", mount_point], check=True)


def test_offsets_beyond_4_gib_make_sparse_files(area: Area) -> None:
    offset = 5 << 30
    area.applier.apply(mo.Create(0, "sparse", 0o644, *ME))
    area.applier.apply(mo.Write(0, "sparse", offset, b"far away", sync=True))
    area.applier.apply(mo.Fsync(0, "sparse", datasync=True))
    st_ = os.stat(area.root / "sparse")
    assert st_.st_size == offset + 8
    assert st_.st_blocks * 512 < 1 << 20
    with open(area.root / "sparse", "rb") as f:
        f.seek(offset - 2)
        assert f.read() == b"\x00\x00far away"
    area.applier.apply(mo.Truncate(0, "sparse", offset + 3))
    assert os.stat(area.root / "sparse").st_size == offset + 3


def test_sync_and_close_are_safe_to_repeat(area: Area) -> None:
    area.applier.sync()
    area.applier.close()
    area.applier.close()


# --- random sequences -----------------------------------------------------------------------

# mostly names that exist or will, some through symlinks, a few leading outside
NAMES = ["a", "b", "real", "d", "d/a", "s", "s/a", "d/d/a", "out", "out/x", "../x"]
paths = st.sampled_from(NAMES[:3]) | st.sampled_from(NAMES)
# as anyone but root, a directory without the owner's rwx would hide the tree from the test
modes = st.sampled_from([0o600, 0o644, 0o755, 0o4755, 0o1777] if AS_ROOT else [0o700, 0o4755])
ids = st.sampled_from([-1, 0, 1000]) if AS_ROOT else st.just(-1)

operations = st.one_of(
    st.builds(mo.Create, st.just(0), paths, modes, ids, ids),
    st.builds(
        mo.Write,
        st.just(0),
        paths,
        st.integers(0, 70_000),
        st.binary(max_size=64),
        st.booleans(),
    ),
    st.builds(mo.Truncate, st.just(0), paths, st.integers(-1, 100_000)),
    st.builds(mo.Mkdir, st.just(0), paths, modes, ids, ids),
    st.builds(mo.Unlink, st.just(0), paths),
    st.builds(mo.Rmdir, st.just(0), paths),
    st.builds(mo.Rename, st.just(0), paths, paths, st.sampled_from([0, 1, 2, 3])),
    st.builds(mo.Link, st.just(0), paths, paths),
    st.builds(
        mo.Symlink, st.just(0), paths, st.sampled_from(["a", "d", "../..", "/", "d/a"]), ids, ids
    ),
    st.builds(mo.Chmod, st.just(0), paths | st.just(""), modes),
    st.builds(mo.Chown, st.just(0), paths | st.just(""), ids, ids),
    st.builds(
        mo.Utimens, st.just(0), paths | st.just(""), st.integers(0, 2**62), st.integers(0, 2**62)
    ),
    st.builds(
        mo.SetXattr,
        st.just(0),
        paths | st.just(""),
        st.sampled_from(["user.a", "user.b", "trusted.t", "bogus.x"]),
        st.binary(max_size=16),
        st.sampled_from([0, 1, 2]),
    ),
    st.builds(mo.RemoveXattr, st.just(0), paths, st.sampled_from(["user.a", "trusted.t"])),
    st.builds(
        mo.Fallocate,
        st.just(0),
        paths,
        st.sampled_from([0, 1, 3, 0x10, 0x40]),
        st.integers(-1, 70_000),
        st.integers(0, 70_000),
    ),
    st.builds(mo.Fsync, st.just(0), paths | st.just(""), st.booleans()),
    st.builds(
        mo.Mknod,
        st.just(0),
        paths,
        st.sampled_from([stat.S_IFIFO | 0o644, stat.S_IFSOCK | 0o600, stat.S_IFREG | 0o600]),
        st.just(0),
        ids,
        ids,
    ),
)
wrong_root = st.builds(mo.Write, st.integers(1, 2), paths, st.just(0), st.just(b"x"))


def outcome(applier: Applier, op: mo.Op) -> int | str | None:
    """None when applied, else the error's errno (or "escape")."""
    try:
        applier.apply(op)
    except ApplyError as exc:
        assert str(exc)
        return "escape" if exc.errno is None else exc.errno
    return None


def run_sequence(ops: list[mo.Op], base: Path) -> tuple[list[int | str | None], Area]:
    area = open_area(base)
    try:
        return [outcome(area.applier, op) for op in ops], area
    finally:
        close_area(area)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operations | wrong_root, max_size=25))
def test_random_sequences_give_identical_trees_and_only_apply_errors(ops: list[mo.Op]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        first, one = run_sequence(ops, base / "1")
        second, two = run_sequence(ops, base / "2")
        assert first == second
        assert snapshot(one.root) == snapshot(two.root)
        for area in (one, two):
            assert (area.outside / "secret").read_bytes() == b"secret"
            assert sorted(os.listdir(area.outside)) == ["secret"]
            assert stat.S_IMODE(os.stat(area.outside / "secret").st_mode) == 0o640


def test_a_mirrored_rmdir_takes_this_nodes_excluded_names_with_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "cache" / "deep").mkdir(parents=True)
    (root / "cache" / "x.tmp").write_text("node-local scratch")
    (root / "cache" / "deep" / "y.tmp").write_text("more scratch")
    (root / "keep").mkdir()
    (root / "keep" / "a.tmp").write_text("this node's own, listed before the kept file")
    (root / "keep" / "data.db").write_text("mirrored data")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        applier = Applier([fd], excluded=[lambda path, is_dir: path.endswith(".tmp")])
        applier.apply(mo.Rmdir(0, "cache"))
        assert not (root / "cache").exists()
        with pytest.raises(ApplyError) as refused:
            applier.apply(mo.Rmdir(0, "keep"))
        assert refused.value.errno == errno.ENOTEMPTY
        assert (root / "keep" / "data.db").read_text() == "mirrored data"
        # A refused rmdir removes nothing, this node's excluded files included.
        assert (root / "keep" / "a.tmp").exists()
    finally:
        os.close(fd)
