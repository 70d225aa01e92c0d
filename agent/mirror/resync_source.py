"""The source side of a resync: make the peer's directories equal to ours while the app writes.

Every step reads the source's CURRENT state under the replicator's ordering
lock and enqueues the operation there, so it lands in the stream in the same
order as the application's own mirrored writes: a step never undoes a newer
live change, and a live change never gets lost behind a stale step.

Two ways to know what differs:
- incremental: the ALONE journal (namespace operations replayed first, in the
  same locked section that attaches the stream; then the dirty ranges, whose
  paths follow later renames because live namespace operations keep feeding the
  journal state while the resync runs);
- full: both sides hash their trees by blocks (the receiver answers a
  `manifest` request in stream order) and only differing blocks are sent;
  passes repeat until nothing differs, which also catches a rename that moved a
  file between the two scans.
"""

from __future__ import annotations

import json
import os
import queue
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial

from agent.core import mirror_frames as mf
from agent.core.mirror_ops import (
    Chmod,
    Chown,
    Create,
    Link,
    Mkdir,
    Mknod,
    Op,
    RemoveXattr,
    Rmdir,
    SetXattr,
    Symlink,
    Truncate,
    Unlink,
    Utimens,
    Write,
)
from agent.core.resync import BLOCK_SIZE, block_digest, differing_paths, plan
from agent.mirror.link import LinkClosed
from agent.mirror.manifest import Entry, ManifestReader, scan
from agent.mirror.receiver import MAX_HASHED_SPAN
from agent.mirror.sender import LinkState, MirrorReplicator

CHUNK = 1 << 20
CONTROL_PATH_BYTES = 4 << 20  # paths per control frame, well under the stream's frame limit
RESYNC_WINDOW = 32 << 20
Step = Callable[[int, str, "os.stat_result | None"], None]
MAX_PASSES = 3


@dataclass
class Progress:
    """Bytes done of total, the rate and the ETA, as status shows them."""

    total_bytes: int = 0
    done_bytes: int = 0
    started: float = 0.0
    sent_bytes: int = 0

    def rate_bps(self, now: float) -> float:
        elapsed = now - self.started
        return self.done_bytes / elapsed if elapsed > 0 else 0.0

    def eta_s(self, now: float) -> float | None:
        rate = self.rate_bps(now)
        if rate <= 0:
            return None
        return max(0.0, (self.total_bytes - self.done_bytes) / rate)

    def as_dict(self, now: float) -> dict[str, float | int | None]:
        return {
            "done_bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
            "rate_bps": round(self.rate_bps(now)),
            "eta_s": None if (eta := self.eta_s(now)) is None else round(eta, 1),
        }


class RateLimit:
    """A token bucket on bytes sent by the resync (live writes are never limited)."""

    def __init__(self, bytes_per_s: float | None) -> None:
        self.rate = bytes_per_s
        self._allowance = 0.0
        self._last = time.monotonic()

    def take(self, count: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self._allowance = min(self.rate, self._allowance + (now - self._last) * self.rate)
        self._last = now
        self._allowance -= count
        if self._allowance < 0:
            time.sleep(-self._allowance / self.rate)


class SourceResync:
    """Runs one resync over the replicator's stream; raises LinkClosed if the link is lost."""

    def __init__(
        self,
        replicator: MirrorReplicator,
        root_fds: Sequence[int],
        excluded: Sequence[Callable[[str, bool], bool] | None],
        progress: Progress,
        limit: RateLimit,
        *,
        quarantine: bool = False,
    ) -> None:
        self.replicator = replicator
        self.root_fds = list(root_fds)
        self.excluded = list(excluded)
        self.progress = progress
        self.limit = limit
        self.last_ticket = 0
        self.changed: list[tuple[int, str]] = []
        # The target's own versions of what differs are kept aside first (split brain, or
        # a first sync onto a directory that already held files).
        self.quarantine = quarantine
        self._source_paths: set[str] = set()

    # --- full, by block hashes ---------------------------------------------------------------

    def full(self) -> None:
        """Passes by hashes; another only if a rename may have moved a file between scans."""
        for attempt in range(MAX_PASSES):
            self.replicator.resync_active = True
            self.replicator.renamed_during_resync = False
            for root in range(len(self.root_fds)):
                self._full_pass(root, first=attempt == 0)
            if not self.replicator.renamed_during_resync:
                break
        self._finish()

    def compare_names(self, names: Sequence[tuple[int, str]]) -> None:
        """Resume an interrupted resync: compare by hashes only the names the journal knows
        changed (a directory with its subtree), so what the peer already got is not sent again."""
        for root in range(len(self.root_fds)):
            paths = sorted({p for r, p in names if r == root})
            if paths:
                self._full_pass(root, first=True, paths=paths)
        self._finish()

    def touched_pass(self, touched: set[tuple[int, str]]) -> None:
        """Compare again what live operations touched while the resync ran: one that reached
        the secondary before the resync had made its parent was skipped there."""
        for root in range(len(self.root_fds)):
            paths = sorted(p for r, p in touched if r == root)
            if paths:
                self._full_pass(root, first=False, paths=paths)
        self._finish()

    def _full_pass(self, root: int, first: bool, paths: list[str] | None = None) -> None:
        target = target_manifest(self.replicator, root, paths)
        source = list(scan(self.root_fds[root], self.excluded[root], paths=paths))
        steps = plan(source, target)
        if first:
            self.changed.extend((root, p) for p in steps.changed_paths)
        self.progress.total_bytes += steps.total_bytes
        by_path = {e.path: e for e in target}
        self._source_paths = {e.path for e in source}
        if self.quarantine and first:
            doomed = [p for p in steps.changed_paths if p in by_path and by_path[p].kind != "dir"]
            for some in path_chunks(doomed):
                self.replicator.enqueue_control({"type": "quarantine", "root": root, "paths": some})
        for path in steps.removes:
            self._remove(root, path, by_path.get(path))
        for entry in steps.mkdirs:
            self._locked(root, entry.path, self._mkdir)
        for entry in steps.creates:
            self._locked(root, entry.path, self._create)
        for entry in (*steps.symlinks, *steps.specials):
            self._locked(root, entry.path, self._special)
        for existing, new in steps.links:
            self._link(root, existing, new)
        for rng in steps.ranges:
            self._send_range(root, rng.path, rng.offset, rng.length)
        for path, _size in steps.truncates:
            self._locked(root, path, self._truncate)
        for path, name in steps.remove_xattrs:
            self._locked(root, path, partial(self._remove_xattr, name=name))
        for entry in steps.metadata:
            self._locked(root, entry.path, self._metadata)

    # --- incremental, from the journal -------------------------------------------------------

    def incremental(
        self,
        ranges: dict[tuple[int, str], list[tuple[int, int]]],
        hashed: dict[tuple[int, str], list[tuple[int, int]]] | None = None,
    ) -> None:
        """Send the journal's dirty ranges (namespace ops were replayed at attach), then each
        file's size and metadata; `hashed`: ranges sent only where the target's block digests
        differ (what a returning peer's activity log named: mostly the same bytes already)."""
        hashed = hashed or {}
        for key in ranges.keys() | hashed.keys():
            root, path = key
            st = self._lstat(root, path)
            size = st.st_size if st is not None else 0
            # A range "to the end of the file" (collapse/insert) counts what the file holds.
            spans = [*ranges.get(key, ()), *hashed.get(key, ())]
            self.progress.total_bytes += sum(max(0, min(end, size) - start) for start, end in spans)
        for key in sorted(ranges.keys() | hashed.keys()):
            root, path = key
            for start, end in ranges.get(key, ()):
                self._send_range(root, path, start, end - start)
            for start, end in hashed.get(key, ()):
                self._send_differing(root, path, start, end - start)
            self._locked(root, path, self._truncate)
            self._locked(root, path, self._metadata)
        self._finish()

    def metadata_only(self, paths: Sequence[tuple[int, str]]) -> None:
        for root, path in paths:
            self._locked(root, path, self._metadata)

    # --- steps, each under the ordering lock against the current source --------------------

    def _lstat(self, root: int, path: str) -> os.stat_result | None:
        try:
            return os.lstat(path or ".", dir_fd=self.root_fds[root])
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _locked(self, root: int, path: str, step: Step) -> None:
        """Run one step against the source's current state of `path`, in stream order."""
        with self.replicator.ordered():
            step(root, path, self._lstat(root, path))

    def _enqueue(self, op: Op) -> None:
        self.last_ticket = self.replicator.enqueue(op, live=False)

    def _remove(self, root: int, path: str, target: Entry | None) -> None:
        with self.replicator.ordered():
            if path not in self._source_paths and self._lstat(root, path) is not None:
                return  # an extra that came back meanwhile: a live op already mirrored it
            if target is not None and target.kind == "dir":
                self._enqueue(Rmdir(root, path))
            else:
                self._enqueue(Unlink(root, path))

    def _mkdir(self, root: int, path: str, st: os.stat_result | None) -> None:
        if st is not None and stat.S_ISDIR(st.st_mode):
            self._enqueue(Mkdir(root, path, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid))

    def _create(self, root: int, path: str, st: os.stat_result | None) -> None:
        if st is not None and stat.S_ISREG(st.st_mode):
            self._enqueue(Create(root, path, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid))

    def _special(self, root: int, path: str, st: os.stat_result | None) -> None:
        if st is None:
            return
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(path, dir_fd=self.root_fds[root])
            self._enqueue(Symlink(root, path, target, st.st_uid, st.st_gid))
        elif not stat.S_ISDIR(st.st_mode) and not stat.S_ISREG(st.st_mode):
            self._enqueue(Mknod(root, path, st.st_mode, st.st_rdev, st.st_uid, st.st_gid))

    def _link(self, root: int, existing: str, new: str) -> None:
        with self.replicator.ordered():
            a, b = self._lstat(root, existing), self._lstat(root, new)
            if a is not None and b is not None and (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev):
                self._enqueue(Unlink(root, new))
                self._enqueue(Link(root, existing, new))

    def _send_range(self, root: int, path: str, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            size = min(CHUNK, end - offset)
            # A bounded window in flight: memory stays small, progress counts what arrives.
            self.replicator.wait_room(RESYNC_WINDOW)
            with self.replicator.ordered():
                data = self._read(root, path, offset, size)
                if data:
                    self._enqueue(Write(root, path, offset, data))
            self.progress.done_bytes += size
            self.progress.sent_bytes += len(data)
            self.limit.take(size)
            if not data:
                return
            offset += size

    def _send_differing(self, root: int, path: str, offset: int, length: int) -> None:
        """Like _send_range, but a block whose digest the target already holds is skipped.
        Each block is read, compared and sent under the ordering lock: a live write racing
        the comparison reaches the target after the digests were taken, and lands the same."""
        st = self._lstat(root, path)
        end = min(offset + length, st.st_size if st is not None else 0)
        pos = offset - offset % BLOCK_SIZE
        while pos < end:
            piece_end = min(end, pos + MAX_HASHED_SPAN)
            self.replicator.wait_room(RESYNC_WINDOW)
            digests = self._target_digests(root, path, pos, piece_end)
            for index in range(pos // BLOCK_SIZE, -(-piece_end // BLOCK_SIZE)):
                at = index * BLOCK_SIZE
                with self.replicator.ordered():
                    data = self._read(root, path, at, BLOCK_SIZE)
                    differs = bool(data) and digests.get(index) != block_digest(data)
                    if differs:
                        self._enqueue(Write(root, path, at, data))
                self.progress.done_bytes += min(BLOCK_SIZE, max(0, end - at))
                if differs:
                    self.progress.sent_bytes += len(data)
                    self.limit.take(len(data))
                    self.replicator.wait_room(RESYNC_WINDOW)
            pos = piece_end

    def _target_digests(self, root: int, path: str, start: int, end: int) -> dict[int, bytes]:
        """The target's digests of `path`'s blocks in [start, end), asked in stream order."""
        request = {"type": "hashes", "root": root, "path": path, "start": start, "end": end}
        self.replicator.enqueue_control(request)
        while True:
            if self.replicator.state is not LinkState.CONNECTED:
                raise LinkClosed(self.replicator.reason)
            try:
                kind, payload = self.replicator.incoming.get(timeout=0.5)
            except queue.Empty:
                continue
            if kind is not mf.FrameKind.CONTROL:
                continue
            try:
                answer = mf.decode_json(payload)
                if answer.get("type") != "hashes":
                    continue
                return {int(k): bytes.fromhex(v) for k, v in answer["digests"].items()}
            except (mf.StreamError, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise LinkClosed(f"the peer's block digests are malformed: {exc}") from None

    def _read(self, root: int, path: str, offset: int, size: int) -> bytes:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.root_fds[root])
        except OSError:
            return b""
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return b""
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def _truncate(self, root: int, path: str, st: os.stat_result | None) -> None:
        if st is not None and stat.S_ISREG(st.st_mode):
            self._enqueue(Truncate(root, path, st.st_size))

    def _metadata(self, root: int, path: str, st: os.stat_result | None) -> None:
        if st is None:
            return
        if not stat.S_ISLNK(st.st_mode):
            self._enqueue(Chmod(root, path, stat.S_IMODE(st.st_mode)))
            for name, value in _xattrs(self.root_fds[root], path):
                self._enqueue(SetXattr(root, path, name, value))
        self._enqueue(Chown(root, path, st.st_uid, st.st_gid))
        self._enqueue(Utimens(root, path, st.st_atime_ns, st.st_mtime_ns))

    def _remove_xattr(self, root: int, path: str, st: os.stat_result | None, *, name: str) -> None:
        if st is not None and name not in dict(_xattrs(self.root_fds[root], path)):
            self._enqueue(RemoveXattr(root, path, name))

    def _finish(self) -> None:
        if self.last_ticket:
            self.replicator.wait_acked(self.last_ticket)


def path_chunks(paths: list[str], max_bytes: int = CONTROL_PATH_BYTES) -> Iterator[list[str]]:
    """`paths` in lists small enough for one control frame each (none if `paths` is empty)."""
    chunk: list[str] = []
    size = 0
    for path in paths:
        encoded = len(json.dumps(path)) + 1  # as the frame carries it, escapes and comma
        if chunk and size + encoded > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(path)
        size += encoded
    if chunk:
        yield chunk


def target_manifest(
    replicator: MirrorReplicator, root: int, paths: list[str] | None = None
) -> list[Entry]:
    """The receiver's manifest of one directory (or of `paths` in it), asked in stream order."""
    if paths is None:
        return _manifest(replicator, root, None)
    return [entry for some in path_chunks(paths) for entry in _manifest(replicator, root, some)]


def _manifest(replicator: MirrorReplicator, root: int, paths: list[str] | None) -> list[Entry]:
    request: dict[str, object] = {"type": "manifest", "root": root}
    if paths is not None:
        request["paths"] = paths
    ticket = replicator.enqueue_control(request)
    entries: list[Entry] = []
    reader = ManifestReader()
    while True:
        if replicator.state is not LinkState.CONNECTED:
            raise LinkClosed(replicator.reason)
        try:
            kind, payload = replicator.incoming.get(timeout=0.5)
        except queue.Empty:
            continue
        if kind is not mf.FrameKind.MANIFEST:
            continue
        if not payload:
            break
        try:
            entries.extend(reader.feed(payload))
        except ValueError as exc:
            raise LinkClosed(f"the peer's manifest is malformed: {exc}") from None
    reader.close()
    replicator.wait_acked(ticket)
    return entries


def verify_root(
    replicator: MirrorReplicator,
    root_fd: int,
    excluded: Callable[[str, bool], bool] | None,
    root: int,
) -> tuple[list[str], int]:
    """Paths that differ between both sides (checked twice: a write in flight is no difference).

    Modification times are left out: a mirrored write sets each copy's own clock (the
    resync aligns them; between resyncs they drift by the time a write takes to cross).
    """
    target = _timeless(target_manifest(replicator, root))
    source = _timeless(scan(root_fd, excluded))
    suspects = differing_paths(source, target)
    if not suspects:
        return [], len(source)
    again_target = _timeless(target_manifest(replicator, root, suspects))
    again_source = _timeless(scan(root_fd, excluded, paths=suspects))
    return differing_paths(again_source, again_target), len(source)


def _timeless(entries: Iterable[Entry]) -> list[Entry]:
    return [replace(e, mtime_ns=0) for e in entries]


def _xattrs(root_fd: int, path: str) -> list[tuple[str, bytes]]:
    where = f"/proc/self/fd/{root_fd}/{path}" if path else f"/proc/self/fd/{root_fd}"
    try:
        names = os.listxattr(where, follow_symlinks=False)
        return [(n, os.getxattr(where, n, follow_symlinks=False)) for n in sorted(names)]
    except OSError:
        return []
