"""The quarantine: where a node's own versions of files go before a resync overwrites them.

After a split brain (or a first sync that finds files already on the target),
the side whose changes are dropped keeps them here, in a directory named by
module and time, until an administrator removes it: nothing is discarded
silently. Files are copied through the receiver's descriptor beneath the
replicated directory, never by following a path an application could swap.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import time
from collections.abc import Iterable
from pathlib import Path

from agent.mirror.beneath import EscapeError, check_relative, parent_beneath

GONE = (errno.ENOENT, errno.ENOTDIR)  # removed meanwhile: nothing left to keep


def new_directory(base: Path, module: str) -> Path:
    """A fresh quarantine directory for this module, named by UTC time."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = base / f"{module}-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = base / f"{module}-{stamp}-{n}"
    target.mkdir(parents=True, mode=0o700)
    return target


def save(root_fd: int, paths: Iterable[str], dest: Path) -> tuple[int, int]:
    """Copy each path (file, symlink, directory entry) from beneath `root_fd` into `dest`.

    Returns (entries saved, bytes saved). Paths gone meanwhile are skipped; any other failure
    (a full disk, an I/O error) raises OSError naming the path, so the resync that would
    replace them does not go ahead with them unsaved.
    """
    count = 0
    total = 0
    for path in paths:
        try:
            check_relative(path)
        except EscapeError:
            continue
        if not path:
            continue
        try:
            # The parent is opened beneath the root: a symlinked directory cannot lead out.
            parent, name = parent_beneath(root_fd, path)
        except EscapeError:
            continue
        except OSError as exc:
            if exc.errno in GONE:
                continue
            raise OSError(exc.errno, f"cannot keep {path} in quarantine: {exc.strerror}") from None
        try:
            saved = _save_one(parent, name, dest / path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # the source removed meanwhile; else a real failure
                raise OSError(
                    exc.errno, f"cannot keep {path} in quarantine: {exc.strerror}"
                ) from None
            saved = None
        finally:
            os.close(parent)
        if saved is not None:
            count += 1
            total += saved
    return count, total


def _save_one(parent: int, name: str, target: Path) -> int | None:
    try:
        st = os.lstat(name, dir_fd=parent)
    except (FileNotFoundError, NotADirectoryError):
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    if stat.S_ISDIR(st.st_mode):
        target.mkdir(exist_ok=True)
        return 0
    if stat.S_ISLNK(st.st_mode):
        if not target.is_symlink():
            target.symlink_to(os.readlink(name, dir_fd=parent))
        return 0
    if not stat.S_ISREG(st.st_mode):
        return None
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=parent)
    try:
        with os.fdopen(fd, "rb", closefd=False) as src, target.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    finally:
        os.close(fd)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    return st.st_size


def size_of(base: Path, module: str) -> int:
    """Bytes kept in this module's quarantine directories (shown in status)."""
    total = 0
    for top in base.glob(f"{module}-*"):
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
