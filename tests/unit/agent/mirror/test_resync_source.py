"""Path lists of any length travel in control frames that fit the stream's limit."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.core import mirror_frames as mf
from agent.mirror.resync_source import path_chunks

names = st.text(min_size=1, max_size=60)  # any text: escapes make JSON longer than the name


@given(st.lists(names, max_size=200), st.integers(70, 2000))
def test_paths_are_cut_in_order_into_messages_that_fit(paths: list[str], limit: int) -> None:
    chunks = list(path_chunks(paths, limit))
    assert [p for chunk in chunks for p in chunk] == paths
    assert all(chunk for chunk in chunks)
    for chunk in chunks:
        paths_bytes = len(mf.encode_json({"paths": chunk})) - len('{"paths":[]}')
        assert paths_bytes <= limit or len(chunk) == 1  # a single name longer than the limit
