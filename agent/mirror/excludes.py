"""Which paths of a replicated directory are not mirrored (gitignore rules, via pathspec).

As in git, a path beneath an excluded directory is excluded whatever later
negations say: a directory that is not mirrored has no mirrored contents.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import pathspec


class Excludes:
    """`excluded(rel_path, is_dir)` answers for paths relative to the replicated directory."""

    def __init__(self, patterns: Sequence[str]) -> None:
        lines: list[str] = []
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise ValueError(f"exclude pattern {pattern!r} is not a string; quote it in YAML")
            lines.append(pattern)
        try:
            self._spec = pathspec.GitIgnoreSpec.from_lines(lines)
        except (ValueError, re.error) as exc:
            raise ValueError(
                f"invalid exclude pattern: {exc}; use gitignore syntax, e.g. '*.tmp' or 'cache/'"
            ) from None
        self.patterns = tuple(lines)
        self.empty = not any(p.strip() and not p.lstrip().startswith("#") for p in lines)
        # Paths repeat (a file's every write asks), so answers are remembered.
        self._cached = lru_cache(maxsize=8192)(self._compute)

    def excluded(self, rel_path: str, is_dir: bool) -> bool:
        """True if `rel_path` ("" is the directory itself, never excluded) is not mirrored."""
        if self.empty or not rel_path:
            return False
        return self._cached(rel_path, is_dir)

    def _compute(self, rel_path: str, is_dir: bool) -> bool:
        parts = rel_path.split("/")
        for depth in range(1, len(parts)):
            if self._spec.match_file("/".join(parts[:depth]) + "/"):
                return True
        return self._spec.match_file(rel_path + "/" if is_dir else rel_path)
