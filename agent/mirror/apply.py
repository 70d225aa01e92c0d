"""The secondary's applier: each mirrored operation done on the real directory, in order.

The receiver decodes operations from the stream and hands them here one at a
time. Every lookup goes through `beneath` (strictly inside the replicated
directory's descriptor, final names not followed), so a hostile or confused
peer cannot reach outside it. Operations are applied so that replaying them (a
resync may resend what was already applied) ends in the same tree:
- Unlink/Rmdir of a missing name, Mkdir of an existing directory, a Rename
  whose source is gone but whose target exists, a Link already made: done.
- Create, Symlink and Mknod replace a non-directory already at the name.
- Rename's NOREPLACE is dropped: the primary already checked the name was free,
  and in a replay the name may hold a later state that must be replaced.
Modes are set exactly with chmod after creation (the umask never counts), after
chown (which clears set-id bits on regular files).

Not thread-safe: one receiver thread owns an Applier.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from agent.core import mirror_ops as mo
from agent.mirror.beneath import EscapeError, display, open_beneath, parent_beneath

FD_CACHE_SIZE = 128
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_PROBE_FLAGS = os.O_PATH | os.O_NOFOLLOW
_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symlink",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = (
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.syncfs.argtypes = (ctypes.c_int,)
_libc.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
SYNC_FILE_RANGE_WRITE = 2
EARLY_WRITEBACK = 256 << 10  # a write this large starts its way to disk at once


class ApplyError(Exception):
    """An operation that could not be applied; `reason` names the op, directory, path and cause."""

    def __init__(self, reason: str, errno: int | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errno = errno


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)


class Applier:
    """Applies operations to the replicated directories open as `root_fds` (not owned)."""

    def __init__(
        self,
        root_fds: Sequence[int],
        root_names: Sequence[str] | None = None,
        excluded: Sequence[Callable[[str, bool], bool] | None] | None = None,
    ) -> None:
        """`root_names` (the directories' paths) only make error reasons readable; `excluded`
        says which names each node keeps for itself (they may stand in a directory's way)."""
        self.excluded = list(excluded) if excluded is not None else [None] * len(root_fds)
        if root_names is not None and len(root_names) != len(root_fds):
            raise ValueError(f"{len(root_names)} names given for {len(root_fds)} directories")
        self.root_fds = list(root_fds)
        self.root_names = (
            list(root_names)
            if root_names is not None
            else [f"<directory {i}>" for i in range(len(self.root_fds))]
        )
        self._fds: OrderedDict[tuple[int, str], int] = OrderedDict()
        self._handlers: dict[type[Any], Callable[[int, Any], None]] = {
            mo.Write: self._write,
            mo.Truncate: self._truncate,
            mo.Create: self._create,
            mo.Mkdir: self._mkdir,
            mo.Unlink: self._unlink,
            mo.Rmdir: self._rmdir,
            mo.Rename: self._rename,
            mo.Link: self._link,
            mo.Symlink: self._symlink,
            mo.Chmod: self._chmod,
            mo.Chown: self._chown,
            mo.Utimens: self._utimens,
            mo.SetXattr: self._setxattr,
            mo.RemoveXattr: self._removexattr,
            mo.Fallocate: self._fallocate,
            mo.Fsync: self._fsync,
            mo.Mknod: self._mknod,
        }

    def apply(self, op: mo.Op) -> None:
        """Apply one operation; ApplyError (never anything else) if it cannot be done."""
        handler = self._handlers.get(type(op))
        if handler is None:
            raise ApplyError(f"{type(op).__name__}: not an operation this node can apply", None)
        if not 0 <= op.root < len(self.root_fds):
            raise ApplyError(
                f"{type(op).__name__} {display(op.path)}: replicated directory {op.root} is not"
                f" one of this module's {len(self.root_fds)}; the peers' configurations differ",
                None,
            )
        try:
            handler(self.root_fds[op.root], op)
        except EscapeError as exc:
            raise ApplyError(f"{self._what(op)}: refused: {exc}", None) from None
        except OSError as exc:
            code = exc.errno
            name = errno.errorcode.get(code, str(code)) if code is not None else "?"
            cause = f"{exc.strerror or exc} ({name})"
            raise ApplyError(f"{self._what(op)}: {cause}", code) from None
        except (ValueError, OverflowError, TypeError) as exc:
            raise ApplyError(f"{self._what(op)}: invalid value: {exc}", errno.EINVAL) from None

    def sync(self) -> None:
        """syncfs on each replicated directory's file system: everything applied is durable.

        ApplyError if a file system reports a failed writeback (EIO) or the like.
        """
        for fd, name in zip(self.root_fds, self.root_names, strict=True):
            if _libc.syncfs(fd) != 0:
                code = ctypes.get_errno()
                cause = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
                raise ApplyError(f"syncfs {name}: {cause}", code)

    def close(self) -> None:
        """Close the cached file descriptors (the root descriptors stay open: not ours)."""
        while self._fds:
            _, fd = self._fds.popitem()
            os.close(fd)

    # --- helpers -----------------------------------------------------------------------

    def _what(self, op: mo.Op) -> str:
        where = self._where(op.root, op.path)
        if isinstance(op, mo.Rename | mo.Link):
            return f"{type(op).__name__} {where} -> {self._where(op.root, op.new_path)}"
        if isinstance(op, mo.Write):
            return f"Write {where} at {op.offset} ({len(op.data)} bytes)"
        if isinstance(op, mo.Truncate):
            return f"Truncate {where} to {op.size}"
        if isinstance(op, mo.Fallocate):
            return f"Fallocate {where} mode {op.mode:#x} at {op.offset}+{op.length}"
        if isinstance(op, mo.SetXattr | mo.RemoveXattr):
            return f"{type(op).__name__} {where} {display(op.name)}"
        return f"{type(op).__name__} {where}"

    def _where(self, root: int, path: str) -> str:
        name = self.root_names[root]
        return f"{name}/{display(path)}" if path else name

    @contextmanager
    def _writable(self, root_fd: int, path: str) -> Iterator[int]:
        """A descriptor open for writing on the regular file at `path` (not followed).

        Cached only when no symlink is on the way: then a cached descriptor can go
        stale only through a namespace operation on the path or a parent of it,
        which `_forget` catches.
        """
        key = (root_fd, path)
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            yield fd
            return
        try:
            probe = open_beneath(root_fd, path, _PROBE_FLAGS, no_symlinks=True)
            cache = True
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            probe = open_beneath(root_fd, path, _PROBE_FLAGS)
            cache = False
        # look first, open after: opening a FIFO would block and a device node would act
        try:
            mode = os.fstat(probe).st_mode
            if not stat.S_ISREG(mode):
                code = errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL
                if stat.S_ISLNK(mode):
                    code = errno.ELOOP
                raise OSError(code, f"{_KINDS.get(stat.S_IFMT(mode), 'odd file')} here, not a file")
            fd = os.open(f"/proc/self/fd/{probe}", os.O_WRONLY | os.O_CLOEXEC)
        finally:
            os.close(probe)
        if not cache:
            try:
                yield fd
            finally:
                os.close(fd)
            return
        self._fds[key] = fd
        if len(self._fds) > FD_CACHE_SIZE:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        yield fd

    def _forget(self, root_fd: int, *paths: str) -> None:
        """Drop cached descriptors at or under paths whose names changed meaning."""
        stale = [
            key
            for key in self._fds
            if key[0] == root_fd
            and any(key[1] == p or key[1].startswith(p + "/") or not p for p in paths)
        ]
        for key in stale:
            os.close(self._fds.pop(key))

    @contextmanager
    def _parent(self, root_fd: int, path: str) -> Iterator[tuple[int, str]]:
        fd, name = parent_beneath(root_fd, path)
        try:
            yield fd, name
        finally:
            os.close(fd)

    @contextmanager
    def _opened(self, root_fd: int, path: str, flags: int) -> Iterator[int]:
        fd = open_beneath(root_fd, path, flags)
        try:
            yield fd
        finally:
            os.close(fd)

    # --- data --------------------------------------------------------------------------

    def _write(self, root_fd: int, op: mo.Write) -> None:
        with self._writable(root_fd, op.path) as fd:
            view = memoryview(op.data)
            offset = op.offset
            while view:
                written = os.pwrite(fd, view, offset)
                if written <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), display(op.path))
                view = view[written:]
                offset += written
            if op.sync:
                os.fdatasync(fd)
            elif len(op.data) >= EARLY_WRITEBACK:
                # Large writes come in streams ending in an fsync: start writing them back
                # now (asynchronously), so that fsync finds little left and does not add the
                # whole stream's disk time after its last byte arrived. Advisory: no error.
                _libc.sync_file_range(fd, op.offset, len(op.data), SYNC_FILE_RANGE_WRITE)

    def _truncate(self, root_fd: int, op: mo.Truncate) -> None:
        with self._writable(root_fd, op.path) as fd:
            os.ftruncate(fd, op.size)

    def _fallocate(self, root_fd: int, op: mo.Fallocate) -> None:
        with self._writable(root_fd, op.path) as fd:
            if op.mode == 0:
                os.posix_fallocate(fd, op.offset, op.length)
            else:
                _check(_libc.fallocate(fd, op.mode, op.offset, op.length), display(op.path))

    def _fsync(self, root_fd: int, op: mo.Fsync) -> None:
        sync = os.fdatasync if op.datasync else os.fsync
        cached = self._fds.get((root_fd, op.path))
        if cached is not None:
            sync(cached)
            return
        try:
            probe = open_beneath(root_fd, op.path, _PROBE_FLAGS)
        except FileNotFoundError:
            return  # unlinked since (a temporary file, or a replay): nothing left to keep
        try:
            mode = os.fstat(probe).st_mode
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                # fsync refuses O_PATH descriptors; reopening through /proc reaches the inode
                fd = os.open(f"/proc/self/fd/{probe}", os.O_RDONLY | os.O_CLOEXEC)
            elif stat.S_ISLNK(mode):
                # what can be made durable of a symlink is the directory entry holding it
                parent, _, _ = op.path.rpartition("/")
                fd = open_beneath(root_fd, parent, os.O_RDONLY | os.O_DIRECTORY)
            else:
                return  # FIFOs, sockets, devices: no data of their own
        finally:
            os.close(probe)
        try:
            sync(fd)
        finally:
            os.close(fd)

    # --- names -------------------------------------------------------------------------

    def _create(self, root_fd: int, op: mo.Create) -> None:
        self._forget(root_fd, op.path)
        with self._parent(root_fd, op.path) as (parent, name):
            # a replay may find a later symlink, FIFO or device at the name: replace it, never
            # open it (a FIFO would block, a device would act)
            kind = _kind(parent, name)
            if kind is not None and not stat.S_ISREG(kind) and not stat.S_ISDIR(kind):
                os.unlink(name, dir_fd=parent)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, 0o600, dir_fd=parent)
        try:
            os.fchown(fd, op.uid, op.gid)
            os.fchmod(fd, stat.S_IMODE(op.mode))
        finally:
            os.close(fd)

    def _mkdir(self, root_fd: int, op: mo.Mkdir) -> None:
        with self._parent(root_fd, op.path) as (parent, name):
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                if not stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                    raise
        with self._opened(root_fd, op.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW) as fd:
            os.fchown(fd, op.uid, op.gid)
            os.fchmod(fd, stat.S_IMODE(op.mode))

    def _unlink(self, root_fd: int, op: mo.Unlink) -> None:
        self._forget(root_fd, op.path)
        try:
            with self._parent(root_fd, op.path) as (parent, name):
                os.unlink(name, dir_fd=parent)
        except FileNotFoundError:
            pass  # already gone: the end state is reached

    def _rmdir(self, root_fd: int, op: mo.Rmdir) -> None:
        self._forget(root_fd, op.path)
        try:
            with self._parent(root_fd, op.path) as (parent, name):
                try:
                    os.rmdir(name, dir_fd=parent)
                except OSError as exc:
                    # The primary removed an empty directory; here it may still hold names
                    # excluded from replication (this node's own): they go with it.
                    excluded = self.excluded[op.root]
                    if exc.errno != errno.ENOTEMPTY or excluded is None:
                        raise
                    _remove_excluded_tree(parent, name, op.path, excluded)
                    os.rmdir(name, dir_fd=parent)
        except FileNotFoundError:
            pass

    def _rename(self, root_fd: int, op: mo.Rename) -> None:
        self._forget(root_fd, op.path, op.new_path)
        flags = op.flags if op.flags & RENAME_EXCHANGE else op.flags & ~RENAME_NOREPLACE
        with (
            self._parent(root_fd, op.path) as (old_parent, old_name),
            self._parent(root_fd, op.new_path) as (new_parent, new_name),
        ):
            try:
                if flags == 0:
                    os.rename(old_name, new_name, src_dir_fd=old_parent, dst_dir_fd=new_parent)
                else:
                    result = _libc.renameat2(
                        old_parent,
                        old_name.encode("utf-8", "surrogateescape"),
                        new_parent,
                        new_name.encode("utf-8", "surrogateescape"),
                        flags,
                    )
                    _check(result, display(op.path))
            except FileNotFoundError:
                # a replay: the source moved already if the target is there
                if (
                    flags & RENAME_EXCHANGE
                    or _exists(old_parent, old_name)
                    or not _exists(new_parent, new_name)
                ):
                    raise

    def _link(self, root_fd: int, op: mo.Link) -> None:
        self._forget(root_fd, op.new_path)
        with (
            self._parent(root_fd, op.path) as (old_parent, old_name),
            self._parent(root_fd, op.new_path) as (new_parent, new_name),
        ):
            try:
                os.link(
                    old_name,
                    new_name,
                    src_dir_fd=old_parent,
                    dst_dir_fd=new_parent,
                    follow_symlinks=False,
                )
            except FileNotFoundError:
                if not _exists(new_parent, new_name) or _exists(old_parent, old_name):
                    raise  # nothing to link, and no sign this is a replay
            except FileExistsError:
                old = os.stat(old_name, dir_fd=old_parent, follow_symlinks=False)
                new = os.stat(new_name, dir_fd=new_parent, follow_symlinks=False)
                if (old.st_dev, old.st_ino) == (new.st_dev, new.st_ino):
                    return
                if stat.S_ISDIR(new.st_mode):
                    raise
                os.unlink(new_name, dir_fd=new_parent)  # a later state at the name, in a replay
                os.link(
                    old_name,
                    new_name,
                    src_dir_fd=old_parent,
                    dst_dir_fd=new_parent,
                    follow_symlinks=False,
                )

    def _symlink(self, root_fd: int, op: mo.Symlink) -> None:
        self._forget(root_fd, op.path)
        with self._parent(root_fd, op.path) as (parent, name):
            _replace_nondir(parent, name, lambda: os.symlink(op.target, name, dir_fd=parent))
            os.chown(name, op.uid, op.gid, dir_fd=parent, follow_symlinks=False)

    def _mknod(self, root_fd: int, op: mo.Mknod) -> None:
        self._forget(root_fd, op.path)
        kind = stat.S_IFMT(op.mode)
        with self._parent(root_fd, op.path) as (parent, name):
            _replace_nondir(
                parent, name, lambda: os.mknod(name, kind | 0o600, op.rdev, dir_fd=parent)
            )
            os.chown(name, op.uid, op.gid, dir_fd=parent, follow_symlinks=False)
        self._chmod(root_fd, mo.Chmod(op.root, op.path, op.mode))

    # --- metadata ----------------------------------------------------------------------

    def _chmod(self, root_fd: int, op: mo.Chmod) -> None:
        with self._opened(root_fd, op.path, _PROBE_FLAGS) as fd:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                return  # a symlink's mode means nothing on Linux, and cannot be changed
            # fchmod refuses O_PATH descriptors; /proc/self/fd reaches the same inode
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(op.mode))

    def _chown(self, root_fd: int, op: mo.Chown) -> None:
        if not op.path:
            with self._opened(root_fd, "", os.O_RDONLY | os.O_DIRECTORY) as fd:
                os.fchown(fd, op.uid, op.gid)
            return
        with self._parent(root_fd, op.path) as (parent, name):
            os.chown(name, op.uid, op.gid, dir_fd=parent, follow_symlinks=False)

    def _utimens(self, root_fd: int, op: mo.Utimens) -> None:
        times = (op.atime_ns, op.mtime_ns)
        if not op.path:
            with self._opened(root_fd, "", os.O_RDONLY | os.O_DIRECTORY) as fd:
                os.utime(fd, ns=times)
            return
        with self._parent(root_fd, op.path) as (parent, name):
            os.utime(name, ns=times, dir_fd=parent, follow_symlinks=False)

    def _setxattr(self, root_fd: int, op: mo.SetXattr) -> None:
        with self._xattr_target(root_fd, op.path, op.name) as target:
            if target is not None:
                os.setxattr(target, op.name, op.value, op.flags, follow_symlinks=False)

    def _removexattr(self, root_fd: int, op: mo.RemoveXattr) -> None:
        with self._xattr_target(root_fd, op.path, op.name) as target:
            if target is not None:
                os.removexattr(target, op.name, follow_symlinks=False)

    @contextmanager
    def _xattr_target(self, root_fd: int, path: str, attr: str) -> Iterator[str | None]:
        """A /proc path reaching the inode itself without following it (None: nothing to do).

        The l*xattr calls have no dir-fd form: /proc/self/fd/<parent>/<name> resolves the
        parent through its descriptor (already beneath the root) and stops at the name.
        """
        if not path:
            with self._opened(root_fd, "", os.O_PATH | os.O_DIRECTORY) as fd:
                yield f"/proc/self/fd/{fd}/."
            return
        with self._parent(root_fd, path) as (parent, name):
            mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode) and attr.startswith("user."):
                yield None  # Linux forbids user.* on symlinks; the primary could not set it
            else:
                yield f"/proc/self/fd/{parent}/{name}"


def _kind(dir_fd: int, name: str) -> int | None:
    """The st_mode of the name itself (not followed), None if there is none."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return None


def _exists(dir_fd: int, name: str) -> bool:
    return _kind(dir_fd, name) is not None


def _replace_nondir(parent: int, name: str, make: Callable[[], None]) -> None:
    """Make the name; a non-directory already there (a replay's later state) is replaced."""
    try:
        make()
    except FileExistsError:
        if stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            raise
        os.unlink(name, dir_fd=parent)
        make()


def _remove_excluded_tree(
    parent: int, name: str, path: str, excluded: Callable[[str, bool], bool]
) -> None:
    """Empty directory `name` if everything in it is excluded (else ENOTEMPTY, having removed
    nothing: this node's excluded files are not lost to an rmdir that fails anyway)."""
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
    try:
        doomed = _excluded_entries(fd, path, excluded)
        for entry_name, is_dir in doomed:
            if is_dir:
                shutil.rmtree(entry_name, dir_fd=fd)  # never follows symlinks
            else:
                os.unlink(entry_name, dir_fd=fd)
    finally:
        os.close(fd)


def _excluded_entries(
    fd: int, path: str, excluded: Callable[[str, bool], bool]
) -> list[tuple[str, bool]]:
    """The entries of directory `fd` to remove so that it is empty: excluded ones whole, and
    kept directories holding only excluded names (after their contents). ENOTEMPTY if any
    name is not excluded. Reads only."""
    found: list[tuple[str, bool]] = []
    for entry in list(os.scandir(fd)):
        is_dir = entry.is_dir(follow_symlinks=False)
        child = f"{path}/{entry.name}"
        if excluded(child, is_dir):
            found.append((entry.name, is_dir))
        elif is_dir:
            sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            try:
                _excluded_entries(sub, child, excluded)  # raises if it holds a kept name
            finally:
                os.close(sub)
            found.append((entry.name, True))
        else:
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), child)
    return found
