"""The resync planner: from two tree manifests, what must cross the link so the target equals
the source.

Pure: it compares `Entry` lists (made by agent.mirror.manifest on each side) and returns a
`ResyncPlan`; the sender carries it out, reading the source's CURRENT data for each range
under the stream's ordering lock, so a block changed since the scan is still sent right.

Block digests are of content (a hole hashes as the zeros it reads as), so a hole on one side
and written zeros on the other are equal and nothing is sent. A hole on the source that is
non-zero data on the target is sent as a range of zeros (simplest; the target ends up
allocated where the source is sparse, with equal content). Source blocks beyond the
target's end that are all zeros are not sent: the final truncate extends the file with them.

How a plan is applied, in this order (the property tests hold a model applier to it):
1. `removes`: unlink, or rmdir (deepest first, so a directory is empty when removed). Besides
   extras and names of another kind or symlink text, a regular file may be listed whose
   kind is unchanged: its target inode is shared (hard links) with names meant to hold
   other content, so it must be unlinked and made anew, never truncated in place;
2. `mkdirs` (parents first); 3. `creates`: empty regular files;
4. `symlinks` and `specials` (fifos, sockets, devices: `target` holds "c:MAJ:MIN");
5. `links` (existing, new): `new` becomes a hard link to `existing`, replacing a file there;
6. `ranges`: the source's bytes at those offsets written into the target file;
7. `truncates`: the file's size set; 8. `remove_xattrs`, then `metadata`: mode, owner,
   xattrs, mtime, non-directories first, then directories deepest first so that no later
   step moves a directory's mtime again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import blake3

BLOCK_SIZE = 64 * 1024
DIGEST_BYTES = 16
MAX_RANGE = 1 << 20
KINDS = ("file", "dir", "symlink", "fifo", "socket", "device")
_KIND_SET = frozenset(KINDS)


@dataclass(frozen=True, slots=True)
class Entry:
    """One name in a replicated directory as a manifest records it (see agent.mirror.manifest).

    `path` is relative ("" for the directory itself); `blocks` are the 16-byte BLAKE3 digests
    of each BLOCK_SIZE block of a file's content (empty when the scan did not hash);
    `inode_key` is shared by the names of one multiply-linked file on that side (0 if
    single); `target` is a symlink's text, or "c:MAJ:MIN" / "b:MAJ:MIN" for a device.
    """

    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    target: str = ""
    blocks: tuple[bytes, ...] = ()
    inode_key: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class SendRange:
    """Bytes [offset, offset + length) of a source file to write into the target's."""

    path: str
    offset: int
    length: int


@dataclass(frozen=True)
class ResyncPlan:
    """What the sender does, step by step (the order is in this module's docstring)."""

    removes: tuple[str, ...]
    mkdirs: tuple[Entry, ...]
    creates: tuple[Entry, ...]
    ranges: tuple[SendRange, ...]
    truncates: tuple[tuple[str, int], ...]
    symlinks: tuple[Entry, ...]
    links: tuple[tuple[str, str], ...]
    specials: tuple[Entry, ...]
    metadata: tuple[Entry, ...]
    total_bytes: int
    changed_paths: tuple[str, ...]
    # (path, name): xattrs the target has and the source has not, removed before `metadata`
    remove_xattrs: tuple[tuple[str, str], ...] = ()


def block_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The digest a manifest records for one block of content."""
    return blake3.blake3(data).digest(length=DIGEST_BYTES)


@functools.lru_cache(maxsize=64)
def zero_digest(length: int) -> bytes:
    """The digest of `length` zero bytes: what a block that lies entirely in a hole hashes to."""
    return block_digest(bytes(length))


def block_count(size: int, block_size: int = BLOCK_SIZE) -> int:
    """How many digests a hashed file of `size` bytes has."""
    return -(-size // block_size)


def plan(
    source: Iterable[Entry],
    target: Iterable[Entry],
    *,
    block_size: int = BLOCK_SIZE,
    max_range: int = MAX_RANGE,
) -> ResyncPlan:
    """The steps that make the tree `target` describes equal to the one `source` describes.

    `block_size` must be the one both manifests were hashed with; `max_range` caps a range.
    """
    if block_size <= 0 or max_range < block_size:
        raise ValueError(f"need 0 < block_size <= max_range, got {block_size} and {max_range}")
    src = _by_path(source, "source")
    dst = _by_path(target, "target")
    changed, extras = _not_identical(src, dst)
    for path in changed:
        _check_blocks(src[path], "source", block_size)
        if path in dst:
            _check_blocks(dst[path], "target", block_size)
    src_groups = _link_groups(src)
    dst_groups = _link_groups(dst)

    # the replicated directory itself ("") is never removed
    removes: set[str] = {p for p in extras if p}
    for path in changed:
        t = dst.get(path)
        if path and t and _must_remove(path, src[path], t, src, dst, src_groups, dst_groups):
            removes.add(path)

    def present(path: str) -> bool:
        return path in dst and path not in removes

    mkdirs: list[Entry] = []
    creates: list[Entry] = []
    symlinks: list[Entry] = []
    specials: list[Entry] = []
    links: list[tuple[str, str]] = []
    ranges: list[SendRange] = []
    truncates: list[tuple[str, int]] = []
    metadata: list[Entry] = []
    remove_xattrs: list[tuple[str, str]] = []
    touched_dirs: set[str] = {_parent(p) for p in removes}
    done_groups: set[int] = set()

    for path in changed:
        s = src[path]
        new = not present(path) and path != ""
        data_changed = False
        if s.kind == "file":
            group = _partners(path, src, src_groups)
            if len(group) > 1:
                if s.inode_key in done_groups:
                    continue
                done_groups.add(s.inode_key)
            path = _holder(group, present, src[path], dst, block_size, max_range)
            s = src[path]
            new = not present(path)
            old = None if new else dst[path]
            sent = _diff_blocks(s, old, block_size, max_range)
            if new:
                creates.append(s)
                touched_dirs.add(_parent(path))
            ranges.extend(SendRange(path, off, length) for off, length in sent)
            end = max([old.size if old else 0] + [off + length for off, length in sent])
            if end != s.size:
                truncates.append((path, s.size))
            data_changed = bool(sent) or end != s.size
            for member in group:
                if member == path:
                    continue
                if not new and present(member) and _same_inode(member, path, dst):
                    continue
                links.append((path, member))
                touched_dirs.add(_parent(member))
        elif new:
            if s.kind == "dir":
                mkdirs.append(s)
            elif s.kind == "symlink":
                symlinks.append(s)
            else:
                specials.append(s)
            touched_dirs.add(_parent(path))
        old_meta = dst.get(path) if not new else None
        if old_meta is not None:
            names = {name for name, _ in s.xattrs}
            remove_xattrs.extend((path, n) for n, _ in old_meta.xattrs if n not in names)
        if old_meta is None or data_changed or _meta_differs(s, old_meta):
            metadata.append(s)

    # a directory whose entries changed gets its mtime back, even if it matched before
    metadata.extend(src[d] for d in touched_dirs if d in src and src[d].kind == "dir")
    not_dirs = [e for e in metadata if e.kind != "dir"]
    dirs = _unique(sorted((e for e in metadata if e.kind == "dir"), key=_depth_first))
    return ResyncPlan(
        removes=tuple(sorted(removes, key=_depth_first)),
        mkdirs=_in_order(mkdirs),
        creates=_in_order(creates),
        ranges=tuple(sorted(ranges, key=lambda r: (_components(r.path), r.offset))),
        truncates=tuple(sorted(truncates, key=lambda t: _components(t[0]))),
        symlinks=_in_order(symlinks),
        links=tuple(sorted(links, key=lambda pair: _components(pair[1]))),
        specials=_in_order(specials),
        metadata=(*_in_order(not_dirs), *dirs),
        total_bytes=sum(r.length for r in ranges),
        changed_paths=tuple(_differing(src, dst, src_groups, dst_groups, changed, extras)),
        remove_xattrs=tuple(remove_xattrs),
    )


def differing_paths(a: Iterable[Entry], b: Iterable[Entry]) -> list[str]:
    """Paths whose kind, content, metadata or hard-link partners differ, or on one side only.

    Content is compared by block digests where both sides hashed it, else by size (and mtime,
    which is metadata). Inode keys themselves are local to a side and never compared.
    """
    left = _by_path(a, "first")
    right = _by_path(b, "second")
    changed, extras = _not_identical(left, right)
    return _differing(left, right, _link_groups(left), _link_groups(right), changed, extras)


# --- helpers -------------------------------------------------------------------------------


def _by_path(entries: Iterable[Entry], side: str) -> dict[str, Entry]:
    out = {e.path: e for e in entries}
    unknown = {e.kind for e in out.values()} - _KIND_SET
    if unknown:
        path = next(e.path for e in out.values() if e.kind in unknown)
        raise ValueError(f"{side} manifest: {path!r} has unknown kind {unknown.pop()!r}")
    return out


def _check_blocks(e: Entry, side: str, block_size: int) -> None:
    if e.blocks and len(e.blocks) != block_count(e.size, block_size):
        raise ValueError(
            f"{side} manifest: {e.path!r} has {len(e.blocks)} block digests for "
            f"{e.size} bytes; was it hashed with another block size than {block_size}?"
        )


def _not_identical(src: dict[str, Entry], dst: dict[str, Entry]) -> tuple[list[str], list[str]]:
    """The source names that need a look (all but equal non-linked entries), and the target
    names the source lacks. One pass: in a big tree nearly every name is equal."""
    get = dst.get
    changed = [p for p, s in src.items() if s.inode_key or s != get(p)]
    extras = list(dst.keys() - src.keys())
    return changed, extras


def _in_order(entries: list[Entry]) -> tuple[Entry, ...]:
    """Parents before children, siblings by name."""
    return tuple(sorted(entries, key=lambda e: _components(e.path)))


def _components(path: str) -> tuple[str, ...]:
    return tuple(path.split("/")) if path else ()


def _depth_first(item: str | Entry) -> tuple[int, tuple[str, ...]]:
    """Sort key: deeper names first (children before their directory)."""
    parts = _components(item if isinstance(item, str) else item.path)
    return (-len(parts), parts)


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _unique(entries: Iterable[Entry]) -> list[Entry]:
    seen: set[str] = set()
    out = []
    for e in entries:
        if e.path not in seen:
            seen.add(e.path)
            out.append(e)
    return out


def _link_groups(entries: dict[str, Entry]) -> dict[int, tuple[str, ...]]:
    """inode_key -> the sorted names of that file on this side (files only)."""
    groups: dict[int, list[str]] = {}
    for e in entries.values():
        if e.kind == "file" and e.inode_key:
            groups.setdefault(e.inode_key, []).append(e.path)
    return {k: tuple(sorted(v)) for k, v in groups.items()}


def _partners(
    path: str, entries: dict[str, Entry], groups: dict[int, tuple[str, ...]]
) -> tuple[str, ...]:
    """The names sharing `path`'s inode on that side, `path` included, sorted."""
    key = entries[path].inode_key
    return groups.get(key, (path,)) if key else (path,)


def _same_inode(a: str, b: str, dst: dict[str, Entry]) -> bool:
    key = dst[a].inode_key
    return a == b or (key != 0 and key == dst[b].inode_key)


def _must_remove(
    path: str,
    s: Entry | None,
    t: Entry,
    src: dict[str, Entry],
    dst: dict[str, Entry],
    src_groups: dict[int, tuple[str, ...]],
    dst_groups: dict[int, tuple[str, ...]],
) -> bool:
    """An extra name, a name of another kind or symlink text, or a file that cannot be reused."""
    if s is None or s.kind != t.kind:
        return True
    if s.kind != "file":
        return s.target != t.target
    return not _reusable(path, src, dst, src_groups, dst_groups)


def _reusable(
    path: str,
    src: dict[str, Entry],
    dst: dict[str, Entry],
    src_groups: dict[int, tuple[str, ...]],
    dst_groups: dict[int, tuple[str, ...]],
) -> bool:
    """A target file keeps its inode only if every other name sharing it that stays a file on
    the source shares the inode there too; else writing it would change those names."""
    mine = _partners(path, src, src_groups)
    for other in _partners(path, dst, dst_groups):
        s = src.get(other)
        if s is not None and s.kind == "file" and other not in mine:
            return False
    return True


def _holder(
    group: tuple[str, ...],
    present: Callable[[str], bool],
    first: Entry,
    dst: dict[str, Entry],
    block_size: int,
    max_range: int,
) -> str:
    """The name of a (hard-linked) file whose target inode is reused: the one needing the
    fewest bytes; the first name if none can be reused (it is created, the others linked)."""
    candidates = [p for p in group if present(p)]
    if not candidates:
        return group[0]
    if len(candidates) == 1:
        return candidates[0]

    def cost(p: str) -> int:
        return sum(n for _, n in _diff_blocks(first, dst[p], block_size, max_range))

    return min(candidates, key=cost)


def _diff_blocks(
    s: Entry, old: Entry | None, block_size: int, max_range: int
) -> list[tuple[int, int]]:
    """(offset, length) ranges of `s` to write over `old` (None: an empty new file)."""
    if s.size == 0:
        return []
    old_size = old.size if old else 0
    old_blocks = old.blocks if old else ()
    if not s.blocks or (old_size and not old_blocks):
        # a side did not hash: trust size and mtime, as rsync's quick check does
        if old is not None and (old.size, old.mtime_ns) == (s.size, s.mtime_ns):
            return []
        return [(off, min(max_range, s.size - off)) for off in range(0, s.size, max_range)]
    out: list[list[int]] = []
    for i, digest in enumerate(s.blocks):
        off = i * block_size
        length = min(block_size, s.size - off)
        same_length = min(block_size, old_size - off) == length
        if i < len(old_blocks) and old_blocks[i] == digest and same_length:
            continue
        if off >= old_size and digest == zero_digest(length):
            continue  # the final truncate extends the file with these zeros
        if out and out[-1][0] + out[-1][1] == off and out[-1][1] + length <= max_range:
            out[-1][1] += length
        else:
            out.append([off, length])
    return [(off, length) for off, length in out]


def _meta_differs(s: Entry, t: Entry) -> bool:
    if s.kind != "symlink" and s.mode != t.mode:
        return True
    return (s.uid, s.gid, s.mtime_ns, s.xattrs) != (t.uid, t.gid, t.mtime_ns, t.xattrs)


def _content_differs(x: Entry, y: Entry) -> bool:
    if x.size != y.size or x.target != y.target:
        return True
    return bool(x.blocks) and bool(y.blocks) and x.blocks != y.blocks


def _differing(
    a: dict[str, Entry],
    b: dict[str, Entry],
    a_groups: dict[int, tuple[str, ...]],
    b_groups: dict[int, tuple[str, ...]],
    changed: list[str],
    extras: list[str],
) -> list[str]:
    out = list(extras)
    for path in changed:
        x, y = a[path], b.get(path)
        if y is None or _entry_differs(path, x, y, a, b, a_groups, b_groups):
            out.append(path)
    return sorted(out, key=_components)


def _entry_differs(
    path: str,
    x: Entry,
    y: Entry,
    a: dict[str, Entry],
    b: dict[str, Entry],
    a_groups: dict[int, tuple[str, ...]],
    b_groups: dict[int, tuple[str, ...]],
) -> bool:
    if x.kind != y.kind or _meta_differs(x, y):
        return True
    if x.kind == "file":
        linked = _partners(path, a, a_groups) != _partners(path, b, b_groups)
        return linked or _content_differs(x, y)
    return x.kind != "dir" and x.target != y.target
