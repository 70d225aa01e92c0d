"""Exclude rules follow gitignore: directory patterns, negation, **, anchoring, and parents."""

from __future__ import annotations

import pytest

from agent.mirror.excludes import Excludes


def test_directory_patterns_match_directories_and_everything_beneath() -> None:
    ex = Excludes(["cache/"])
    assert ex.excluded("cache", is_dir=True)
    assert not ex.excluded("cache", is_dir=False)
    assert ex.excluded("a/b/cache", is_dir=True)
    assert ex.excluded("cache/deep/file", is_dir=False)
    assert not ex.excluded("cached", is_dir=True)


def test_negation_reincludes_but_never_beneath_an_excluded_directory() -> None:
    ex = Excludes(["*.log", "!keep.log", "logs/", "!logs/keep.txt"])
    assert ex.excluded("x.log", is_dir=False)
    assert not ex.excluded("keep.log", is_dir=False)
    assert not ex.excluded("sub/keep.log", is_dir=False)
    assert ex.excluded("logs/keep.txt", is_dir=False)  # as in git: the parent is excluded


def test_double_star_and_anchored_patterns() -> None:
    ex = Excludes(["a/**/z", "/build", "**/tmp/*.o"])
    assert ex.excluded("a/z", is_dir=False)
    assert ex.excluded("a/b/c/z", is_dir=False)
    assert not ex.excluded("b/a/z", is_dir=False)
    assert ex.excluded("build", is_dir=True)
    assert ex.excluded("build/out.bin", is_dir=False)
    assert not ex.excluded("src/build", is_dir=True)
    assert ex.excluded("x/y/tmp/f.o", is_dir=False)


def test_the_directory_itself_and_no_rules_exclude_nothing() -> None:
    assert not Excludes(["*"]).excluded("", is_dir=True)
    empty = Excludes(["", "# a comment"])
    assert empty.empty
    assert not empty.excluded("anything", is_dir=False)


@pytest.mark.parametrize("bad", [["!"], ["\\"], [3]])
def test_a_bad_pattern_is_refused_with_a_message_that_says_how(bad: list[object]) -> None:
    with pytest.raises(ValueError, match="pattern") as caught:
        Excludes(bad)  # type: ignore[arg-type]
    assert "gitignore" in str(caught.value) or "string" in str(caught.value)
