"""The mirror file system: a passthrough FUSE mount over a replicated directory itself.

The directory is opened before the mount covers it, and every operation works
beneath that descriptor (dir_fd=..., never following a final symlink), so the
daemon never walks into its own mount. Each mutation is applied locally and
enqueued to the Replicator while `ordered()` is held, so the stream's order is
the local order; the wait the mode demands happens after the lock is released.
A local error reaches the application as the same errno and enqueues nothing.

Paths excluded by the directory's rules are served but not mirrored; a rename
that moves a tree across the exclusion boundary sends it whole, or removes it
from the peer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mfusepy

from agent.core.mirror_ops import (
    Buffer,
    Chmod,
    Chown,
    Create,
    Fallocate,
    Fsync,
    Link,
    Mkdir,
    Mknod,
    Op,
    RemoveXattr,
    Rename,
    Rmdir,
    SetXattr,
    Symlink,
    Truncate,
    Unlink,
    Utimens,
    Write,
    split_write,
)
from agent.mirror.excludes import Excludes
from agent.mirror.replicator import Replicator, WaitPoint

CHUNK = 1 << 20  # a tree sent whole travels in writes of at most this size
FRAME_DATA = 256 << 10  # an application's write travels in frames of at most this much data
MAX_WRITE = 1 << 20  # the most the kernel passes in one write request (fewer acks to wait for)
RENAME_EXCHANGE = 2
FUSE_CAP_WRITEBACK_CACHE = 1 << 16
# libfuse hands UTIME_NOW / UTIME_OMIT through as tv_nsec with tv_sec 0; use_ns sums them.
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
# Flags the daemon handles itself (append, truncation, creation) or cannot honour with
# unaligned buffers (direct I/O); the rest go to the real file.
_OWN_FLAGS = os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY | os.O_DIRECT
_SYNC_FLAGS = os.O_SYNC | os.O_DSYNC
_STAT_KEYS = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_rdev")
_STATVFS_KEYS = (
    "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
    "f_files", "f_ffree", "f_favail", "f_namemax",
)  # fmt: skip
FUSE_THREADS = 16  # libfuse workers: blocked waits for acks must not starve other callers

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
_libc.renameat2.argtypes += [ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)


class _Handle:
    """What the daemon remembers of one open file (fh is the real descriptor)."""

    __slots__ = ("append", "excluded", "generation", "last", "sync")

    def __init__(self, flags: int, excluded: bool, generation: int) -> None:
        self.append = bool(flags & os.O_APPEND)
        self.sync = bool(flags & _SYNC_FLAGS)
        self.excluded = excluded
        self.generation = generation
        self.last = 0  # ticket of the last mutation made through this handle


class MirrorFS(mfusepy.Operations):  # type: ignore[misc]
    """The handlers of one replicated directory (`root` is its index in the module)."""

    use_ns = True

    def __init__(self, root: int, dir_fd: int, replicator: Replicator, excludes: Excludes) -> None:
        self.root = root
        self.dir_fd = dir_fd
        self.excludes = excludes
        self.last_ticket = 0  # the newest ticket enqueued by this file system
        self._rep = replicator
        self._ordered = replicator.ordered
        self._handles: dict[int, _Handle] = {}
        self._all_in = excludes.empty
        self._generation = 0  # bumped by renames: cached exclusion answers go stale
        self._proc = f"/proc/self/fd/{dir_fd}/"
        self.initialised = threading.Event()  # set once libfuse's loop serves requests

    # --- helpers ------------------------------------------------------------------------

    def _enqueue(self, op: Op) -> int:
        # Called with ordered() held.
        ticket = self._rep.enqueue(op)
        self.last_ticket = ticket
        return ticket

    def _out(self, rel: str, is_dir: bool | None = None) -> bool:
        """`rel` is not mirrored (its type is looked up when the rules could care)."""
        if self._all_in:
            return False
        if is_dir is None:
            try:
                is_dir = stat.S_ISDIR(os.lstat(rel or ".", dir_fd=self.dir_fd).st_mode)
            except OSError:
                is_dir = False
        return self.excludes.excluded(rel, is_dir)

    def _fh_out(self, handle: _Handle, rel: str) -> bool:
        if self._all_in:
            return False
        if handle.generation != self._generation:
            handle.excluded = self.excludes.excluded(rel, False)
            handle.generation = self._generation
        return handle.excluded

    def _mutate(self, op: Op | None, action: Callable[..., object], *args: Any, **kw: Any) -> None:
        """Apply `action` locally and enqueue `op` (None: not mirrored) as one ordered step."""
        with self._ordered():
            if op is not None:
                self._rep.intend(op)
            action(*args, **kw)
            ticket = self._enqueue(op) if op is not None else 0
        if ticket:
            self._rep.wait(ticket, WaitPoint.WRITE)

    def _owner(self, rel: str) -> tuple[int, int, bool]:
        """Owner of a new node: the caller, or the parent's group where it is set-group-ID."""
        uid, gid, _pid = mfusepy.fuse_get_context()
        parent = os.stat(rel.rpartition("/")[0] or ".", dir_fd=self.dir_fd)
        if parent.st_mode & stat.S_ISGID:
            return uid, parent.st_gid, True
        return uid, gid, False

    def _xpath(self, rel: str) -> tuple[str | int, bool]:
        # os.*xattr take no dir_fd: reach beneath the mount through /proc's link to it.
        return (self._proc + rel, False) if rel else (self.dir_fd, True)

    # --- reads (never mirrored) -------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        if fh is not None:
            st = os.fstat(fh)
        else:
            st = os.stat(path[1:] or ".", dir_fd=self.dir_fd, follow_symlinks=False)
        return {
            "st_mode": st.st_mode,
            "st_ino": st.st_ino,
            "st_nlink": st.st_nlink,
            "st_uid": st.st_uid,
            "st_gid": st.st_gid,
            "st_size": st.st_size,
            "st_rdev": st.st_rdev,
            "st_blocks": st.st_blocks,
            "st_blksize": st.st_blksize,
            "st_atime": st.st_atime_ns,
            "st_mtime": st.st_mtime_ns,
            "st_ctime": st.st_ctime_ns,
        }

    def readlink(self, path: str) -> str:
        return os.readlink(path[1:], dir_fd=self.dir_fd)

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self.dir_fd)
        return {key: getattr(st, key) for key in _STATVFS_KEYS}

    def opendir(self, path: str) -> int:
        return os.open(
            path[1:] or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.dir_fd
        )

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        # With use_ino the kernel needs each entry's inode (0 would hide it) and its type.
        here = {"st_ino": os.fstat(fh).st_ino, "st_mode": stat.S_IFDIR}
        found = [(".", here, 0), ("..", here, 0)]
        with os.scandir(fh) as entries:
            for entry in entries:
                kind = (
                    stat.S_IFDIR
                    if entry.is_dir(follow_symlinks=False)
                    else stat.S_IFREG
                    if entry.is_file(follow_symlinks=False)
                    else stat.S_IFLNK
                    if entry.is_symlink()
                    else 0
                )
                found.append((entry.name, {"st_ino": entry.inode(), "st_mode": kind}, 0))
        return found

    def releasedir(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def read_into(self, buf: memoryview, offset: int, fh: int) -> int:
        """Read straight into libfuse's buffer (no bytes object per read)."""
        return os.preadv(fh, (buf,), offset)

    def lseek(self, path: str, offset: int, whence: int, fh: int) -> int:
        # SEEK_DATA/SEEK_HOLE: the real file knows where its holes are.
        return os.lseek(fh, offset, whence)

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        target, follow = self._xpath(path[1:])
        return os.getxattr(target, name, follow_symlinks=follow)

    def listxattr(self, path: str) -> list[str]:
        target, follow = self._xpath(path[1:])
        return os.listxattr(target, follow_symlinks=follow)

    # --- open files ---------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        rel = path[1:]
        real = (flags & ~_OWN_FLAGS) | os.O_NOFOLLOW | os.O_CLOEXEC
        ticket = 0
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            out = self._out(rel, False)
            with self._ordered():
                if not out:
                    self._rep.intend(Truncate(self.root, rel, 0))
                fd = os.open(rel, real | os.O_TRUNC, dir_fd=self.dir_fd)
                if not out:
                    ticket = self._enqueue(Truncate(self.root, rel, 0))
        else:
            out = self._out(rel, False) if flags & os.O_ACCMODE != os.O_RDONLY else False
            fd = os.open(rel, real, dir_fd=self.dir_fd)
        handle = _Handle(flags, out, self._generation)
        handle.last = ticket
        self._handles[fd] = handle
        if ticket:
            self._rep.wait(ticket, WaitPoint.WRITE)
        return fd

    def create(self, path: str, mode: int, flags: int) -> int:
        rel = path[1:]
        uid, gid, _ = self._owner(rel)
        perm = stat.S_IMODE(mode)
        real = (flags & ~_OWN_FLAGS) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        out = self._out(rel, False)
        ticket = 0
        with self._ordered():
            if not out:
                self._rep.intend(Create(self.root, rel, perm, uid, gid))
            try:
                fd = os.open(rel, real, perm, dir_fd=self.dir_fd)
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                fd = -1  # created meanwhile by another caller: open it as it is
            if fd >= 0:
                # Created as root: the caller owns it, with exactly its mode (no daemon umask).
                os.fchown(fd, uid, gid)
                os.fchmod(fd, perm)
                if not out:
                    ticket = self._enqueue(Create(self.root, rel, perm, uid, gid))
        if fd < 0:
            return self.open(path, flags)
        handle = _Handle(flags, out, self._generation)
        handle.last = ticket
        self._handles[fd] = handle
        if ticket:
            self._rep.wait(ticket, WaitPoint.WRITE)
        return fd

    def write(self, path: str | None, data: Buffer, offset: int, fh: int) -> int:
        handle = self._handles[fh]
        rel = None if path is None else path[1:]
        if rel is not None and self._fh_out(handle, rel):
            rel = None
        ticket, written = 0, 0
        failed: OSError | None = None
        try:
            with self._ordered():
                if handle.append:
                    # The real fd has no O_APPEND (pwrite would ignore the offset): the bytes
                    # land at the end as it is now, and the op says exactly where.
                    offset = os.fstat(fh).st_size
                if rel is None:  # unlinked while open, or excluded
                    return os.pwrite(fh, data, offset)
                self._rep.intend(Write(self.root, rel, offset, data), os.fstat(fh).st_nlink)
                # Enqueued before the local write, so the peer works on its copy meanwhile; a
                # local write that falls short is mended on the peer in the same ordered step.
                for piece in split_write(self.root, rel, offset, data, handle.sync, FRAME_DATA):
                    ticket = self._enqueue(piece)
                try:
                    written = os.pwrite(fh, data, offset)
                except OSError as exc:
                    failed = exc
                if written != len(data):
                    ticket = self._mend(rel, offset, len(data), written) or ticket
        finally:
            if ticket:
                handle.last = ticket
                # Waited for even when the local write or its mending failed: the frames
                # queued lend this request's buffer, which must outlive them.
                self._rep.wait(ticket, WaitPoint.DURABLE if handle.sync else WaitPoint.WRITE)
        if failed is not None:
            raise failed
        return written

    def _mend(self, rel: str, offset: int, size: int, written: int) -> int:
        """The peer was sent `size` bytes at `offset` but only `written` of them landed here:
        send it what this copy holds there now (its old bytes, its length)."""
        fd = os.open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        try:
            length = os.fstat(fd).st_size
            start, end = offset + written, min(offset + size, length)
            ticket = 0
            if end > start:
                ticket = self._enqueue(
                    Write(self.root, rel, start, os.pread(fd, end - start, start))
                )
            if length < offset + size:
                ticket = self._enqueue(Truncate(self.root, rel, length))
            return ticket
        finally:
            os.close(fd)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        rel = path[1:] if path is not None else None
        mirrored = rel is not None and not self._out(rel, False)
        ticket = 0
        with self._ordered():
            if mirrored:
                links = (
                    os.fstat(fh)
                    if fh is not None
                    else os.stat(rel or ".", dir_fd=self.dir_fd, follow_symlinks=False)
                ).st_nlink
                self._rep.intend(Truncate(self.root, rel, length), links)  # type: ignore[arg-type]
            if fh is not None:
                os.ftruncate(fh, length)
            else:
                fd = os.open(
                    rel or ".", os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd
                )
                try:
                    os.ftruncate(fd, length)
                finally:
                    os.close(fd)
            if mirrored:
                ticket = self._enqueue(Truncate(self.root, rel, length))  # type: ignore[arg-type]
        if ticket:
            handle = self._handles.get(fh) if fh is not None else None
            if handle is not None:
                handle.last = ticket
            self._rep.wait(ticket, WaitPoint.WRITE)
        return 0

    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> int:
        rel = path[1:] if path is not None else None
        mirrored = rel is not None and not self._out(rel, False)
        ticket = 0
        with self._ordered():
            if mirrored:
                op = Fallocate(self.root, rel, mode, offset, size)  # type: ignore[arg-type]
                self._rep.intend(op, os.fstat(fh).st_nlink)
            _check(_libc.fallocate(fh, mode, offset, size), "fallocate")
            if mirrored:
                ticket = self._enqueue(Fallocate(self.root, rel, mode, offset, size))  # type: ignore[arg-type]
        if ticket:
            self._handles[fh].last = ticket
            self._rep.wait(ticket, WaitPoint.WRITE)
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        return self._sync(path, datasync, fh)

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        return self._sync(path, datasync, fh)

    def _sync(self, path: str | None, datasync: int, fh: int) -> int:
        rel = path[1:] if path is not None else None
        ticket = 0
        if rel is not None and not self._out(rel):
            with self._ordered():
                ticket = self._enqueue(Fsync(self.root, rel, bool(datasync)))
        # The peer works on its copy while the local disk flushes this one.
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        if ticket:
            self._rep.wait(ticket, WaitPoint.DURABLE)
        return 0

    def flush(self, path: str | None, fh: int) -> int:
        handle = self._handles.get(fh)
        if handle is not None and handle.last:
            self._rep.wait(handle.last, WaitPoint.CLOSE)
        return 0

    def release(self, path: str | None, fh: int) -> int:
        self._handles.pop(fh, None)
        os.close(fh)
        return 0

    # --- namespace ----------------------------------------------------------------------

    def mkdir(self, path: str, mode: int) -> int:
        rel = path[1:]
        uid, gid, inherit = self._owner(rel)
        perm = stat.S_IMODE(mode) | (stat.S_ISGID if inherit else 0)
        op = None if self._out(rel, True) else Mkdir(self.root, rel, perm, uid, gid)
        self._mutate(op, self._mkdir, rel, perm, uid, gid)
        return 0

    def _mkdir(self, rel: str, perm: int, uid: int, gid: int) -> None:
        os.mkdir(rel, perm, dir_fd=self.dir_fd)
        os.chown(rel, uid, gid, dir_fd=self.dir_fd, follow_symlinks=False)
        os.chmod(rel, perm, dir_fd=self.dir_fd, follow_symlinks=False)

    def mknod(self, path: str, mode: int, dev: int) -> int:
        rel = path[1:]
        uid, gid, _ = self._owner(rel)
        op = None if self._out(rel, False) else Mknod(self.root, rel, mode, dev, uid, gid)
        self._mutate(op, self._mknod, rel, mode, dev, uid, gid)
        return 0

    def _mknod(self, rel: str, mode: int, dev: int, uid: int, gid: int) -> None:
        os.mknod(rel, mode, dev, dir_fd=self.dir_fd)
        os.chown(rel, uid, gid, dir_fd=self.dir_fd, follow_symlinks=False)
        os.chmod(rel, stat.S_IMODE(mode), dir_fd=self.dir_fd, follow_symlinks=False)

    def symlink(self, target: str, source: str) -> int:
        # mfusepy: `target` is the new link's path, `source` the text it holds.
        rel = target[1:]
        uid, gid, _ = self._owner(rel)
        op = None if self._out(rel, False) else Symlink(self.root, rel, source, uid, gid)
        self._mutate(op, self._symlink, source, rel, uid, gid)
        return 0

    def _symlink(self, text: str, rel: str, uid: int, gid: int) -> None:
        os.symlink(text, rel, dir_fd=self.dir_fd)
        os.chown(rel, uid, gid, dir_fd=self.dir_fd, follow_symlinks=False)

    def unlink(self, path: str) -> int:
        rel = path[1:]
        op = None if self._out(rel, False) else Unlink(self.root, rel)
        self._mutate(op, os.unlink, rel, dir_fd=self.dir_fd)
        return 0

    def rmdir(self, path: str) -> int:
        rel = path[1:]
        op = None if self._out(rel, True) else Rmdir(self.root, rel)
        self._mutate(op, os.rmdir, rel, dir_fd=self.dir_fd)
        return 0

    def link(self, target: str, source: str) -> int:
        # mfusepy: `target` is the new name, `source` the existing one.
        new, old = target[1:], source[1:]
        fd = self.dir_fd
        with self._ordered():
            self._rep.intend(Link(self.root, old, new))
            os.link(old, new, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
            ticket = 0
            if not self._out(new, False):
                if self._out(old, False):
                    ticket = self._send_tree(new)
                else:
                    ticket = self._enqueue(Link(self.root, old, new))
        if ticket:
            self._rep.wait(ticket, WaitPoint.WRITE)
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        src, dst = old[1:], new[1:]
        with self._ordered():
            self._rep.intend(Rename(self.root, src, dst, flags))
            if self._all_in:
                self._rename_local(src, dst, flags)
                ticket = self._enqueue(Rename(self.root, src, dst, flags))
            else:
                ticket = self._rename_excluding(src, dst, flags)
                self._generation += 1
        if ticket:
            self._rep.wait(ticket, WaitPoint.WRITE)
        return 0

    def _rename_local(self, src: str, dst: str, flags: int) -> None:
        if flags:
            result = _libc.renameat2(
                self.dir_fd, os.fsencode(src), self.dir_fd, os.fsencode(dst), flags
            )
            _check(result, f"renameat2 {src!r} {dst!r}")
        else:
            os.rename(src, dst, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)

    def _rename_excluding(self, src: str, dst: str, flags: int) -> int:
        """A rename where exclusion rules apply: the peer must end up with what is mirrored."""
        fd = self.dir_fd
        src_dir = stat.S_ISDIR(os.lstat(src, dir_fd=fd).st_mode)
        try:
            dst_dir: bool | None = stat.S_ISDIR(os.lstat(dst, dir_fd=fd).st_mode)
        except FileNotFoundError:
            dst_dir = None
        # What the peer has under each name now, and what it should have afterwards.
        had_src = not self.excludes.excluded(src, src_dir)
        had_dst = dst_dir is not None and not self.excludes.excluded(dst, dst_dir)
        gets_dst = not self.excludes.excluded(dst, src_dir)
        exchange = bool(flags & RENAME_EXCHANGE)
        gets_src = exchange and dst_dir is not None and not self.excludes.excluded(src, dst_dir)
        self._rename_local(src, dst, flags)
        if had_src and gets_dst and (not exchange or (had_dst and gets_src)):
            return self._enqueue(Rename(self.root, src, dst, flags))
        ticket = 0
        if had_src:  # the peer's copy now lives at dst locally
            ticket = self._remove_tree(src, dst)
        if had_dst:
            if exchange:  # the peer's dst copy now lives at src locally
                ticket = self._remove_tree(dst, src)
            else:  # replaced: an empty directory or a file
                ticket = self._enqueue((Rmdir if dst_dir else Unlink)(self.root, dst))
        if gets_dst:
            ticket = self._send_tree(dst)
        if gets_src:
            ticket = self._send_tree(src)
        return ticket

    def _children(self, rel: str) -> Iterator[tuple[str, bool]]:
        dfd = os.open(rel or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=self.dir_fd)
        try:
            with os.scandir(dfd) as entries:
                found = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        finally:
            os.close(dfd)
        yield from sorted(found)

    def _remove_tree(self, peer_rel: str, local_rel: str) -> int:
        """Remove from the peer what it has at `peer_rel`, listed from `local_rel` here."""
        if not stat.S_ISDIR(os.lstat(local_rel, dir_fd=self.dir_fd).st_mode):
            return self._enqueue(Unlink(self.root, peer_rel))
        for name, is_dir in self._children(local_rel):
            child = f"{peer_rel}/{name}"
            if not self.excludes.excluded(child, is_dir):
                self._remove_tree(child, f"{local_rel}/{name}")
        return self._enqueue(Rmdir(self.root, peer_rel))

    def _send_tree(self, rel: str) -> int:
        """Send `rel` whole, as the peer never had it: contents, owner, mode, xattrs, times."""
        fd = self.dir_fd
        st = os.lstat(rel, dir_fd=fd)
        perm = stat.S_IMODE(st.st_mode)
        root = self.root
        if stat.S_ISDIR(st.st_mode):
            self._enqueue(Mkdir(root, rel, perm, st.st_uid, st.st_gid))
            for name, is_dir in self._children(rel):
                child = f"{rel}/{name}"
                if not self.excludes.excluded(child, is_dir):
                    self._send_tree(child)
        elif stat.S_ISREG(st.st_mode):
            self._enqueue(Create(root, rel, perm, st.st_uid, st.st_gid))
            if st.st_size:
                self._enqueue(Truncate(root, rel, st.st_size))
            self._send_data(rel)
        elif stat.S_ISLNK(st.st_mode):
            text = os.readlink(rel, dir_fd=fd)
            self._enqueue(Symlink(root, rel, text, st.st_uid, st.st_gid))
        else:
            self._enqueue(Mknod(root, rel, st.st_mode, st.st_rdev, st.st_uid, st.st_gid))
        if not stat.S_ISLNK(st.st_mode):
            self._enqueue(Chmod(root, rel, perm))
            self._enqueue(Chown(root, rel, st.st_uid, st.st_gid))
            target, follow = self._xpath(rel)
            for name in os.listxattr(target, follow_symlinks=follow):
                value = os.getxattr(target, name, follow_symlinks=follow)
                self._enqueue(SetXattr(root, rel, name, value))
        return self._enqueue(Utimens(root, rel, st.st_atime_ns, st.st_mtime_ns))

    def _send_data(self, rel: str) -> None:
        """Writes of the file's data extents only: holes stay holes on the peer."""
        src = os.open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        try:
            pos = 0
            while True:
                try:
                    start = os.lseek(src, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        return
                    raise
                end = os.lseek(src, start, os.SEEK_HOLE)
                while start < end:
                    data = os.pread(src, min(CHUNK, end - start), start)
                    if not data:
                        return
                    self._enqueue(Write(self.root, rel, start, data))
                    start += len(data)
                pos = end
        finally:
            os.close(src)

    # --- attributes ---------------------------------------------------------------------

    def chmod(self, path: str, mode: int) -> int:
        rel = path[1:]
        perm = stat.S_IMODE(mode)
        op = None if self._out(rel) else Chmod(self.root, rel, perm)
        self._mutate(op, os.chmod, rel or ".", perm, dir_fd=self.dir_fd, follow_symlinks=False)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        rel = path[1:]
        op = None if self._out(rel) else Chown(self.root, rel, uid, gid)
        self._mutate(op, os.chown, rel or ".", uid, gid, dir_fd=self.dir_fd, follow_symlinks=False)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        rel = path[1:]
        local = rel or "."
        out = self._out(rel)
        fd = self.dir_fd
        ticket = 0
        with self._ordered():
            if times is None or UTIME_OMIT in times or UTIME_NOW in times:
                now = time.time_ns()
                old = os.stat(local, dir_fd=fd, follow_symlinks=False)
                a, m = times if times is not None else (UTIME_NOW, UTIME_NOW)
                a = now if a == UTIME_NOW else old.st_atime_ns if a == UTIME_OMIT else a
                m = now if m == UTIME_NOW else old.st_mtime_ns if m == UTIME_OMIT else m
                times = (a, m)
            if not out:
                self._rep.intend(Utimens(self.root, rel, *times))
            os.utime(local, ns=times, dir_fd=fd, follow_symlinks=False)
            if not out:
                # What the file system really kept (its time granularity), not what was asked.
                st = os.stat(local, dir_fd=fd, follow_symlinks=False)
                ticket = self._enqueue(Utimens(self.root, rel, st.st_atime_ns, st.st_mtime_ns))
        if ticket:
            self._rep.wait(ticket, WaitPoint.WRITE)
        return 0

    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        rel = path[1:]
        target, follow = self._xpath(rel)
        op = None if self._out(rel) else SetXattr(self.root, rel, name, value, options)
        self._mutate(op, os.setxattr, target, name, value, options, follow_symlinks=follow)
        return 0

    def removexattr(self, path: str, name: str) -> int:
        rel = path[1:]
        target, follow = self._xpath(rel)
        op = None if self._out(rel) else RemoveXattr(self.root, rel, name)
        self._mutate(op, os.removexattr, target, name, follow_symlinks=follow)
        return 0

    # --- set-up ---------------------------------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:
            config.use_ino = 1  # st_ino passes through: hard links look like hard links
            config.hard_remove = 1  # unlink really unlinks (no .fuse_hidden files to mirror)
        if conn is not None:
            conn.max_write = MAX_WRITE
            # In sync mode write() must not return before the peer has the bytes.
            conn.want &= ~FUSE_CAP_WRITEBACK_CACHE
        self.initialised.set()


class _Fuse(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy's glue, with rename flags, truncate's fh, lseek and copy-free reads added."""

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        ops: MirrorFS = self.operations
        return ops.rename(
            old.decode(errors="surrogateescape"), new.decode(errors="surrogateescape"), flags
        )

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        ops: MirrorFS = self.operations
        fh = fip.contents.fh if fip else None
        name = None if path is None else path.decode(errors="surrogateescape")
        return ops.truncate(name, length, fh)

    def lseek(self, path: bytes | None, offset: int, whence: int, fip: Any) -> int:
        ops: MirrorFS = self.operations
        return ops.lseek("", offset, whence, fip.contents.fh)

    def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        # The request's buffer, lent (not copied) to the replicator: in sync mode this request
        # waits for the peer's ack, and the replicator copies it in the modes that do not.
        ops: MirrorFS = self.operations
        data: Buffer = b""
        if size:
            lent = (ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))
            data = memoryview(lent).cast("B")
        name = None if path is None else path.decode(errors="surrogateescape")
        return ops.write(name, data, offset, fip.contents.fh)

    def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        ops: MirrorFS = self.operations
        view = (ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))
        return ops.read_into(memoryview(view).cast("B"), offset, fip.contents.fh)


# --- mounting ---------------------------------------------------------------------------

_OCTAL = re.compile(r"\\([0-7]{3})")


def _tandem_mounts(path: Path) -> dict[int, str]:
    """Mount id → device ("0:53") of the tandem FUSE mounts at `path` in this namespace."""
    found: dict[int, str] = {}
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
        for line in info:
            fields = line.split()
            sep = fields.index("-")
            point = _OCTAL.sub(lambda m: chr(int(m[1], 8)), fields[4])
            if point == str(path) and fields[sep + 1] == "fuse.tandem":
                found[int(fields[0])] = fields[2]
    return found


def _unmount(path: Path, lazy: bool) -> bool:
    for argv in (["fusermount3", "-uz" if lazy else "-u"], ["umount", "-l" if lazy else ""]):
        argv = [a for a in argv if a] + [str(path)]
        with contextlib.suppress(OSError):
            if subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0:
                return True
    return False


def clear_stale_mount(path: Path) -> bool:
    """Lazily unmount a FUSE mount whose daemon died ("Transport endpoint is not connected").

    Returns True if one was cleared. A live mount, or no mount, is left alone.
    """
    try:
        os.stat(path)
        return False
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            return False
    return _unmount(path, lazy=True)


class MirrorMount:
    """One MirrorFS mounted over its own directory, served by a thread of its own."""

    def __init__(self, path: Path, root: int, replicator: Replicator, excludes: Excludes) -> None:
        self.path = Path(os.path.abspath(path))
        self.root = root
        self.replicator = replicator
        self.excludes = excludes
        self.fs: MirrorFS | None = None
        self._fd = -1
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._device = ""

    @property
    def dir_fd(self) -> int:
        """The descriptor of the real directory beneath the mount (-1 before start)."""
        return self._fd

    def start(self, timeout: float = 10.0) -> None:
        """Open the directory, mount over it, and return once the mount is live."""
        if self._thread is not None:
            raise RuntimeError(f"{self.path} is already mounted by this MirrorMount")
        self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        before = _tandem_mounts(self.path)
        self.fs = MirrorFS(self.root, self._fd, self.replicator, self.excludes)
        self._thread = threading.Thread(target=self._serve, name=f"fuse {self.path}", daemon=True)
        # libfuse's fuse_main changes the whole process's working directory to "/".
        cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._thread.start()
            self._await_mount(before, timeout)
        finally:
            os.fchdir(cwd)
            os.close(cwd)

    def _await_mount(self, before: dict[int, str], timeout: float) -> None:
        assert self.fs is not None and self._thread is not None
        deadline = time.monotonic() + timeout
        while True:
            new = {k: v for k, v in _tandem_mounts(self.path).items() if k not in before}
            if new and self.fs.initialised.is_set():
                self._device = next(iter(new.values()))
                return
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                why = f": {self._error}" if self._error else f" within {timeout:g} s"
                raise RuntimeError(f"the mirror of {self.path} could not be mounted{why}")
            time.sleep(0.005)

    def _serve(self) -> None:
        try:
            _Fuse(
                self.fs,
                str(self.path),
                foreground=True,
                allow_other=True,
                default_permissions=True,
                fsname="tandem",
                subtype="tandem",
                max_threads=FUSE_THREADS,
                max_idle_threads=FUSE_THREADS,
            )
        except BaseException as exc:  # reported by start() or seen by stop()
            self._error = exc

    def stop(self) -> None:
        """Unmount (lazily if busy), wait for the serving thread, close the descriptor."""
        thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            if not _unmount(self.path, lazy=False):
                _unmount(self.path, lazy=True)
            thread.join(timeout=10)
            if thread.is_alive() and self._device:
                # Requests stuck in the daemon: abort the connection so the loop ends.
                abort = Path(f"/sys/fs/fuse/connections/{self._device.split(':')[1]}/abort")
                if not abort.exists():
                    subprocess.run(
                        ["mount", "-t", "fusectl", "fusectl", "/sys/fs/fuse/connections"],
                        capture_output=True, timeout=10, check=False,
                    )  # fmt: skip
                with contextlib.suppress(OSError):
                    abort.write_text("1")
                thread.join(timeout=10)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
