"""The resync planner: applying its plan to the target turns it into the source.

A small model applier (below) carries a plan out on an in-memory tree with file contents,
hard links as shared nodes, and mtimes that namespace operations and writes disturb, as a
real file system does; hypothesis makes random pairs of trees. Tiny blocks (4 bytes) keep
the contents short while exercising partial blocks, zeros, merging and the range cap.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core.resync import (
    BLOCK_SIZE,
    Entry,
    ResyncPlan,
    SendRange,
    block_digest,
    differing_paths,
    plan,
    zero_digest,
)

BS = 4
CAP = 12
TOUCHED = -1  # the mtime a namespace operation or a write leaves behind


# --- an in-memory tree and the model applier ------------------------------------------------


@dataclass
class Node:
    kind: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 1
    target: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    content: bytearray = field(default_factory=bytearray)
    size: int = 0  # a directory's st_size: differs between file systems, never compared


Tree = dict[str, Node]


def parent(path: str) -> str:
    return path.rpartition("/")[0]


def digests(data: bytes | bytearray) -> tuple[bytes, ...]:
    return tuple(block_digest(bytes(data[o : o + BS])) for o in range(0, len(data), BS))


def entries(tree: Tree) -> list[Entry]:
    """The manifest a scan of this tree would give (inode keys by node identity)."""
    keys: dict[int, int] = {}
    counts: dict[int, int] = {}
    for node in tree.values():
        counts[id(node)] = counts.get(id(node), 0) + 1
    out = []
    for path in sorted(tree):
        n = tree[path]
        key = 0
        if n.kind == "file" and counts[id(n)] > 1:
            key = keys.setdefault(id(n), len(keys) + 100)
        size = len(n.content) if n.kind == "file" else n.size
        blocks = digests(n.content) if n.kind == "file" else ()
        xattrs = tuple(sorted(n.xattrs.items()))
        out.append(
            Entry(path, n.kind, n.mode, n.uid, n.gid, size, n.mtime, n.target, blocks, key, xattrs)
        )
    return out


def touch(tree: Tree, path: str) -> None:
    if path in tree:
        tree[path].mtime = TOUCHED


def apply(p: ResyncPlan, tree: Tree, source: Tree) -> None:
    """Carry out a plan on `tree` in the documented order, checking each step is possible."""
    for path in p.removes:
        node = tree[path]
        if node.kind == "dir":
            assert not any(q.startswith(path + "/") for q in tree), f"rmdir {path}: not empty"
        del tree[path]
        touch(tree, parent(path))

    def make(path: str, node: Node) -> None:
        assert path not in tree, f"{path} exists"
        assert tree[parent(path)].kind == "dir", f"parent of {path} is not a directory"
        tree[path] = node
        touch(tree, parent(path))

    for e in p.mkdirs:
        make(e.path, Node("dir", e.mode, e.uid, e.gid, TOUCHED))
    for e in p.creates:
        make(e.path, Node("file", e.mode, e.uid, e.gid, TOUCHED))
    for e in (*p.symlinks, *p.specials):
        make(e.path, Node(e.kind, e.mode, e.uid, e.gid, TOUCHED, e.target))
    for existing, new in p.links:
        assert tree[existing].kind == "file"
        if new in tree:
            assert tree[new].kind == "file", f"link over {new}, which is not a file"
            del tree[new]
        make(new, tree[existing])
    for r in p.ranges:
        node = tree[r.path]
        data = source[r.path].content[r.offset : r.offset + r.length]
        assert len(data) == r.length, f"{r} reaches past the source's end"
        if len(node.content) < r.offset:
            node.content.extend(bytes(r.offset - len(node.content)))
        node.content[r.offset : r.offset + r.length] = data
        node.mtime = TOUCHED
    for path, size in p.truncates:
        node = tree[path]
        del node.content[size:]
        node.content.extend(bytes(size - len(node.content)))
        node.mtime = TOUCHED
    for path, name in p.remove_xattrs:
        del tree[path].xattrs[name]
    for e in p.metadata:
        node = tree[e.path]
        if e.kind != "symlink":
            node.mode = e.mode
        node.uid, node.gid, node.mtime = e.uid, e.gid, e.mtime_ns
        node.xattrs.update(e.xattrs)


def canonical(tree: Tree) -> dict[str, Any]:
    """What must be equal: per path its kind, metadata, content; and who shares an inode."""
    out: dict[str, Any] = {}
    for path, n in tree.items():
        partners = frozenset(q for q, m in tree.items() if m is n)
        mode = None if n.kind == "symlink" else n.mode
        content = bytes(n.content) if n.kind == "file" else b""
        out[path] = (n.kind, mode, n.uid, n.gid, n.mtime, n.target, n.xattrs, content, partners)
    return out


def copy_tree(tree: Tree) -> Tree:
    copies: dict[int, Node] = {}
    out = {}
    for path, node in tree.items():
        if id(node) not in copies:
            copies[id(node)] = dataclasses.replace(
                node, xattrs=dict(node.xattrs), content=bytearray(node.content)
            )
        out[path] = copies[id(node)]
    return out


# --- random trees ---------------------------------------------------------------------------

NAMES = ("a", "b", "c")
PATHS = sorted(
    ["/".join(p) for p in [(x,) for x in NAMES]]
    + [f"{x}/{y}" for x in NAMES for y in NAMES]
    + [f"{x}/{y}/{z}" for x in NAMES for y in NAMES for z in NAMES],
    key=lambda p: p.count("/"),
)
CHUNKS = (b"abcd", b"\0\0\0\0", b"wxyz", b"ab\0\0")
contents = st.builds(
    lambda parts, tail: b"".join(parts) + tail,
    st.lists(st.sampled_from(CHUNKS), max_size=5),
    st.sampled_from([b"", b"q", b"\0\0", b"abc"]),
)
xattr_sets = st.dictionaries(st.sampled_from(["user.a", "user.b"]), st.sampled_from([b"1", b"2"]))


@st.composite
def nodes(draw: st.DrawFn, kind: str | None = None) -> Node:
    if kind is None:
        kind = draw(st.sampled_from(["file"] * 4 + ["dir"] * 3 + ["symlink", "fifo", "device"]))
    target = ""
    if kind == "symlink":
        target = draw(st.sampled_from(["x", "../y", "a/b"]))
    elif kind == "device":
        target = draw(st.sampled_from(["c:1:3", "b:8:0"]))
    return Node(
        kind,
        mode=draw(st.sampled_from([0o644, 0o600, 0o755, 0o4755])),
        uid=draw(st.sampled_from([0, 1000])),
        gid=draw(st.sampled_from([0, 1000])),
        mtime=draw(st.sampled_from([1, 2])),
        target=target,
        xattrs=draw(xattr_sets) if kind != "symlink" else {},
        content=bytearray(draw(contents)) if kind == "file" else bytearray(),
        size=draw(st.sampled_from([0, 4096])),
    )


def valid(tree: Tree, path: str) -> bool:
    return parent(path) in tree and tree[parent(path)].kind == "dir"


def link_some(draw: st.DrawFn, tree: Tree) -> None:
    """Make some files hard links of others (sharing one node)."""
    files = [p for p, n in tree.items() if n.kind == "file"]
    for path in files:
        others = [q for q in files if q != path]
        if others and draw(st.integers(0, 4)) == 0:
            tree[path] = tree[draw(st.sampled_from(others))]


@st.composite
def trees(draw: st.DrawFn) -> Tree:
    tree: Tree = {"": draw(nodes("dir"))}
    for path in PATHS:
        if valid(tree, path) and draw(st.booleans()):
            tree[path] = draw(nodes())
    link_some(draw, tree)
    return tree


@st.composite
def variants(draw: st.DrawFn, base: Tree) -> Tree:
    """The base tree changed here and there: what two sides that drifted apart look like."""
    tree = copy_tree(base)
    for path in PATHS:
        if path in tree and not valid(tree, path):
            del tree[path]  # its directory went away
            continue
        action = draw(st.sampled_from(["keep"] * 5 + ["data", "meta", "remove", "replace", "add"]))
        if path in tree:
            node = tree[path]
            if action == "data" and node.kind == "file":
                node.content = bytearray(draw(contents))
            elif action == "meta":
                fresh = draw(nodes(node.kind))
                node.mode, node.uid, node.mtime, node.xattrs = (
                    fresh.mode,
                    fresh.uid,
                    fresh.mtime,
                    fresh.xattrs,
                )
            elif action == "remove":
                del tree[path]
            elif action == "replace":
                tree[path] = draw(nodes())
        elif action == "add" and valid(tree, path):
            tree[path] = draw(nodes())
    if draw(st.booleans()):
        link_some(draw, tree)
    return tree


@st.composite
def pairs(draw: st.DrawFn) -> tuple[Tree, Tree]:
    base = draw(trees())
    return draw(variants(base)), draw(variants(base))


# --- the properties -------------------------------------------------------------------------


def differing_blocks_bound(source: Tree, target: Tree) -> int:
    """Bytes that must cross at least: per source inode, the blocks that differ from the
    best target file it could reuse (one whose inode no other content shares), or its
    non-zero blocks if none."""
    seen: set[int] = set()
    total = 0
    for node in source.values():
        if node.kind != "file" or id(node) in seen:
            continue
        seen.add(id(node))
        names = {q for q, m in source.items() if m is node}
        costs = []
        for q in names:
            t = target.get(q)
            if t is None or t.kind != "file":
                continue
            sharing = {r for r, m in target.items() if m is t}
            if all(r in names or source.get(r, Node("dir")).kind != "file" for r in sharing):
                costs.append(cost(node.content, t.content))
        total += min(costs) if costs else cost(node.content, None)
    return total


def cost(data: bytearray, old: bytearray | None) -> int:
    old = old if old is not None else bytearray()
    out = 0
    for off in range(0, len(data), BS):
        block = data[off : off + BS]
        if old[off : off + BS] == block:
            continue
        if off >= len(old) and not any(block):
            continue
        out += len(block)
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs())
def test_applying_the_plan_makes_the_target_equal_to_the_source(pair: tuple[Tree, Tree]) -> None:
    source, target = pair
    p = plan(entries(source), entries(target), block_size=BS, max_range=CAP)
    result = copy_tree(target)
    apply(p, result, source)
    assert canonical(result) == canonical(source)
    # nothing more to do once applied
    again = plan(entries(source), entries(result), block_size=BS, max_range=CAP)
    assert again.changed_paths == () and again.total_bytes == 0 and again.ranges == ()
    # what is sent is what differs, at most
    assert p.total_bytes == sum(r.length for r in p.ranges)
    assert p.total_bytes <= differing_blocks_bound(source, target)
    for r in p.ranges:
        assert 0 < r.length <= CAP and r.offset % BS == 0
    # changed_paths names exactly the paths that differ
    before, after = canonical(target), canonical(source)
    expected = {q for q in before.keys() | after.keys() if before.get(q) != after.get(q)}
    assert set(p.changed_paths) == expected
    assert differing_paths(entries(source), entries(target)) == list(p.changed_paths)


@settings(max_examples=100, deadline=None)
@given(trees())
def test_identical_trees_give_an_empty_plan(tree: Tree) -> None:
    p = plan(entries(tree), entries(copy_tree(tree)), block_size=BS)
    assert p == ResyncPlan((), (), (), (), (), (), (), (), (), 0, ())


# --- chosen cases ---------------------------------------------------------------------------


def file_entry(path: str, data: bytes, **kw: Any) -> Entry:
    return Entry(path, "file", 0o644, 0, 0, len(data), 1, blocks=digests(data), **kw)


def dir_entry(path: str, mtime: int = 1) -> Entry:
    return Entry(path, "dir", 0o755, 0, 0, 4096, mtime)


ROOT = dir_entry("")


def small_plan(src: list[Entry], dst: list[Entry]) -> ResyncPlan:
    return plan([ROOT, *src], [ROOT, *dst], block_size=BS, max_range=CAP)


def test_one_changed_block_sends_that_block_only() -> None:
    p = small_plan([file_entry("f", b"aaaabbbbcccc")], [file_entry("f", b"aaaaXbbbcccc")])
    assert p.ranges == (SendRange("f", 4, 4),)
    assert p.total_bytes == 4 and p.truncates == () and p.changed_paths == ("f",)
    assert [e.path for e in p.metadata] == ["f"]  # its mtime, after the data


def test_a_grown_file_gets_its_new_blocks_and_the_last_partial_block_its_real_length() -> None:
    p = small_plan([file_entry("f", b"aaaabbbbcc")], [file_entry("f", b"aaaa")])
    assert p.ranges == (SendRange("f", 4, 6),)
    assert p.truncates == ()


def test_a_shrunk_file_is_truncated_without_sending_data() -> None:
    p = small_plan([file_entry("f", b"aaaabbbb")], [file_entry("f", b"aaaabbbbcccc")])
    assert p.ranges == () and p.truncates == (("f", 8),) and p.total_bytes == 0


def test_adjacent_blocks_merge_up_to_the_cap() -> None:
    p = small_plan([file_entry("f", b"x" * 32)], [file_entry("f", b"y" * 32)])
    assert p.ranges == (SendRange("f", 0, 12), SendRange("f", 12, 12), SendRange("f", 24, 8))


def test_zero_blocks_past_the_targets_end_become_a_truncate() -> None:
    source = file_entry("f", b"aaaa" + bytes(12) + b"bb")
    p = small_plan([source], [file_entry("f", b"aaaa")])
    assert p.ranges == (SendRange("f", 16, 2),)
    p = small_plan([file_entry("f", b"aaaa" + bytes(12))], [file_entry("f", b"aaaa")])
    assert p.ranges == () and p.truncates == (("f", 16),)


def test_a_hole_against_data_sends_the_zeros() -> None:
    """A hole on the source over non-zero data on the target is sent as zeros (no punch)."""
    p = small_plan([file_entry("f", bytes(8))], [file_entry("f", b"datadata")])
    assert p.ranges == (SendRange("f", 0, 8),)
    assert zero_digest(BS) == block_digest(bytes(BS))


def test_hard_links_send_the_data_once_and_link_the_other_names() -> None:
    src = [file_entry("a", b"data", inode_key=7), file_entry("b", b"data", inode_key=7)]
    p = small_plan(src, [])
    assert [e.path for e in p.creates] == ["a"]
    assert p.links == (("a", "b"),)
    assert p.ranges == (SendRange("a", 0, 4),) and p.total_bytes == 4
    # already linked the same way on the target (its own key numbering): nothing to do
    dst = [file_entry("a", b"data", inode_key=1), file_entry("b", b"data", inode_key=1)]
    assert small_plan(src, dst).changed_paths == ()


def test_a_target_link_that_the_source_broke_is_remade() -> None:
    src = [file_entry("a", b"aaaa"), file_entry("b", b"bbbb")]
    dst = [file_entry("a", b"aaaa", inode_key=1), file_entry("b", b"aaaa", inode_key=1)]
    p = small_plan(src, dst)
    assert set(p.removes) == {"a", "b"}
    assert {e.path for e in p.creates} == {"a", "b"}


def test_kind_changes_remove_deepest_first_and_create_parents_first() -> None:
    src = [Entry("d", "file", 0o644, 0, 0, 0, 1), dir_entry("x"), dir_entry("x/y")]
    dst = [dir_entry("d"), dir_entry("d/e"), file_entry("d/e/f", b"z")]
    p = small_plan(src, dst)
    assert p.removes == ("d/e/f", "d/e", "d")
    assert [e.path for e in p.mkdirs] == ["x", "x/y"]
    assert [e.path for e in p.creates] == ["d"]
    # files first, then directories deepest first, the root last
    assert [e.path for e in p.metadata] == ["d", "x/y", "x", ""]


def test_a_symlink_whose_text_changed_is_replaced() -> None:
    src = [Entry("l", "symlink", 0o777, 0, 0, 1, 1, target="new")]
    dst = [Entry("l", "symlink", 0o777, 0, 0, 1, 1, target="old")]
    p = small_plan(src, dst)
    assert p.removes == ("l",) and p.symlinks == (src[0],)


def test_xattrs_the_source_lacks_are_removed() -> None:
    src = [file_entry("f", b"x", xattrs=(("user.a", b"1"),))]
    dst = [file_entry("f", b"x", xattrs=(("user.a", b"1"), ("user.b", b"2")))]
    p = small_plan(src, dst)
    assert p.remove_xattrs == (("f", "user.b"),) and p.ranges == ()
    assert [e.path for e in p.metadata] == ["f"]


def test_without_hashes_size_and_mtime_decide() -> None:
    same = Entry("f", "file", 0o644, 0, 0, 10, 5)
    assert small_plan([same], [same]).ranges == ()
    newer = dataclasses.replace(same, mtime_ns=6)
    assert small_plan([newer], [same]).ranges == (SendRange("f", 0, 10),)


def test_differing_paths_ignores_inode_numbering_and_names_one_sided_paths() -> None:
    a = [ROOT, file_entry("f", b"x", inode_key=3), file_entry("g", b"x", inode_key=3)]
    b = [ROOT, file_entry("f", b"x", inode_key=9), file_entry("g", b"x", inode_key=9)]
    assert differing_paths(a, b) == []
    assert differing_paths(a, [*b, dir_entry("extra")]) == ["extra"]
    assert differing_paths(a, [ROOT, *b[1:2]]) == ["f", "g"]  # f lost its partner


def test_bad_manifests_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        plan([Entry("x", "pipe", 0, 0, 0, 0, 0)], [])
    wrong = Entry("f", "file", 0o644, 0, 0, BLOCK_SIZE * 3, 1, blocks=(b"0" * 16,))
    with pytest.raises(ValueError, match="block size"):
        plan([wrong], [])
