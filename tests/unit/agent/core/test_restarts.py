"""Local restarts before failover: the budget, its sliding window, and giving up."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.restarts import RestartPolicy, RestartVerdict

RESTART = RestartVerdict.RESTART
GIVE_UP = RestartVerdict.GIVE_UP


def test_attempts_within_the_window_restart_then_the_next_failure_gives_up() -> None:
    policy = RestartPolicy(attempts=2, within=60.0)
    assert policy.on_failure(0.0) is RESTART
    assert policy.used(0.0) == 1
    assert policy.on_failure(10.0) is RESTART
    assert policy.used(10.0) == 2
    assert policy.on_failure(20.0) is GIVE_UP
    # Giving up spends nothing: the budget still holds the two restarts.
    assert policy.used(20.0) == 2
    assert policy.on_failure(21.0) is GIVE_UP


def test_the_window_slides_one_restart_at_a_time() -> None:
    policy = RestartPolicy(attempts=2, within=60.0)
    assert policy.on_failure(0.0) is RESTART
    assert policy.on_failure(30.0) is RESTART
    # Exactly `within` after the first restart it still counts ...
    assert policy.on_failure(60.0) is GIVE_UP
    assert policy.used(60.0) == 2
    # ... and just after, it has left the window: one restart is free again.
    assert policy.used(60.5) == 1
    assert policy.on_failure(60.5) is RESTART
    # The restarts at 30 and 60.5 are both in the window now.
    assert policy.on_failure(61.0) is GIVE_UP
    assert policy.used(90.4) == 1  # only the one at 60.5 is left
    assert policy.on_failure(90.4) is RESTART


def test_a_quiet_window_restores_the_whole_budget() -> None:
    policy = RestartPolicy(attempts=3, within=5.0)
    assert [policy.on_failure(t) for t in (0.0, 1.0, 2.0, 3.0)] == [
        RESTART,
        RESTART,
        RESTART,
        GIVE_UP,
    ]
    assert policy.used(100.0) == 0
    assert [policy.on_failure(t) for t in (100.0, 100.1, 100.2, 100.3)] == [
        RESTART,
        RESTART,
        RESTART,
        GIVE_UP,
    ]


def test_no_attempts_gives_up_on_the_first_failure() -> None:
    policy = RestartPolicy(attempts=0, within=60.0)
    assert policy.on_failure(0.0) is GIVE_UP
    assert policy.used(0.0) == 0


def test_reset_forgets_past_restarts() -> None:
    policy = RestartPolicy(attempts=1, within=60.0)
    assert policy.on_failure(0.0) is RESTART
    assert policy.on_failure(1.0) is GIVE_UP
    policy.reset()
    assert policy.used(1.0) == 0
    assert policy.on_failure(2.0) is RESTART


@pytest.mark.parametrize(
    ("attempts", "within", "message"),
    [
        (-1, 60.0, "restart.attempts must be 0 or more, got -1"),
        (2, -5.0, "restart.within must be 0 seconds or more, got -5.0"),
        (2, float("nan"), "restart.within must be 0 seconds or more, got nan"),
    ],
)
def test_a_bad_policy_is_refused_with_the_key_named(
    attempts: int, within: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        RestartPolicy(attempts=attempts, within=within)


@settings(max_examples=300)
@given(
    attempts=st.integers(0, 5),
    within=st.floats(0.0, 100.0),
    gaps=st.lists(st.floats(0.0, 50.0), max_size=30),
)
def test_never_more_than_attempts_restarts_in_any_window(
    attempts: int, within: float, gaps: list[float]
) -> None:
    policy = RestartPolicy(attempts=attempts, within=within)
    now = 0.0
    restarts: list[float] = []
    for gap in gaps:
        now += gap
        in_window = [t for t in restarts if now - t <= within]
        verdict = policy.on_failure(now)
        # Give up exactly when the window already holds the whole budget.
        assert verdict is (GIVE_UP if len(in_window) >= attempts else RESTART)
        if verdict is RESTART:
            restarts.append(now)
        assert policy.used(now) == len([t for t in restarts if now - t <= within])
        assert policy.used(now) <= attempts
