"""The failure detector: a peer is lost only when every link is silent for peer_timeout."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.detector import FailureDetector, LinkStatus


def test_a_peer_never_heard_is_not_alive() -> None:
    detector = FailureDetector(links=2, peer_timeout=1.5)
    assert not detector.peer_alive(100.0)
    assert detector.silence(100.0) is None
    assert detector.up_count(100.0) == 0
    assert detector.links(100.0) == [LinkStatus(0, False, None), LinkStatus(1, False, None)]
    assert detector.lost_reason(100.0) == "peer never heard on 2 links"
    assert FailureDetector(1, 1.0).lost_reason(0.0) == "peer never heard on 1 link"


def test_one_link_is_enough_to_keep_the_peer() -> None:
    detector = FailureDetector(links=2, peer_timeout=1.5)
    detector.heard(0, 10.0)
    detector.heard(1, 10.0)
    detector.heard(1, 11.0)
    assert detector.link_up(0, 11.4)
    assert not detector.link_up(0, 11.5)
    assert detector.link_up(1, 12.0)
    assert detector.peer_alive(12.0)
    assert detector.up_count(12.0) == 1
    assert detector.links(12.0) == [LinkStatus(0, False, 2.0), LinkStatus(1, True, 1.0)]
    assert detector.lost_reason(12.0) == "peer alive on 1/2 links"


def test_the_peer_is_lost_when_every_link_is_silent() -> None:
    detector = FailureDetector(links=2, peer_timeout=1.5)
    detector.heard(0, 10.0)
    detector.heard(1, 10.25)
    assert detector.peer_alive(11.7)
    assert not detector.peer_alive(11.75)
    assert detector.silence(11.75) == pytest.approx(1.5)
    assert detector.lost_reason(11.75) == "peer lost on 2/2 links for 1.5 s"


def test_a_late_datagram_does_not_move_contact_backwards() -> None:
    detector = FailureDetector(links=1, peer_timeout=1.0)
    detector.heard(0, 10.0)
    detector.heard(0, 9.0)
    assert detector.silence(10.5) == pytest.approx(0.5)


def test_reset_forgets_contact() -> None:
    detector = FailureDetector(links=1, peer_timeout=1.0)
    detector.heard(0, 10.0)
    detector.reset()
    assert not detector.peer_alive(10.0)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        FailureDetector(links=0, peer_timeout=1.0)
    with pytest.raises(ValueError, match="positive"):
        FailureDetector(links=1, peer_timeout=0.0)
    with pytest.raises(ValueError, match="out of range"):
        FailureDetector(links=2, peer_timeout=1.0).heard(2, 0.0)


@given(
    st.lists(st.tuples(st.integers(0, 2), st.floats(0, 100)), max_size=20),
    st.floats(0, 200),
)
def test_alive_exactly_when_some_link_was_heard_within_the_timeout(
    events: list[tuple[int, float]], now: float
) -> None:
    detector = FailureDetector(links=3, peer_timeout=1.5)
    for link, when in events:
        detector.heard(link, when)
    recent = [when for _, when in events if now - when < 1.5]
    assert detector.peer_alive(now) == bool(recent)
    assert detector.up_count(now) == len({link for link, when in events if now - when < 1.5})
    assert [s.up for s in detector.links(now)] == [detector.link_up(i, now) for i in range(3)]
