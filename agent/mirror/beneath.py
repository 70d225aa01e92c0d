"""Open paths strictly beneath a directory descriptor, never following a symlink out of it.

The secondary writes a replicated directory through a descriptor opened before
a read-only bind mount covered it. Operation paths come from the peer, so every
lookup must stay inside that directory whatever the tree holds: `openat2(2)`
with RESOLVE_BENEATH makes the kernel refuse any `..` or symlink (absolute or
relative, at any depth) that would leave it, and RESOLVE_NO_MAGICLINKS refuses
/proc-style links. Symlinks that stay inside are followed as usual for the
intermediate components; callers add O_NOFOLLOW when they mean the final name
itself.

RESOLVE_NO_XDEV is not used: a mount inside a replicated directory is written
through like the primary's passthrough does, and leaving EXDEV to mean only
"escape" keeps the error unambiguous.

Where openat2 is missing (kernel < 5.6, or a seccomp filter that refuses it),
paths are walked one component at a time with O_NOFOLLOW|O_DIRECTORY: stricter
(no symlink is followed at all, even one that stays inside) but just as safe,
because nothing but the receiver changes the tree underneath the read-only
bind mount, so no rename can race the walk.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

SYS_OPENAT2 = 437  # one number on every architecture since the 5.1 unified syscall table
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
_EAGAIN_RETRIES = 16  # openat2 returns EAGAIN when a concurrent rename or mount raced a lookup

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


class EscapeError(Exception):
    """A path that is not a name inside the replicated directory, or whose lookup would leave it."""


_have_openat2: bool | None = None


def check_relative(path: str, *, allow_empty: bool = True) -> None:
    """Refuse, without touching the disk, a path that is not plainly relative to the directory."""
    shown = display(path)
    if not path:
        if allow_empty:
            return
        raise EscapeError("'' names the replicated directory itself; this needs a name inside it")
    if "\x00" in path:
        raise EscapeError(f"{shown!r} contains a NUL byte, which no file name can hold")
    if path.startswith("/"):
        raise EscapeError(f"{shown!r} is absolute; paths must be relative to the directory")
    for part in path.split("/"):
        if part == "..":
            raise EscapeError(f"{shown!r} has a '..' component, which would leave the directory")
        if part in ("", "."):
            raise EscapeError(f"{shown!r} has an empty or '.' component; expected plain names")
    try:
        path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise EscapeError(f"{shown!r} is not a valid file name (unpaired surrogate)") from None


def display(path: str) -> str:
    """The path made printable: undecodable bytes shown as \\xNN escapes."""
    try:
        raw = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no byte decodes to: not a name from a file system
        raw = path.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def _encode(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape") if path else b"."


def open_beneath(
    root_fd: int, path: str, flags: int, mode: int = 0o600, *, no_symlinks: bool = False
) -> int:
    """A new descriptor (close-on-exec) for `path` resolved strictly beneath `root_fd`.

    "" opens the directory itself. EscapeError when the path or a symlink on its
    way would leave the directory; OSError for everything else (ENOENT, and
    ELOOP when O_NOFOLLOW meets a symlink as the final name). `no_symlinks`:
    follow no symlink at all, even inside (OSError ELOOP if one is on the way).
    """
    check_relative(path)
    global _have_openat2
    if _have_openat2 is None:
        _have_openat2 = _probe_openat2()
    if _have_openat2:
        resolve = _RESOLVE | (RESOLVE_NO_SYMLINKS if no_symlinks else 0)
        return _openat2(root_fd, path, flags | os.O_CLOEXEC, mode, resolve)
    return _open_walk(root_fd, path, flags | os.O_CLOEXEC, mode)


def parent_beneath(root_fd: int, path: str) -> tuple[int, str]:
    """(descriptor of the parent directory beneath `root_fd`, final name), for *at() calls.

    The parent is opened O_PATH|O_DIRECTORY (usable as a dir_fd, not for I/O);
    the final name is not resolved, so unlinkat, renameat2, mkdirat, symlinkat,
    linkat, mknodat and the AT_SYMLINK_NOFOLLOW calls act on it, not on what it
    points to. The caller closes the descriptor.
    """
    check_relative(path, allow_empty=False)
    parent, _, name = path.rpartition("/")
    if not parent:
        return os.dup(root_fd), name  # cheaper than a lookup; the same directory
    return open_beneath(root_fd, parent, os.O_PATH | os.O_DIRECTORY), name


def _creates(flags: int) -> bool:
    return bool(flags & os.O_CREAT) or (flags & os.O_TMPFILE) == os.O_TMPFILE


def _openat2(root_fd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    # openat2 refuses a mode without O_CREAT/O_TMPFILE (EINVAL), unlike openat
    how = _OpenHow(flags, mode if _creates(flags) else 0, resolve)
    raw = _encode(path)
    for _ in range(_EAGAIN_RETRIES):
        fd = _libc.syscall(
            ctypes.c_long(SYS_OPENAT2),
            ctypes.c_int(root_fd),
            ctypes.c_char_p(raw),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err == errno.EAGAIN:
            continue
        if err == errno.EXDEV:
            raise EscapeError(
                f"{display(path)!r}: a symlink on the way leads outside the replicated directory"
            )
        if err == errno.ELOOP and not flags & os.O_NOFOLLOW and not resolve & RESOLVE_NO_SYMLINKS:
            raise EscapeError(
                f"{display(path)!r}: too many symlinks, or a /proc magic link, on the way"
            )
        raise OSError(err, os.strerror(err), display(path))
    raise OSError(errno.EAGAIN, "lookup kept racing with renames", display(path))


def _probe_openat2() -> bool:
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, _RESOLVE)
    fd = _libc.syscall(
        ctypes.c_long(SYS_OPENAT2),
        ctypes.c_int(-100),  # AT_FDCWD
        ctypes.c_char_p(b"."),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd >= 0:
        os.close(fd)
        return True
    # ENOSYS: an old kernel; EPERM: a container's seccomp filter that predates openat2
    return ctypes.get_errno() not in (errno.ENOSYS, errno.EPERM)


def _open_walk(root_fd: int, path: str, flags: int, mode: int) -> int:
    """The fallback without openat2: one component at a time, never following a symlink."""
    if not path:
        return os.open(".", flags, mode, dir_fd=root_fd)
    *dirs, name = path.split("/")
    current = root_fd
    try:
        for index, part in enumerate(dirs):
            try:
                step = os.open(
                    part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current
                )
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _is_symlink(current, part):
                    where = "/".join(dirs[: index + 1])
                    raise EscapeError(
                        f"{display(path)!r}: {display(where)!r} is a symlink, which is not"
                        " followed without openat2"
                    ) from None
                raise OSError(exc.errno, exc.strerror, display(path)) from None
            if current != root_fd:
                os.close(current)
            current = step
        nofollow = bool(flags & os.O_NOFOLLOW)
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=current)
        except OSError as exc:
            if (
                not nofollow
                and exc.errno in (errno.ELOOP, errno.ENOTDIR)
                and _is_symlink(current, name)
            ):
                raise EscapeError(
                    f"{display(path)!r} is a symlink, which is not followed without openat2"
                ) from None
            raise OSError(exc.errno, exc.strerror, display(path)) from None
        if not nofollow and stat.S_ISLNK(os.fstat(fd).st_mode):  # O_PATH opened the link itself
            os.close(fd)
            raise EscapeError(
                f"{display(path)!r} is a symlink, which is not followed without openat2"
            )
        return fd
    finally:
        if current != root_fd:
            os.close(current)


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False
