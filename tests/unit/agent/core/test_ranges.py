"""RangeSet against the plainest model there is: the set of byte offsets it covers."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.ranges import RangeSet

spans = st.tuples(st.integers(0, 200), st.integers(0, 40)).map(lambda t: (t[0], t[0] + t[1]))
actions = st.lists(
    st.one_of(
        st.tuples(st.just("add"), spans),
        st.tuples(st.just("discard"), st.tuples(st.integers(0, 240), st.just(0))),
    ),
    max_size=40,
)


def _check_shape(ranges: RangeSet, model: set[int]) -> None:
    listed = list(ranges)
    covered = {b for start, end in listed for b in range(start, end)}
    assert covered == model
    for (_, end), (start, _) in itertools.pairwise(listed):
        assert end < start, "spans must be sorted, disjoint and not adjacent"
    assert all(start < end for start, end in listed)
    assert ranges.total == len(model)
    assert len(ranges) == len(listed)
    assert bool(ranges) == bool(model)


@settings(max_examples=200)
@given(actions)
def test_a_range_set_covers_exactly_the_bytes_added_and_not_discarded(
    steps: list[tuple[str, tuple[int, int]]],
) -> None:
    ranges = RangeSet()
    model: set[int] = set()
    for action, (start, end) in steps:
        if action == "add":
            new = set(range(start, end))
            assert ranges.add(start, end) == bool(new - model)
            model |= new
        else:
            had = {b for b in model if b >= start}
            assert ranges.discard_from(start) == bool(had)
            model -= had
        _check_shape(ranges, model)


@settings(max_examples=200)
@given(st.lists(spans, max_size=15), spans)
def test_covers_answers_as_the_model_does(
    added: list[tuple[int, int]], probe: tuple[int, int]
) -> None:
    ranges = RangeSet(added)
    model = {b for start, end in added for b in range(start, end)}
    assert ranges.covers(*probe) == (set(range(*probe)) <= model)


@given(st.lists(spans, max_size=10), st.lists(spans, max_size=10))
def test_update_is_the_union_and_a_copy_is_independent(
    first: list[tuple[int, int]], second: list[tuple[int, int]]
) -> None:
    a, b = RangeSet(first), RangeSet(second)
    snapshot = a.copy()
    union = {x for s, e in first + second for x in range(s, e)}
    before = a.total
    assert a.update(b) == (len(union) > before)
    _check_shape(a, union)
    assert snapshot == RangeSet(first)


def test_adjacent_ranges_merge_and_a_hot_range_adds_nothing() -> None:
    ranges = RangeSet()
    assert ranges.add(0, 4096)
    assert ranges.add(4096, 8192)
    assert list(ranges) == [(0, 8192)]
    assert not ranges.add(0, 4096)
    assert not ranges.add(100, 200)
    assert not ranges.add(5, 5)
    assert ranges.add(10_000, 10_001)
    assert list(ranges) == [(0, 8192), (10_000, 10_001)]
    assert ranges.add(8192, 10_000)
    assert list(ranges) == [(0, 10_001)]


def test_discard_from_cuts_the_span_that_straddles_the_size() -> None:
    ranges = RangeSet([(0, 10), (20, 30), (40, 50)])
    assert ranges.discard_from(25)
    assert list(ranges) == [(0, 10), (20, 25)]
    assert not ranges.discard_from(25)
    assert ranges.discard_from(0)
    assert not ranges


@pytest.mark.parametrize("bad", [(-1, 5), (5, 4)])
def test_an_invalid_range_is_refused_with_its_bounds(bad: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=rf"\[{bad[0]}, {bad[1]}\)"):
        RangeSet().add(*bad)
