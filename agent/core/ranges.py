"""A set of byte ranges that coalesces as it grows: which bytes of one file changed.

Half-open intervals [start, end), kept sorted, disjoint and non-adjacent, so a
hot range costs one interval however often it is written and `add` can tell at
the cost of two bisections whether anything new was covered (which decides
whether the journal needs a durable record). The intervals live in one list of
tuples so that `list(rangeset)` is a consistent snapshot. Pure: no I/O.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator

_FAR = 1 << 63  # beyond any file offset: the upper sentinel for bisecting on (start, end)


class RangeSet:
    """Half-open byte intervals; overlapping and adjacent ones merge into one."""

    __slots__ = ("_spans",)

    def __init__(self, spans: Iterable[tuple[int, int]] = ()) -> None:
        self._spans: list[tuple[int, int]] = []
        for start, end in spans:
            self.add(start, end)

    def add(self, start: int, end: int) -> bool:
        """Cover [start, end); True if any byte of it was not covered before."""
        if start < 0 or end < start:
            raise ValueError(f"byte range [{start}, {end}) is not a valid range")
        if start == end:
            return False
        spans = self._spans
        lo = bisect_left(spans, (start,))
        if lo and spans[lo - 1][1] >= start:
            lo -= 1  # the span before overlaps or touches the new one
        hi = bisect_right(spans, (end, _FAR))
        if hi - lo == 1 and spans[lo][0] <= start and end <= spans[lo][1]:
            return False
        if lo < hi:
            start = min(start, spans[lo][0])
            end = max(end, spans[hi - 1][1])
        spans[lo:hi] = [(start, end)]
        return True

    def covers(self, start: int, end: int) -> bool:
        """Every byte of [start, end) is in the set (an empty range always is)."""
        if start >= end:
            return True
        spans = self._spans
        i = bisect_right(spans, (start, _FAR)) - 1
        return i >= 0 and spans[i][0] <= start and end <= spans[i][1]

    def discard_from(self, size: int) -> bool:
        """Forget every byte at or past `size` (the file was truncated); True if any was."""
        spans = self._spans
        i = bisect_left(spans, (size,))
        changed = i < len(spans)
        if i and spans[i - 1][1] > size:
            i -= 1
            spans[i] = (spans[i][0], size)
            i += 1
            changed = True
        del spans[i:]
        return changed

    def update(self, other: RangeSet) -> bool:
        """Cover every range of `other`; True if that added any byte."""
        added = False
        for start, end in list(other._spans):
            added = self.add(start, end) or added
        return added

    def copy(self) -> RangeSet:
        clone = RangeSet()
        clone._spans = list(self._spans)
        return clone

    @property
    def total(self) -> int:
        """The number of bytes covered."""
        return sum(end - start for start, end in self._spans)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(list(self._spans))

    def __len__(self) -> int:
        return len(self._spans)

    def __bool__(self) -> bool:
        return bool(self._spans)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and self._spans == other._spans

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RangeSet({self._spans!r})"
