"""Tree manifests on real trees: what a scan records, in what order, and the wire encoding;
and a plan between two real trees, carried out by a small applier here, leaves them equal."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core.resync import ResyncPlan, differing_paths, plan, zero_digest
from agent.mirror.manifest import (
    BLOCK_SIZE,
    Entry,
    ManifestReader,
    decode_entries,
    encode_chunks,
    encode_entries,
    scan,
)

MiB = 1 << 20
ODD_NAMES = [b"sp ace", b"new\nline", b"\xff\xfe-not-utf8", "é-ü".encode(), b"-dash"]


@contextlib.contextmanager
def opened(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def manifest(path: Path, **kw: object) -> list[Entry]:
    with opened(path) as fd:
        return list(scan(fd, **kw))  # type: ignore[arg-type]


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def build(root: Path) -> None:
    """A tree with one of everything a scan must handle, with fixed times."""
    root.mkdir(exist_ok=True)
    write(root / "empty", b"")
    write(root / "small", b"hello")
    write(root / "d" / "exact", b"e" * BLOCK_SIZE)
    write(root / "d" / "sub" / "big", bytes(range(256)) * 1000)  # 4 blocks, last partial
    write(root / "skip" / "inside", b"never seen")
    write(root / "d" / "note.tmp", b"excluded")
    os.symlink("small", root / "link")
    os.symlink("nowhere/at/all", root / "dangling")
    os.symlink("/etc", root / "d" / "outside")
    os.link(root / "small", root / "d" / "hard")
    os.mkfifo(root / "fifo", 0o640)
    for name in ODD_NAMES:
        write(Path(os.fsdecode(os.fsencode(root) + b"/" + name)), name)
    os.setxattr(root / "small", "user.colour", b"blue")
    os.setxattr(root / "d", "user.z", b"2")
    os.setxattr(root / "d", "user.a", b"1")
    # a sparse file: 3 MiB, data only in its middle, so block 0 lies wholly in a hole
    with open(root / "sparse", "wb") as f:
        f.truncate(3 * MiB)
        f.seek(MiB + 100)
        f.write(b"middle")
    os.chmod(root / "d" / "sub", 0o1777)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for leaf in [*filenames, *dirnames]:
            os.utime(os.path.join(dirpath, leaf), ns=(1, 10**18), follow_symlinks=False)
    os.utime(root, ns=(1, 10**18))


def excluded(path: str, is_dir: bool) -> bool:
    return path == "skip" or path.endswith(".tmp")


def by_path(entries: list[Entry]) -> dict[str, Entry]:
    return {e.path: e for e in entries}


def test_a_scan_records_every_kind_of_name(tmp_path: Path) -> None:
    build(tmp_path / "t")
    got = by_path(manifest(tmp_path / "t", excluded=excluded))
    assert "skip" not in got and "skip/inside" not in got and "d/note.tmp" not in got
    assert got[""].kind == "dir"
    assert got["empty"] == Entry("empty", "file", 0o644, 0, 0, 0, 10**18)
    assert got["small"].xattrs == (("user.colour", b"blue"),)
    assert got["d"].xattrs == (("user.a", b"1"), ("user.z", b"2"))
    assert got["d/sub"].mode == 0o1777 and got["d/sub"].kind == "dir"
    assert len(got["d/exact"].blocks) == 1 and len(got["d/sub/big"].blocks) == 4
    assert got["link"].kind == "symlink" and got["link"].target == "small"
    assert got["dangling"].target == "nowhere/at/all"
    assert got["d/outside"].target == "/etc" and not any(p.startswith("d/outside/") for p in got)
    assert got["fifo"].kind == "fifo" and got["fifo"].mode == 0o640
    assert got["small"].inode_key == got["d/hard"].inode_key != 0
    assert got["empty"].inode_key == 0
    for name in ODD_NAMES:
        assert got[os.fsdecode(name)].size == len(name)


def test_the_order_is_parents_first_and_the_same_every_time(tmp_path: Path) -> None:
    build(tmp_path / "t")
    first = manifest(tmp_path / "t")
    assert first == manifest(tmp_path / "t")
    seen: set[str] = set()
    for e in first:
        assert e.path == "" or e.path.rpartition("/")[0] in seen, e.path
        seen.add(e.path)


def test_two_identical_trees_give_equal_manifests_but_for_inode_keys(tmp_path: Path) -> None:
    build(tmp_path / "a")
    build(tmp_path / "b")
    a, b = manifest(tmp_path / "a"), manifest(tmp_path / "b")
    assert len(a) == len(b) > 20
    strip = [dataclasses.replace(e, inode_key=0) for e in a]
    assert strip == [dataclasses.replace(e, inode_key=0) for e in b]
    assert differing_paths(a, b) == []


def test_a_one_byte_change_changes_one_block_digest(tmp_path: Path) -> None:
    build(tmp_path / "t")
    before = by_path(manifest(tmp_path / "t"))["d/sub/big"]
    with open(tmp_path / "t" / "d" / "sub" / "big", "r+b") as f:
        f.seek(BLOCK_SIZE * 2 + 17)
        f.write(b"\x00")
    after = by_path(manifest(tmp_path / "t"))["d/sub/big"]
    changed = [
        i for i, (x, y) in enumerate(zip(before.blocks, after.blocks, strict=True)) if x != y
    ]
    assert changed == [2]


def test_a_hole_hashes_as_zeros(tmp_path: Path) -> None:
    build(tmp_path / "t")
    dense = tmp_path / "dense"
    with open(tmp_path / "t" / "sparse", "rb") as src:
        write(dense, src.read())  # the same content, every byte written
    sparse = by_path(manifest(tmp_path / "t"))["sparse"]
    assert os.stat(tmp_path / "t" / "sparse").st_blocks * 512 < 3 * MiB
    assert sparse.blocks[0] == zero_digest(BLOCK_SIZE)
    assert len(sparse.blocks) == 3 * MiB // BLOCK_SIZE
    (whole,) = (e for e in manifest(tmp_path) if e.path == "dense")
    assert whole.blocks == sparse.blocks


def test_paths_restrict_the_scan_and_never_follow_symlinks(tmp_path: Path) -> None:
    build(tmp_path / "t")
    got = [e.path for e in manifest(tmp_path / "t", paths=["d/sub", "small", "link/x", "gone"])]
    assert got == ["d/sub", "d/sub/big", "small"]
    os.symlink("d", tmp_path / "t" / "dlink")
    assert manifest(tmp_path / "t", paths=["dlink/exact"]) == []
    with pytest.raises(ValueError, match="plain relative path"):
        manifest(tmp_path / "t", paths=["../etc"])
    assert manifest(tmp_path / "t", paths=["skip/inside"], excluded=excluded) == []


def test_without_hashing_blocks_are_left_empty(tmp_path: Path) -> None:
    build(tmp_path / "t")
    assert all(e.blocks == () for e in manifest(tmp_path / "t", hash_blocks=False))


def test_encoding_round_trips(tmp_path: Path) -> None:
    build(tmp_path / "t")
    entries = manifest(tmp_path / "t")
    entries.append(Entry("dev", "device", 0o600, 1, 2, 0, -5, target="c:1:3"))
    assert decode_entries(encode_entries(entries)) == entries
    assert decode_entries(encode_entries([])) == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "too short"),
        (b"garbage garbage garbage", "not a manifest"),
        (b"TMF1\x05\x00\x00\x00" + b"\x00" * 10, "truncated"),
        (b"TMF1\x01\x00\x00\x00" + b"\x09" + b"\x00" * 48, "unknown kind"),
    ],
)
def test_garbage_is_refused_with_a_clear_error(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_entries(raw)


def test_a_chunk_cut_short_or_with_stray_bytes_is_refused() -> None:
    raw = encode_entries([Entry("a/b", "file", 0o644, 0, 0, 3, 1, blocks=(b"x" * 16,))])
    for cut in range(len(raw)):
        with pytest.raises(ValueError):
            decode_entries(raw[:cut])
    with pytest.raises(ValueError, match="stray bytes"):
        decode_entries(raw + b"\x00")


def test_chunks_stay_small_and_a_huge_file_spans_several(tmp_path: Path) -> None:
    build(tmp_path / "t")
    size = 5000 * BLOCK_SIZE + 7  # 5001 digests: 80 KiB of them
    huge = Entry(
        "huge", "file", 0o600, 0, 0, size, 1, blocks=tuple(os.urandom(16) for _ in range(5001))
    )
    entries = [*manifest(tmp_path / "t"), huge, *manifest(tmp_path / "t")]
    chunks = list(encode_chunks(entries, max_bytes=16 << 10))
    assert len(chunks) > 5 and all(len(c) <= 16 << 10 for c in chunks)
    reader = ManifestReader()
    assert [e for c in chunks for e in reader.feed(c)] == entries
    reader.close()
    middle = next(c for c in chunks if b"huge" in c)
    with pytest.raises(ValueError, match="ended inside the entry of 'huge'"):
        decode_entries(middle)
    reader = ManifestReader()
    reader.feed(middle)
    with pytest.raises(ValueError, match="cut short"):
        reader.close()


def test_twenty_thousand_small_files(tmp_path: Path) -> None:
    flags = os.O_CREAT | os.O_WRONLY | os.O_EXCL
    for i in range(100):
        d = tmp_path / f"dir{i:03}"
        d.mkdir()
        with opened(d) as dir_fd:
            for j in range(200):
                fd = os.open(f"f{j}", flags, 0o644, dir_fd=dir_fd)
                os.write(fd, b"%d-%d" % (i, j))
                os.close(fd)
    before = manifest(tmp_path)
    (tmp_path / "dir050" / "f7").write_bytes(b"changed")
    after = manifest(tmp_path)
    assert len(before) == len(after) == 1 + 100 + 20_000
    p = plan(after, before)
    assert [r.path for r in p.ranges] == ["dir050/f7"]
    assert decode_entries(encode_entries(after)) == after


# --- a plan between real trees, carried out ------------------------------------------------


def carry_out(p: ResyncPlan, src: int, dst: int) -> None:
    """A plain applier of a plan on real trees (the product's sender does this on the stream)."""

    def name(path: str) -> str:
        return path or "."

    def where(path: str) -> str:
        return f"/proc/self/fd/{dst}/{path}"

    for path in p.removes:
        st = os.stat(path, dir_fd=dst, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(path, dir_fd=dst)
        else:
            os.unlink(path, dir_fd=dst)
    for e in p.mkdirs:
        os.mkdir(e.path, e.mode, dir_fd=dst)
    for e in p.creates:
        os.close(os.open(e.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, e.mode, dir_fd=dst))
    for e in p.symlinks:
        os.symlink(e.target, e.path, dir_fd=dst)
    for e in p.specials:
        assert e.kind == "fifo", "this test makes only fifos"
        os.mkfifo(e.path, e.mode, dir_fd=dst)
    for existing, new in p.links:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(new, dir_fd=dst)
        os.link(existing, new, src_dir_fd=dst, dst_dir_fd=dst, follow_symlinks=False)
    for r in p.ranges:
        fin = os.open(r.path, os.O_RDONLY, dir_fd=src)
        fout = os.open(r.path, os.O_WRONLY, dir_fd=dst)
        os.pwrite(fout, os.pread(fin, r.length, r.offset), r.offset)
        os.close(fin)
        os.close(fout)
    for path, size in p.truncates:
        fout = os.open(path, os.O_WRONLY, dir_fd=dst)
        os.ftruncate(fout, size)
        os.close(fout)
    for path, attr in p.remove_xattrs:
        os.removexattr(where(path), attr, follow_symlinks=False)
    for e in p.metadata:
        if e.kind != "symlink":
            os.chmod(name(e.path), e.mode, dir_fd=dst)
            for attr, value in e.xattrs:
                os.setxattr(where(e.path), attr, value, follow_symlinks=False)
        os.chown(name(e.path), e.uid, e.gid, dir_fd=dst, follow_symlinks=False)
        os.utime(name(e.path), ns=(1, e.mtime_ns), dir_fd=dst, follow_symlinks=False)


def test_carrying_out_a_plan_makes_real_trees_equal(tmp_path: Path) -> None:
    build(tmp_path / "src")
    build(tmp_path / "dst")
    s, t = tmp_path / "src", tmp_path / "dst"
    # drift apart: data, size, kinds, links, xattrs, extras on the target, a new sparse file
    with open(s / "d" / "sub" / "big", "r+b") as f:
        f.seek(BLOCK_SIZE + 3)
        f.write(b"new")
    (s / "small").write_bytes(b"hello, longer now")
    (t / "d" / "exact").write_bytes(b"short")
    (s / "link").unlink()
    (s / "link").mkdir()
    write(s / "link" / "inside", b"was a symlink")
    (t / "fifo").unlink()
    write(t / "fifo" / "deep" / "file", b"was a fifo")
    os.link(s / "empty", s / "d" / "empty2")
    os.unlink(t / "d" / "hard")
    write(t / "d" / "hard", b"hello")  # same content, but no longer a link
    os.removexattr(s / "d", "user.z")
    os.setxattr(t / "small", "user.extra", b"x")
    write(t / "only-on-target", b"x" * 100)
    with open(s / "sparse2", "wb") as f:
        f.truncate(2 * MiB + 5)
    with opened(s) as src, opened(t) as dst:
        p = plan(scan(src), scan(dst))
        assert p.total_bytes < MiB
        assert "only-on-target" in p.removes and "fifo/deep/file" in p.removes
        carry_out(p, src, dst)
        assert differing_paths(scan(src), scan(dst)) == []


@pytest.mark.root
def test_devices_sockets_and_trusted_xattrs_as_root(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    os.mknod(root / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "blk", 0o600 | stat.S_IFBLK, os.makedev(8, 0))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))
    write(root / "f", b"x")
    os.setxattr(root / "f", "trusted.t", b"1")
    got = by_path(manifest(root))
    assert got["null"].kind == "device" and got["null"].target == "c:1:3"
    assert got["blk"].target == "b:8:0"
    assert got["sock"].kind == "socket"
    assert got["f"].xattrs == (("trusted.t", b"1"),)
