"""Durable records of what changed while the peer was away: the ALONE journal and the activity log.

Journal: every mirrored operation of a primary running alone goes through a
JournalState; those that changed it (a hot range that is already dirty does
not) are appended as checksummed records and made durable with one fdatasync
before `record` returns, shared by every thread that recorded meanwhile (group
commit). Reopening after a crash replays the file: a torn last record is
dropped, a damaged one in the middle makes the journal untrusted (the resync
must then compare block hashes). The file is rewritten from the state when it
has doubled since the last rewrite or would pass `max_bytes`; if the rewrite
itself would take more than half of `max_bytes` (rewrites would then follow
each other ever closer) the journal overflows: a durable header flag says the
next resync must be a full one, the records and the state are dropped, and
nothing more is written until `clear`. Memory follows the file: the state only
grows when a record is written.

ActivityLog: DRBD's activity log. Before the first write to a coarse extent
that is not in the hot set, the extent is recorded durably, and the least
recently used one leaves the set; after a crash, the extents still in the set
are where writes the peer never got may lie.

File layout (both): a 16-byte header (8-byte magic, 8-byte field), then
records: u32 length, u32 CRC-32 of those 4 bytes, the first 8 bytes of BLAKE3
over length and payload, payload.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from blake3 import blake3

from agent.core.activity import EXTENT_SIZE, ActivityKey, Kind
from agent.core.journal_state import (
    Entry,
    JournalState,
    ReplayPlan,
    decode_entry,
    encode_entry,
)
from agent.core.mirror_ops import Op, OpError

JOURNAL_MAGIC = b"TNDJRNL\x01"
ACTIVITY_MAGIC = b"TNDACTL\x01"
OVERFLOWED = 1  # header flag: records stopped; the next resync must be a full one
UNTRUSTED = 2  # header flag: a record may be missing (a failed fdatasync)
# header flag: a resync from this journal began, so the peer may hold part of it already; the
# next one compares the journal's names by hashes instead of sending everything again
RESYNCING = 4
_HEADER = struct.Struct(">8sQ")
_RECORD = struct.Struct(">II8s")
_LENGTH = struct.Struct(">I")
_KEY = struct.Struct(">BBHQ")  # added/removed, kind, root, index; the path follows
_ADD, _REMOVE = 1, 2
_ALONE = 1 << 63  # activity header flag: writes were made alone, the keys do not cover them
_OPEN = float("inf")  # a pinned key whose operation has no ticket yet
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class JournalError(OSError):
    """The journal cannot make a record durable: the write it covers must not be acknowledged."""


# --- the record format ------------------------------------------------------------------------


def _frame(payload: bytes) -> bytes:
    length = _LENGTH.pack(len(payload))
    digest = blake3(length + payload).digest(8)
    return _RECORD.pack(len(payload), zlib.crc32(length), digest) + payload


@dataclass
class _Scan:
    """What a file holds: its header field, good payloads, where they end, and any damage."""

    header: int = 0
    payloads: list[bytes] = field(default_factory=list)
    end: int = _HEADER.size
    torn: bool = False
    damage: str = ""
    fresh: bool = False


def _scan(raw: bytes, magic: bytes, where: Path) -> _Scan:
    scan = _Scan()
    if len(raw) < _HEADER.size:
        if magic.startswith(raw[: len(magic)]) or not raw.strip(b"\0"):
            scan.fresh = True  # empty, or its creation was cut short: start anew
            return scan
        scan.damage = f"{where} is not a {magic[:7].decode()} file (unknown header)"
        return scan
    head, scan.header = _HEADER.unpack_from(raw)
    if head != magic:
        scan.damage = f"{where} is not a {magic[:7].decode()} file (unknown header)"
        return scan
    pos = _HEADER.size
    while pos < len(raw):
        if len(raw) - pos < _RECORD.size:
            scan.torn = True
            break
        length, check, digest = _RECORD.unpack_from(raw, pos)
        if zlib.crc32(raw[pos : pos + 4]) != check:
            if raw[pos:].strip(b"\0"):
                scan.damage = f"{where}: the record header at byte {pos} is damaged"
            else:
                scan.torn = True  # a zero-filled tail: the last append never completed
            break
        end = pos + _RECORD.size + length
        if end > len(raw):
            scan.torn = True
            break
        payload = raw[pos + _RECORD.size : end]
        if blake3(raw[pos : pos + 4] + payload).digest(8) != digest:
            if end == len(raw):
                scan.torn = True
            else:
                scan.damage = f"{where}: the record at byte {pos} fails its checksum"
            break
        scan.payloads.append(payload)
        pos = end
    scan.end = pos
    return scan


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    # pwrite, not O_APPEND: on Linux pwrite to an O_APPEND file ignores its offset (the header).
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open(path: Path) -> tuple[int, bytes]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise JournalError(exc.errno, f"cannot open {path}: {exc.strerror}") from None
    return fd, _read_all(fd)


def _rewrite(path: Path, content: bytes) -> int:
    """Replace `path` by `content` atomically and durably; the new file's descriptor."""
    temp = path.with_name(path.name + ".rewrite")
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, content, 0)
        os.fdatasync(fd)
        os.rename(temp, path)
        _fsync_dir(path.parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


# --- the ALONE journal ------------------------------------------------------------------------


class Journal:
    """The durable, coalesced record of what changed while the primary ran alone."""

    def __init__(self, path: Path, *, max_bytes: int = 64 << 20, compact_at: int = 1 << 20) -> None:
        if max_bytes < 4096:
            raise ValueError(f"journal max_bytes {max_bytes} is too small: give at least 4096")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.syncs = 0  # fdatasync calls made for records (group commit shares them)
        self.reason = ""
        self._compact_min = compact_at
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._state = JournalState()
        self._trusted = True
        self._overflowed = False
        self._flagged = False  # the untrusted flag is durable in the header
        self._resyncing = False
        self._written = 0  # batches appended
        self._synced = 0  # batches known durable
        self._syncing = False
        self._closed = False
        self._fd, raw = _open(self.path)
        self._size = len(raw)
        try:
            self._load(raw)
        except BaseException:
            os.close(self._fd)
            raise
        self._compact_at = max(self._compact_min, 2 * self._size)

    def _load(self, raw: bytes) -> None:
        scan = _scan(raw, JOURNAL_MAGIC, self.path)
        if scan.fresh:
            self._reset_file(0)
            _fsync_dir(self.path.parent)
            return
        if scan.damage:
            self._distrust(scan.damage + "; the next resync must compare every block")
            self._flagged = True  # the damage stays in the file until `clear`: durable
            return
        for index, payload in enumerate(scan.payloads):
            try:
                self._state.record(decode_entry(payload))
            except (OpError, ValueError) as exc:
                self._distrust(f"{self.path}: record {index} is not a journal entry ({exc})")
                self._flagged = True
                return
        self._resyncing = bool(scan.header & RESYNCING)
        if scan.header & UNTRUSTED:
            self._distrust("an earlier fdatasync of the journal failed")
            self._flagged = True
        if scan.header & OVERFLOWED:
            self._overflowed = True
            self.reason = f"the journal passed its bound of {self.max_bytes} bytes"
            self._state = JournalState()
        if scan.torn:
            os.ftruncate(self._fd, scan.end)  # later appends must follow the last good record
            os.fdatasync(self._fd)
            self._size = scan.end

    # --- what the agent reads -------------------------------------------------------------

    @property
    def state(self) -> JournalState:
        return self._state

    @property
    def trusted(self) -> bool:
        """False when a record may be missing (`reason` says why): resync by block hashes."""
        return self._trusted

    @property
    def overflowed(self) -> bool:
        """The journal passed `max_bytes`: the next resync must be a full one (by hashes)."""
        return self._overflowed

    @property
    def usable(self) -> bool:
        """An incremental resync may use this journal's plan."""
        return self._trusted and not self._overflowed

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def resyncing(self) -> bool:
        """A resync from this journal began and did not finish (`begin_resync`)."""
        return self._resyncing

    def plan(self) -> ReplayPlan:
        """The state's replay plan, taken under the journal's lock (safe against `record`)."""
        with self._lock:
            return self._state.replay_plan()

    def names(self) -> set[tuple[int, str]]:
        """Every name the journal knows changed (see JournalState.names)."""
        with self._lock:
            return self._state.names()

    def adopt(self, entries: Sequence[Entry]) -> None:
        """Put `entries` BEFORE everything recorded (the returning peer's activity keys: they
        name its copy as it was when this journal began), rewriting the file durably."""
        with self._lock:
            if self._closed:
                raise JournalError(errno.EBADF, f"the journal {self.path} is closed")
            if not self.usable or not entries:
                return
            state = JournalState()
            for entry in [*entries, *self._state.entries()]:
                state.record(entry)
            self._state = state
            self._compact_locked()

    def knows_names(self, root: int, path: str, links: int) -> bool:
        """Whether the journal knows all `links` names of the file at `path`."""
        with self._lock:
            return self._state.name_count((root, path)) >= links

    def distrust(self, reason: str) -> None:
        """The next resync must compare everything (durably in the header when it can be:
        otherwise the next record fails and the write with it)."""
        with self._lock:
            if not self._trusted:
                return
            while self._syncing:
                self._cond.wait()
            self._distrust_durably(reason)

    def compare_names(self) -> set[tuple[int, str]]:
        """What a resync compares by hashes after the replay (see JournalState.compare_names)."""
        with self._lock:
            return self._state.compare_names()

    def begin_resync(self) -> None:
        """A resync starts sending this journal: say so durably in the header, so that an
        interrupted one is resumed (compared by hashes) rather than sent again whole."""
        with self._lock:
            if self._closed:
                raise JournalError(errno.EBADF, f"the journal {self.path} is closed")
            if self._resyncing:
                return
            self._resyncing = True
            try:
                os.pwrite(self._fd, struct.pack(">Q", self._flags()), 8)
                os.fdatasync(self._fd)
            except OSError as exc:
                self._fail(f"marking the journal's resync failed: {exc.strerror}")

    # --- recording ------------------------------------------------------------------------

    def record(self, ops: Sequence[Op]) -> None:
        """Record `ops` in order; durable when this returns (JournalError if it cannot be)."""
        self.wait_durable(self.append(ops))

    def append(self, ops: Sequence[Op]) -> int:
        """Apply and append `ops` without waiting for the disk; `wait_durable` the ticket.

        For a caller that must order ops under its own lock: append there, then wait for
        durability after releasing it, so that several threads share one fdatasync.
        """
        with self._lock:
            if self._closed:
                raise JournalError(errno.EBADF, f"the journal {self.path} is closed")
            if not self.usable:
                if not self._trusted and not self._flagged:
                    raise JournalError(errno.EIO, f"the journal cannot record: {self.reason}")
                return 0  # the next resync is a full one: it will carry these too
            records = [_frame(encode_entry(op)) for op in ops if self._state.record(op)]
            if records:
                self._append(b"".join(records))
            # Even a batch that wrote nothing waits for the records it relies on (a hot range
            # recorded by another thread whose fdatasync is still running).
            return self._written

    def wait_durable(self, ticket: int) -> None:
        """Return once everything appended up to `ticket` is on disk (one shared fdatasync)."""
        with self._lock:
            self._wait_synced(ticket)

    def _append(self, blob: bytes) -> None:
        if self._size + len(blob) > self.max_bytes or self._size + len(blob) > self._compact_at:
            self._compact_locked()  # the state already holds these ops: the rewrite has them
            return
        try:
            _write_all(self._fd, blob, self._size)
        except OSError as exc:
            self._undo_append()
            if exc.errno in _NO_SPACE:
                self._overflow_locked(f"no space left for the journal ({exc.strerror})")
                return
            self._fail(f"appending to {self.path} failed: {exc.strerror}")
        self._size += len(blob)
        self._written += 1

    def _undo_append(self) -> None:
        with contextlib.suppress(OSError):  # a torn tail is dropped on the next open anyway
            os.ftruncate(self._fd, self._size)

    def _wait_synced(self, target: int) -> None:
        while self._synced < target:
            if not self._trusted:
                if self._flagged:
                    return  # durably untrusted: a full resync will carry this write
                raise JournalError(errno.EIO, f"the journal cannot record: {self.reason}")
            if self._syncing:
                self._cond.wait()
                continue
            self._syncing = True
            upto, fd = self._written, self._fd
            self._lock.release()
            failure: OSError | None = None
            try:
                os.fdatasync(fd)
            except OSError as exc:
                failure = exc
            finally:
                self._lock.acquire()
                self._syncing = False
                self._cond.notify_all()
            self.syncs += 1
            if failure is not None:
                self._fail(f"fdatasync of {self.path} failed: {failure.strerror}")
            self._synced = max(self._synced, upto)

    def _fail(self, reason: str) -> None:
        """A record may not be durable: distrust the journal (durably if we can) and refuse."""
        self._distrust_durably(reason)
        raise JournalError(errno.EIO, f"the journal cannot record: {reason}")

    def _distrust_durably(self, reason: str) -> None:
        """Distrust, and say so in the header if the disk lets us (else records fail)."""
        self._distrust(reason)
        try:
            os.pwrite(self._fd, struct.pack(">Q", self._flags()), 8)
            os.fdatasync(self._fd)
            self._flagged = True
        except OSError:
            self._flagged = False

    def _distrust(self, reason: str) -> None:
        self._trusted = False
        self.reason = reason
        self._state = JournalState()

    def _flags(self) -> int:
        return (
            (OVERFLOWED if self._overflowed else 0)
            | (0 if self._trusted else UNTRUSTED)
            | (RESYNCING if self._resyncing else 0)
        )

    # --- rewriting ------------------------------------------------------------------------

    def compact(self) -> None:
        """Rewrite the file from the state (temp file, rename, directory fsync)."""
        with self._lock:
            if self._closed:
                raise JournalError(errno.EBADF, f"the journal {self.path} is closed")
            if self.usable:
                self._compact_locked()

    def _compact_locked(self) -> None:
        while self._syncing:
            self._cond.wait()  # the syncing thread holds the old descriptor
        body = b"".join(_frame(encode_entry(e)) for e in self._state.entries())
        content = _HEADER.pack(JOURNAL_MAGIC, self._flags()) + body
        # Past half the bound, rewrites would follow each other ever closer: overflow instead.
        if len(content) > self.max_bytes // 2 or self._state.bytes_estimate > 4 * self.max_bytes:
            self._overflow_locked(
                f"the journal needs {len(content)} bytes even compacted, more than half its"
                f" bound of {self.max_bytes} bytes"
            )
            return
        try:
            fd = _rewrite(self.path, content)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                self._overflow_locked(f"no space left to compact the journal ({exc.strerror})")
                return
            self._fail(f"compacting {self.path} failed: {exc.strerror}")
        os.close(self._fd)
        self._fd = fd
        self._size = len(content)
        self._synced = self._written
        self._compact_at = max(self._compact_min, 2 * self._size)

    def _overflow_locked(self, reason: str) -> None:
        """Stop recording: a durable flag asks for a full resync; the records are dropped."""
        while self._syncing:
            self._cond.wait()
        self._overflowed = True
        self.reason = reason
        self._state = JournalState()
        try:
            os.pwrite(self._fd, struct.pack(">Q", self._flags()), 8)
            os.fdatasync(self._fd)
            os.ftruncate(self._fd, _HEADER.size)
            os.fdatasync(self._fd)
        except OSError as exc:
            self._fail(f"marking the journal overflowed failed: {exc.strerror}")
        self._size = _HEADER.size
        self._synced = self._written

    def clear(self) -> None:
        """Forget everything (a resync completed): an empty, trusted journal, durably."""
        with self._lock:
            if self._closed:
                raise JournalError(errno.EBADF, f"the journal {self.path} is closed")
            while self._syncing:
                self._cond.wait()
            self._reset_file(0)
            self._state = JournalState()
            self._trusted, self._overflowed, self._flagged = True, False, False
            self._resyncing = False
            self.reason = ""
            self._synced = self._written
            self._compact_at = self._compact_min

    def _reset_file(self, flags: int) -> None:
        os.ftruncate(self._fd, 0)
        _write_all(self._fd, _HEADER.pack(JOURNAL_MAGIC, flags), 0)
        os.fdatasync(self._fd)
        self._size = _HEADER.size

    def close(self) -> None:
        with self._lock:
            while self._syncing:
                self._cond.wait()
            if not self._closed:
                self._closed = True
                os.close(self._fd)


# --- the activity log -------------------------------------------------------------------------


class ActivityLog:
    """The keys (agent.core.activity) where this copy may hold changes its peer never got.

    `pin` makes an operation's keys durably hot BEFORE this copy changes; `settle` gives
    them the ticket of the mirrored operation; a key leaves the set (least recently used
    first, once more than `slots` are hot) only when the peer has acknowledged its last
    ticket, so every unacknowledged change is covered, however many are in flight. Writes
    made while journalling alone are not pinned: `mark_alone` says durably that the log no
    longer covers this copy (the journal's group commit follows the local write), until
    `settled` after a resync.
    """

    def __init__(
        self,
        path: Path,
        extent_size: int = EXTENT_SIZE,
        slots: int = 64,
        *,
        keep_leftover: bool = False,
    ) -> None:
        if extent_size < 4096 or slots < 1:
            raise ValueError(
                f"activity log extent_size {extent_size} / slots {slots}: give an extent of at"
                " least 4096 bytes and at least one slot"
            )
        self.path = Path(path)
        self.extent_size = extent_size
        self.slots = slots
        self.syncs = 0
        self.trusted = True
        self.alone = False
        self.reason = ""
        self._lock = threading.Lock()
        self._hot: OrderedDict[ActivityKey, float] = OrderedDict()  # key -> ticket (inf: open)
        self._open: list[ActivityKey] = []  # pinned, their operation not enqueued yet
        self._rewrite_at = 1024 * slots  # the file is rewritten from the set past this size
        # Keys left by a crash that this node is about to give back itself stay until `settled`
        # (a second crash before the resync must still find them); else they may leave at once.
        self._leftover_ticket = _OPEN if keep_leftover else 0.0
        self._fd, raw = _open(self.path)
        self._size = len(raw)
        try:
            self._load(raw)
        except BaseException:
            os.close(self._fd)
            raise
        self._closed = False

    @classmethod
    def load(cls, path: Path, extent_size: int = EXTENT_SIZE, slots: int = 64) -> ActivityLog:
        """Open an existing log (after a crash) to read its `keys`."""
        return cls(path, extent_size, slots)

    @property
    def usable(self) -> bool:
        """Its keys cover every change the peer may lack (trusted, and no write made alone)."""
        return self.trusted and not self.alone

    def _load(self, raw: bytes) -> None:
        scan = _scan(raw, ACTIVITY_MAGIC, self.path)
        if scan.fresh:
            self._reset()
            _fsync_dir(self.path.parent)
            return
        if scan.damage:
            self.trusted = False
            self.reason = scan.damage + "; the returning node must compare every block"
        self.alone = bool(scan.header & _ALONE)
        if scan.payloads and scan.header & ~_ALONE != self.extent_size:
            self.extent_size = scan.header & ~_ALONE  # its indexes count extents of that size
        for payload in scan.payloads:
            try:
                change, kind, root, index = _KEY.unpack_from(payload)
                name = payload[_KEY.size :].decode("utf-8", "surrogateescape")
                Kind(kind)
            except (struct.error, UnicodeDecodeError, ValueError) as exc:
                self.trusted = False
                self.reason = f"{self.path}: a record is not an activity key ({exc})"
                break
            key = (kind, root, name, index)
            if change == _ADD:
                self._hot[key] = self._leftover_ticket
            else:
                self._hot.pop(key, None)
        if scan.torn and not scan.damage:
            os.ftruncate(self._fd, scan.end)
            os.fdatasync(self._fd)
            self._size = scan.end
        if not scan.payloads and not scan.damage and not self.alone:
            self._reset()

    def pin(self, keys: Sequence[ActivityKey], acked: int) -> None:
        """Before a change to `keys`: they are durably hot when this returns. Keys whose last
        ticket is at most `acked` may leave the set to keep it near `slots`."""
        if not keys or not self.trusted:
            return
        with self._lock:
            hot = self._hot
            self._open = list(keys)  # a new step: every op it enqueues settles these keys
            new = []
            for key in keys:
                if key in hot:
                    hot.move_to_end(key)
                else:
                    new.append(key)
                hot[key] = _OPEN
            if not new:
                return
            records = [_key_record(_ADD, key) for key in new]
            # A name is compared whole (its subtree too) when given back: it leaves as soon
            # as the peer has it, riding on this record's sync.
            for key, ticket in list(hot.items()):
                if key[0] == Kind.NAME and ticket <= acked:
                    del hot[key]
                    records.append(_key_record(_REMOVE, key))
            while len(hot) > self.slots:
                oldest, ticket = next(iter(hot.items()))
                if ticket > acked:
                    break  # still in flight: the set grows rather than lose it
                del hot[oldest]
                records.append(_key_record(_REMOVE, oldest))
            blob = b"".join(records)
            try:
                if self._size + len(blob) > self._rewrite_at:
                    self._rewrite()
                else:
                    _write_all(self._fd, blob, self._size)
                    os.fdatasync(self._fd)
                    self._size += len(blob)
            except OSError as exc:
                self._give_up(f"recording in {self.path} failed: {exc.strerror}")
                return
            self.syncs += 1

    def settle(self, ticket: int) -> None:
        """An operation of the step that pinned the open keys is enqueued as `ticket` (no I/O):
        a step of several (a write cut into frames) leaves them with its last ticket."""
        with self._lock:
            for key in self._open:
                if key in self._hot:
                    self._hot[key] = ticket

    def _give_up(self, reason: str) -> None:
        """The log cannot record: it must not outlive this as if it covered the copy (a full
        resync covers a crash from now on). Lock held."""
        self.trusted = False
        self.reason = reason
        with contextlib.suppress(OSError):
            self.path.unlink()

    def mark_alone(self) -> None:
        """This copy now changes without the log: it no longer covers it (durably)."""
        with self._lock:
            if self.alone or self._closed:
                return
            self.alone = True
            try:
                self._write_header()
            except OSError as exc:
                self._give_up(f"marking {self.path} failed: {exc.strerror}")

    def settled(self, acked: int) -> None:
        """The peer holds everything up to `acked` (a resync ended): keys with nothing newer
        in flight leave, and the log covers this copy again. Called between steps (ordered()
        held), so a key still open is one kept from a crash: it leaves too."""
        with self._lock:
            for key in [k for k, ticket in self._hot.items() if ticket <= acked or ticket == _OPEN]:
                del self._hot[key]
            alone, self.alone = self.alone, False
            try:
                self._rewrite()
            except OSError as exc:
                self.alone = alone
                self._give_up(f"rewriting {self.path} failed: {exc.strerror}")
                return
            self.trusted, self.reason = True, ""

    def _write_header(self) -> None:
        os.pwrite(self._fd, _HEADER.pack(ACTIVITY_MAGIC, self._header()), 0)
        os.fdatasync(self._fd)

    def _header(self) -> int:
        return self.extent_size | (_ALONE if self.alone else 0)

    def _rewrite(self) -> None:
        body = b"".join(_key_record(_ADD, key) for key in self._hot)
        content = _HEADER.pack(ACTIVITY_MAGIC, self._header()) + body
        fd = _rewrite(self.path, content)
        os.close(self._fd)
        self._fd = fd
        self._size = len(content)
        self._rewrite_at = max(1024 * self.slots, 2 * self._size)

    def hot(self) -> list[ActivityKey]:
        """Every hot key, least recently used first."""
        with self._lock:
            return list(self._hot)

    def _reset(self) -> None:
        os.ftruncate(self._fd, 0)
        _write_all(self._fd, _HEADER.pack(ACTIVITY_MAGIC, self._header()), 0)
        os.fdatasync(self._fd)
        self._size = _HEADER.size

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)


def _key_record(change: int, key: ActivityKey) -> bytes:
    kind, root, name, index = key
    return _frame(_KEY.pack(change, kind, root, index) + name.encode("utf-8", "surrogateescape"))
