"""Paths resolved beneath a directory descriptor never leave it, with openat2 and without."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.mirror import beneath
from agent.mirror.beneath import EscapeError, check_relative, open_beneath, parent_beneath

Opener = Callable[[int, str, int], int]


def _walk(root_fd: int, path: str, flags: int) -> int:
    check_relative(path)
    return beneath._open_walk(root_fd, path, flags | os.O_CLOEXEC, 0o600)


@pytest.fixture(params=["openat2", "walk"])
def opener(request: pytest.FixtureRequest) -> Opener:
    if request.param == "openat2":
        return lambda root_fd, path, flags: open_beneath(root_fd, path, flags)
    return _walk


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """root/ with a file, a subdirectory and symlinks of every kind; outside/secret next to it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    root = tmp_path / "root"
    (root / "d" / "e").mkdir(parents=True)
    (root / "real").write_text("real")
    (root / "d" / "e" / "f").write_text("deep")
    (root / "abs").symlink_to(outside)
    (root / "abs_file").symlink_to(outside / "secret")
    (root / "rel").symlink_to("../outside")
    (root / "chain1").symlink_to("chain2")
    (root / "chain2").symlink_to("../outside")
    (root / "d" / "up").symlink_to("../../outside")
    (root / "inlink").symlink_to("real")
    (root / "indir").symlink_to("d/e")
    (root / "proc").symlink_to("/proc/self/root")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield root, fd
    finally:
        os.close(fd)


def _read(fd: int) -> bytes:
    try:
        return os.pread(fd, 100, 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("..", "'..' component"),
        ("a/../../x", "'..' component"),
        ("/etc/passwd", "absolute"),
        ("a\x00b", "NUL"),
        ("a//b", "empty or '.'"),
        ("./a", "empty or '.'"),
        ("a/", "empty or '.'"),
        ("bad\ud800", "unpaired surrogate"),
    ],
)
def test_paths_that_are_not_plain_names_are_refused_before_any_lookup(
    path: str, words: str
) -> None:
    with pytest.raises(EscapeError, match=words):
        check_relative(path)


def test_the_empty_path_names_the_directory_but_has_no_parent(tree: tuple[Path, int]) -> None:
    root, fd = tree
    check_relative("")
    opened = open_beneath(fd, "", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.path.samestat(os.fstat(opened), os.stat(root))
    finally:
        os.close(opened)
    with pytest.raises(EscapeError, match="names the replicated directory itself"):
        parent_beneath(fd, "")


@pytest.mark.parametrize(
    "path",
    ["abs", "abs/secret", "abs_file", "rel/secret", "chain1/secret", "d/up/secret", "proc/etc"],
)
def test_symlinks_that_lead_outside_are_refused(
    tree: tuple[Path, int], opener: Opener, path: str
) -> None:
    _, fd = tree
    with pytest.raises(EscapeError, match="symlink") as caught:
        opener(fd, path, os.O_RDONLY)
    assert path.split("/")[0] in str(caught.value)


def test_a_symlink_leading_outside_is_refused_even_as_a_parent(tree: tuple[Path, int]) -> None:
    _, fd = tree
    with pytest.raises(EscapeError, match="outside"):
        parent_beneath(fd, "rel/secret")
    with pytest.raises(EscapeError, match="outside"):
        parent_beneath(fd, "d/up/new")


def test_symlinks_inside_are_followed_with_openat2(tree: tuple[Path, int]) -> None:
    _, fd = tree
    assert _read(open_beneath(fd, "inlink", os.O_RDONLY)) == b"real"
    assert _read(open_beneath(fd, "indir/f", os.O_RDONLY)) == b"deep"


def test_no_symlinks_refuses_even_symlinks_inside(tree: tuple[Path, int]) -> None:
    _, fd = tree
    for path in ("inlink", "indir/f"):
        with pytest.raises(OSError) as caught:
            open_beneath(fd, path, os.O_RDONLY, no_symlinks=True)
        assert caught.value.errno == errno.ELOOP
    assert _read(open_beneath(fd, "d/e/f", os.O_RDONLY, no_symlinks=True)) == b"deep"


def test_without_openat2_no_symlink_is_followed_at_all(tree: tuple[Path, int]) -> None:
    _, fd = tree
    with pytest.raises(EscapeError, match="'inlink' is a symlink"):
        _walk(fd, "inlink", os.O_RDONLY)
    with pytest.raises(EscapeError, match="'indir' is a symlink"):
        _walk(fd, "indir/f", os.O_RDONLY)


def test_o_nofollow_on_a_final_symlink_is_eloop_not_an_escape(
    tree: tuple[Path, int], opener: Opener
) -> None:
    _, fd = tree
    with pytest.raises(OSError) as caught:
        opener(fd, "inlink", os.O_RDONLY | os.O_NOFOLLOW)
    assert caught.value.errno == errno.ELOOP
    link = opener(fd, "abs", os.O_PATH | os.O_NOFOLLOW)  # the link itself, not its target
    try:
        assert os.readlink("", dir_fd=link) == str(tree[0].parent / "outside")
    finally:
        os.close(link)


def test_good_paths_open_including_odd_bytes_and_deep_ones(
    tree: tuple[Path, int], opener: Opener
) -> None:
    root, fd = tree
    odd = os.fsdecode(b"caf\xe9 \x01\xff name")
    (root / odd).write_bytes(b"odd")
    deep = "/".join(f"level{i}" for i in range(60))
    (root / deep).mkdir(parents=True)
    (root / deep / "leaf").write_bytes(b"leaf")
    assert _read(opener(fd, odd, os.O_RDONLY)) == b"odd"
    assert _read(opener(fd, f"{deep}/leaf", os.O_RDONLY)) == b"leaf"
    assert _read(opener(fd, "d/e/f", os.O_RDONLY)) == b"deep"
    created = opener(fd, "d/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    os.close(created)
    assert (root / "d" / "new").exists()


def test_a_missing_name_is_an_os_error(tree: tuple[Path, int], opener: Opener) -> None:
    _, fd = tree
    with pytest.raises(FileNotFoundError):
        opener(fd, "d/missing", os.O_RDONLY)


def test_parent_beneath_gives_the_parent_and_leaves_the_name_unresolved(
    tree: tuple[Path, int],
) -> None:
    root, fd = tree
    parent, name = parent_beneath(fd, "d/up")
    try:
        assert name == "up"
        assert os.path.samestat(os.fstat(parent), os.stat(root / "d"))
        os.unlink(name, dir_fd=parent)  # removes the link, not what it points to
    finally:
        os.close(parent)
    assert not (root / "d" / "up").is_symlink()
    assert (root.parent / "outside" / "secret").read_text() == "secret"


def test_an_odd_name_is_shown_printable_in_the_error(tree: tuple[Path, int]) -> None:
    root, fd = tree
    odd = os.fsdecode(b"\xff")
    (root / odd).symlink_to("/")
    with pytest.raises(EscapeError, match=r"\\xff"):
        open_beneath(fd, f"{odd}/etc", os.O_RDONLY)
