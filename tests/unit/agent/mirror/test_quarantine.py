"""Quarantine keeps this node's files before a resync replaces them, or says why it cannot."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.mirror import quarantine


@pytest.fixture
def root(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    data = tmp_path / "data"
    (data / "dir").mkdir(parents=True)
    (data / "dir" / "file").write_bytes(b"only copy")
    (data / "link").symlink_to("dir/file")
    fd = os.open(data, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield data, fd
    finally:
        os.close(fd)


def test_files_links_and_directories_are_kept_and_vanished_or_escaping_paths_skipped(
    root: tuple[Path, int], tmp_path: Path
) -> None:
    _data, fd = root
    dest = tmp_path / "kept"
    count, size = quarantine.save(fd, ["dir", "dir/file", "link", "gone", "../out"], dest)
    assert (count, size) == (3, len(b"only copy"))
    assert (dest / "dir" / "file").read_bytes() == b"only copy"
    assert os.readlink(dest / "link") == "dir/file"
    assert not (tmp_path / "out").exists()


def test_a_file_that_cannot_be_kept_is_an_error_naming_it(
    root: tuple[Path, int], tmp_path: Path
) -> None:
    _data, fd = root
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the quarantine directory should be")
    with pytest.raises(OSError, match="cannot keep dir/file in quarantine"):
        quarantine.save(fd, ["dir/file"], blocked)
