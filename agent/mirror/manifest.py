"""Tree manifests: every name beneath a replicated directory with its metadata and the BLAKE3
digest of each 64 KiB block of its content, so two nodes find what differs by comparing them.

`scan` walks beneath a directory descriptor (never following a symlink, never leaving it), in
a deterministic order, parents before children. It is built for a million small files: one
getdents pass per directory, and per regular file one open, fstat, read, flistxattr, close.
A hole reads as zeros and hashes so; a big sparse file skips reading its holes (SEEK_DATA).
Names that vanish or change kind while the walk runs are left out: the resync's next pass
catches them. `encode_entries`/`decode_entries` carry manifests over the stream in chunks.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import struct
from collections.abc import Callable, Iterable, Iterator

from agent.core.resync import BLOCK_SIZE, DIGEST_BYTES, KINDS, Entry, block_digest, zero_digest

__all__ = [
    "BLOCK_SIZE",
    "Entry",
    "ManifestReader",
    "decode_entries",
    "encode_chunks",
    "encode_entries",
    "range_digests",
    "scan",
]

READ_CHUNK = 1 << 20
XATTR_PREFIXES = ("user.", "trusted.", "security.", "system.posix_acl_")
Excluded = Callable[[str, bool], bool]

_O_NOATIME = getattr(os, "O_NOATIME", 0)
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENXIO, errno.ESTALE)


def scan(
    root_fd: int,
    excluded: Excluded | None = None,
    *,
    hash_blocks: bool = True,
    paths: Iterable[str] | None = None,
) -> Iterator[Entry]:
    """The entries beneath the directory `root_fd` ("" is the directory itself).

    `excluded(path, is_dir)` leaves a name out (an excluded directory is not entered);
    `paths` restricts the walk to those names (a directory: with its subtree), each
    reached component by component without following symlinks. `hash_blocks=False` leaves
    `blocks` empty (the planner then compares size and mtime).
    """
    walker = _Walker(excluded, hash_blocks)
    if paths is None:
        yield walker.root_entry(root_fd)
        yield from walker.subtree(root_fd, "")
        return
    wanted = sorted({_checked_path(p) for p in paths}, key=lambda p: p.split("/") if p else [])
    done_dirs: set[str] = set()
    for path in wanted:
        if any(a in done_dirs for a in _ancestors(path)):
            continue
        if path == "":
            yield walker.root_entry(root_fd)
            yield from walker.subtree(root_fd, "")
            return
        if excluded is not None and any(excluded(a, True) for a in _ancestors(path) if a):
            continue
        found = walker.one(root_fd, path)
        if found is None:
            continue
        entry, sub_fd = found
        if sub_fd is None:
            yield entry
            continue
        done_dirs.add(path)
        try:
            yield entry
        except BaseException:
            os.close(sub_fd)
            raise
        yield from walker.subtree(sub_fd, path + "/", owned=True)


class _Walker:
    """State of one scan: the exclusion rule, and the hard-link keys given so far."""

    def __init__(self, excluded: Excluded | None, hash_blocks: bool) -> None:
        self.excluded = excluded
        self.hash_blocks = hash_blocks
        self.inodes: dict[tuple[int, int], int] = {}
        self.open_flags = _OPEN_FILE | _O_NOATIME

    def root_entry(self, fd: int) -> Entry:
        st = os.fstat(fd)
        return self._entry("", "dir", st, xattrs=_xattrs_fd(fd))

    def subtree(self, fd: int, prefix: str, owned: bool = False) -> Iterator[Entry]:
        """Every entry below the directory `fd` whose path is `prefix`+name, depth first."""
        stack: list[tuple[int, str, Iterator[os.DirEntry[str]], bool]] = []
        try:
            stack.append((fd, prefix, _sorted_children(fd), owned))
            while stack:
                dir_fd, pre, children, _ = stack[-1]
                child = next(children, None)
                if child is None:
                    top = stack.pop()
                    if top[3]:
                        os.close(top[0])
                    continue
                found = self._visit(dir_fd, child, pre + child.name)
                if found is None:
                    continue
                entry, sub_fd = found
                if sub_fd is not None:
                    # on the stack before the yield, so a consumer that stops still closes it
                    stack.append((sub_fd, entry.path + "/", iter(()), True))
                    stack[-1] = (sub_fd, entry.path + "/", _sorted_children(sub_fd), True)
                yield entry
        finally:
            for dir_fd, _, _, own in stack:
                if own:
                    os.close(dir_fd)

    def one(self, root_fd: int, path: str) -> tuple[Entry, int | None] | None:
        """The entry of one path (and its open descriptor if it is a directory to walk)."""
        parent, _, name = path.rpartition("/")
        try:
            parent_fd = _open_beneath(root_fd, parent)
        except OSError as exc:
            if exc.errno in _GONE:
                return None
            raise
        try:
            try:
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in _GONE:
                    return None
                raise
            return self._visit(parent_fd, _Named(name, st), path)
        finally:
            if parent_fd != root_fd:
                os.close(parent_fd)

    def _visit(
        self, dir_fd: int, child: os.DirEntry[str] | _Named, path: str
    ) -> tuple[Entry, int | None] | None:
        try:
            is_dir = child.is_dir(follow_symlinks=False)
            if self.excluded is not None and self.excluded(path, is_dir):
                return None
            if is_dir:
                return self._directory(dir_fd, child.name, path)
            if child.is_file(follow_symlinks=False):
                return self._file(dir_fd, child.name, path)
            return self._other(dir_fd, child.name, path, child.stat(follow_symlinks=False))
        except OSError as exc:
            if exc.errno in _GONE:
                return None  # it vanished or changed kind meanwhile: the next pass sees it
            raise OSError(exc.errno, f"cannot scan {path!r}: {exc.strerror}") from exc

    def _directory(self, dir_fd: int, name: str, path: str) -> tuple[Entry, int | None]:
        fd = os.open(name, _OPEN_DIR, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            xattrs = _xattrs_fd(fd)
        except BaseException:
            os.close(fd)
            raise
        return self._entry(path, "dir", st, xattrs=xattrs), fd

    def _file(self, dir_fd: int, name: str, path: str) -> tuple[Entry, None] | None:
        try:
            fd = os.open(name, self.open_flags, dir_fd=dir_fd)
        except PermissionError:
            if not self.open_flags & _O_NOATIME:
                raise
            self.open_flags &= ~_O_NOATIME  # O_NOATIME needs ownership or CAP_FOWNER
            fd = os.open(name, self.open_flags, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            size = st.st_size
            blocks: tuple[bytes, ...] = ()
            if self.hash_blocks and size:
                blocks, size = _hash_file(fd, st)
            xattrs = _xattrs_fd(fd)
        finally:
            os.close(fd)
        key = 0
        if st.st_nlink > 1:
            key = self.inodes.setdefault((st.st_dev, st.st_ino), len(self.inodes) + 1)
        mode = st.st_mode & 0o7777
        return Entry(
            path, "file", mode, st.st_uid, st.st_gid, size, st.st_mtime_ns, "", blocks, key, xattrs
        ), None

    def _other(
        self, dir_fd: int, name: str, path: str, st: os.stat_result
    ) -> tuple[Entry, None] | None:
        mode = st.st_mode
        where = f"/proc/self/fd/{dir_fd}/{name}"
        target = ""
        if stat.S_ISLNK(mode):
            kind = "symlink"
            target = os.readlink(name, dir_fd=dir_fd)
        elif stat.S_ISFIFO(mode):
            kind = "fifo"
        elif stat.S_ISSOCK(mode):
            kind = "socket"
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = "device"
            letter = "c" if stat.S_ISCHR(mode) else "b"
            target = f"{letter}:{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        else:
            return None  # a regular file or directory now: it changed kind meanwhile
        return self._entry(path, kind, st, target=target, xattrs=_xattrs_path(where)), None

    @staticmethod
    def _entry(
        path: str,
        kind: str,
        st: os.stat_result,
        *,
        size: int | None = None,
        target: str = "",
        blocks: tuple[bytes, ...] = (),
        key: int = 0,
        xattrs: tuple[tuple[str, bytes], ...] = (),
    ) -> Entry:
        return Entry(
            path,
            kind,
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
            st.st_size if size is None else size,
            st.st_mtime_ns,
            target,
            blocks,
            key,
            xattrs,
        )


class _Named:
    """A name with its lstat, standing in for an os.DirEntry when a path is looked up."""

    def __init__(self, name: str, st: os.stat_result) -> None:
        self.name = name
        self._st = st

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return stat.S_ISDIR(self._st.st_mode)

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return stat.S_ISREG(self._st.st_mode)

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        return self._st


def _sorted_children(fd: int) -> Iterator[os.DirEntry[str]]:
    with os.scandir(fd) as it:
        return iter(sorted(it, key=lambda e: e.name))


def _hash_file(fd: int, st: os.stat_result) -> tuple[tuple[bytes, ...], int]:
    """The block digests of an open file, and the size they cover (less if it shrank)."""
    size = st.st_size
    if size <= READ_CHUNK:
        data = os.read(fd, size)
        if len(data) <= BLOCK_SIZE:
            return (block_digest(data),), len(data)
        view = memoryview(data)
        digests = tuple(
            block_digest(view[o : o + BLOCK_SIZE]) for o in range(0, len(data), BLOCK_SIZE)
        )
        return digests, len(data)
    sparse = st.st_blocks * 512 < size
    extents = _data_extents(fd, size) if sparse else [(0, size)]
    digests_list: list[bytes] = []
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    off = 0
    for start, end in extents:
        first = start - start % BLOCK_SIZE
        while off < first:  # blocks wholly in a hole: no read needed
            length = min(BLOCK_SIZE, size - off)
            digests_list.append(zero_digest(length))
            off += length
        off = max(off, first)
        while off < end:
            want = min(READ_CHUNK, size - off, _round_up(end) - off)
            got = os.preadv(fd, [view[:want]], off)
            for o in range(0, got, BLOCK_SIZE):
                digests_list.append(block_digest(view[o : min(o + BLOCK_SIZE, got)]))
            off += got
            if got < want:
                return tuple(digests_list), off  # it shrank while we read
    while off < size:
        length = min(BLOCK_SIZE, size - off)
        digests_list.append(zero_digest(length))
        off += length
    return tuple(digests_list), size


def _round_up(offset: int) -> int:
    return -(-offset // BLOCK_SIZE) * BLOCK_SIZE


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The [start, end) ranges of a file that hold data (SEEK_DATA/SEEK_HOLE)."""
    extents: list[tuple[int, int]] = []
    off = 0
    try:
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # no data after off
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if start >= size:
                break
            extents.append((start, end))
            off = end
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return [(0, size)]  # a file system without SEEK_DATA: read it all
        raise
    return extents


def _xattrs_fd(fd: int) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return ()
        if exc.errno == errno.EBADF:  # an O_PATH descriptor
            return _xattrs_path(f"/proc/self/fd/{fd}")
        raise
    if not names:
        return ()
    return tuple(sorted((n, os.getxattr(fd, n)) for n in names if n.startswith(XATTR_PREFIXES)))


def _xattrs_path(where: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(where, follow_symlinks=False)
        if not names:
            return ()
        return tuple(
            sorted(
                (n, os.getxattr(where, n, follow_symlinks=False))
                for n in names
                if n.startswith(XATTR_PREFIXES)
            )
        )
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA, *_GONE):
            return ()
        raise


def _checked_path(path: str) -> str:
    if not isinstance(path, str):
        raise ValueError(f"manifest path {path!r} is not a string")
    parts = path.split("/") if path else []
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in path:
        raise ValueError(
            f"manifest path {path!r} is not a plain relative path "
            "(no leading '/', no '.', '..' or empty components)"
        )
    return path


def _ancestors(path: str) -> list[str]:
    """The directories above `path`, "" first."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(len(parts))]


def _open_beneath(root_fd: int, path: str) -> int:
    """A directory descriptor for `path`, opened one component at a time, no symlinks."""
    if not path:
        return root_fd
    fd = root_fd
    try:
        for part in path.split("/"):
            nxt = os.open(part, _OPEN_DIR, dir_fd=fd)
            if fd != root_fd:
                os.close(fd)
            fd = nxt
    except BaseException:
        if fd != root_fd:
            os.close(fd)
        raise
    return fd


def range_digests(
    root_fd: int, path: str, start: int, end: int, block_size: int = BLOCK_SIZE
) -> tuple[int, dict[int, bytes]]:
    """The size of the regular file `path` (-1: none there) and the digests of its blocks that
    overlap [start, end), by block index (each block as far as the file goes)."""
    parent, _, name = _checked_path(path).rpartition("/")
    try:
        parent_fd = _open_beneath(root_fd, parent)
    except OSError as exc:
        if exc.errno in _GONE:
            return -1, {}
        raise
    try:
        fd = os.open(name, _OPEN_FILE, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in _GONE:
            return -1, {}
        raise
    finally:
        if parent_fd != root_fd:
            os.close(parent_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return -1, {}
        digests: dict[int, bytes] = {}
        last = min(end, st.st_size)
        for index in range(start // block_size, -(-last // block_size)):
            digests[index] = block_digest(os.pread(fd, block_size, index * block_size))
        return st.st_size, digests
    finally:
        os.close(fd)


# --- wire encoding -------------------------------------------------------------------------

MAGIC = b"TMF1"
CHUNK_BYTES = 4 << 20  # a manifest frame's size: well under the stream's frame limit
_HEADER = struct.Struct("<4sI")
# kind, path len, mode, uid, gid, size, mtime_ns, inode_key, blocks, target len, xattrs
_FIXED = struct.Struct("<BHIIIQqQIHH")
_XATTR = struct.Struct("<BI")
_KIND_CODE = {k: i for i, k in enumerate(KINDS)}
_CONTINUED = 0x80  # in the kind byte: more digests of this entry follow in the next entry


def encode_entries(entries: Iterable[Entry]) -> bytes:
    """One chunk holding these entries whole (encode_chunks bounds the size of each chunk)."""
    encoded = [_encode_one(e, e.blocks, 0) for e in entries]
    return _HEADER.pack(MAGIC, len(encoded)) + b"".join(encoded)


def encode_chunks(entries: Iterable[Entry], max_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Chunks of at most about `max_bytes`; a file too big for one (over ~16 GiB at 4 MiB) is
    split across chunks, so read them back with a ManifestReader."""
    parts: list[bytes] = []
    size = _HEADER.size
    for e in entries:
        for piece in _encode_parts(e, max_bytes):
            if parts and size + len(piece) > max_bytes:
                yield _HEADER.pack(MAGIC, len(parts)) + b"".join(parts)
                parts, size = [], _HEADER.size
            parts.append(piece)
            size += len(piece)
    if parts:
        yield _HEADER.pack(MAGIC, len(parts)) + b"".join(parts)


def _encode_parts(e: Entry, max_bytes: int) -> list[bytes]:
    whole = _encode_one(e, e.blocks, 0)
    if _HEADER.size + len(whole) <= max_bytes or not e.blocks:
        return [whole]
    room = (max_bytes - _HEADER.size - len(whole) + len(e.blocks) * DIGEST_BYTES) // DIGEST_BYTES
    room = max(1, room)
    starts = range(0, len(e.blocks), room)
    return [
        _encode_one(e, e.blocks[i : i + room], _CONTINUED if i + room < len(e.blocks) else 0)
        for i in starts
    ]


def _encode_one(e: Entry, blocks: tuple[bytes, ...], flag: int) -> bytes:
    path = e.path.encode("utf-8", "surrogateescape")
    target = e.target.encode("utf-8", "surrogateescape")
    fields = (len(path), e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.inode_key)
    head = _FIXED.pack(_KIND_CODE[e.kind] | flag, *fields, len(blocks), len(target), len(e.xattrs))
    parts = [head, path, target, *blocks]
    for name, value in e.xattrs:
        raw_name = name.encode("utf-8", "surrogateescape")
        parts += (_XATTR.pack(len(raw_name), len(value)), raw_name, value)
    return b"".join(parts)


def decode_entries(raw: bytes) -> list[Entry]:
    """The entries of one chunk; ValueError says what is wrong with a corrupt one."""
    reader = ManifestReader()
    out = reader.feed(raw)
    reader.close()
    return out


class ManifestReader:
    """Reads a manifest sent as chunks, joining a huge file's digests split across them."""

    def __init__(self) -> None:
        self._pending: tuple[Entry, list[bytes]] | None = None

    def feed(self, raw: bytes) -> list[Entry]:
        """The entries completed by this chunk; ValueError if it is corrupt."""
        try:
            return self._feed(bytes(raw))
        except struct.error as exc:
            raise ValueError(f"manifest chunk is truncated: {exc}") from exc

    def close(self) -> None:
        """The manifest ended: an entry still waiting for its digests is an error."""
        if self._pending is not None:
            path = self._pending[0].path
            self._pending = None
            raise ValueError(f"the manifest ended inside the entry of {path!r} (cut short?)")

    def _feed(self, raw: bytes) -> list[Entry]:
        total = len(raw)
        if total < _HEADER.size:
            raise ValueError(f"manifest chunk of {total} bytes is too short for its header")
        magic, count = _HEADER.unpack_from(raw, 0)
        if magic != MAGIC:
            raise ValueError(f"not a manifest chunk: it starts with {magic!r}, not {MAGIC!r}")
        out: list[Entry] = []
        append = out.append
        pos = _HEADER.size
        unpack = _FIXED.unpack_from
        fixed = _FIXED.size
        kinds = KINDS
        for index in range(count):
            if pos + fixed > total:
                raise ValueError(f"manifest chunk is truncated after {index} of {count} entries")
            kind, plen, mode, uid, gid, size, mtime, key, nblocks, tlen, nx = unpack(raw, pos)
            pos += fixed
            end = pos + plen + tlen + nblocks * DIGEST_BYTES
            if end > total:
                raise ValueError(f"manifest entry {index} runs past the end of its chunk")
            if kind & 0x7F >= len(kinds):
                raise ValueError(f"manifest entry {index} has unknown kind code {kind}")
            path = str(raw[pos : pos + plen], "utf-8", "surrogateescape")
            pos += plen
            target = str(raw[pos : pos + tlen], "utf-8", "surrogateescape") if tlen else ""
            pos += tlen
            blocks: tuple[bytes, ...] = ()
            if nblocks == 1:
                blocks = (raw[pos:end],)
            elif nblocks:
                blocks = tuple([raw[p : p + DIGEST_BYTES] for p in range(pos, end, DIGEST_BYTES)])
            pos = end
            xattrs: tuple[tuple[str, bytes], ...] = ()
            if nx:
                xattrs, pos = _decode_xattrs(raw, pos, nx, index)
            entry = Entry(
                path, kinds[kind & 0x7F], mode, uid, gid, size, mtime, target, blocks, key, xattrs
            )
            if kind & _CONTINUED or self._pending is not None:
                entry_or_none = self._join(entry, bool(kind & _CONTINUED))
                if entry_or_none is None:
                    continue
                entry = entry_or_none
            if entry.blocks and len(entry.blocks) != -(-entry.size // BLOCK_SIZE):
                raise ValueError(
                    f"manifest entry {entry.path!r} has {len(entry.blocks)} block digests "
                    f"for {entry.size} bytes"
                )
            append(entry)
        if pos != total:
            raise ValueError(f"manifest chunk has {total - pos} stray bytes after {count} entries")
        return out

    def _join(self, part: Entry, more: bool) -> Entry | None:
        """Adds a part of a split entry; the whole entry once its last part came."""
        if self._pending is None:
            self._pending = (part, list(part.blocks))
        else:
            first, blocks = self._pending
            if part.path != first.path:
                raise ValueError(
                    f"manifest entry {part.path!r} came where the rest of {first.path!r} was due"
                )
            blocks.extend(part.blocks)
        if more:
            return None
        first, blocks = self._pending
        self._pending = None
        return dataclasses.replace(first, blocks=tuple(blocks))


def _decode_xattrs(
    raw: bytes, pos: int, count: int, index: int
) -> tuple[tuple[tuple[str, bytes], ...], int]:
    xattrs = []
    for _ in range(count):
        nlen, vlen = _XATTR.unpack_from(raw, pos)
        pos += _XATTR.size
        if pos + nlen + vlen > len(raw):
            raise ValueError(f"an xattr of manifest entry {index} runs past the end of its chunk")
        name = str(raw[pos : pos + nlen], "utf-8", "surrogateescape")
        xattrs.append((name, raw[pos + nlen : pos + nlen + vlen]))
        pos += nlen + vlen
    return tuple(xattrs), pos
