"""Generation ids decide resync direction and split brain from data: checked against the truth.

A hypothesis state machine plays two nodes through disconnections, sessions alone,
reboots, mirrored writes and reconnections, keeping the ground truth (which writes
each copy holds) beside the generation ids; on every reconnection `compare` must
name the side that holds more, or a split brain when neither holds all.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.core.generations import (
    EMPTY,
    ConnectPlan,
    Generations,
    SplitSide,
    SyncVerdict,
    compare,
    plan_connect,
    policy_keeps,
)

FROM_LOCAL = {SyncVerdict.INCREMENTAL_FROM_LOCAL, SyncVerdict.FULL_FROM_LOCAL}
FROM_PEER = {SyncVerdict.INCREMENTAL_FROM_PEER, SyncVerdict.FULL_FROM_PEER}
MIRROR = {
    SyncVerdict.FIRST_START: SyncVerdict.FIRST_START,
    SyncVerdict.IN_SYNC: SyncVerdict.IN_SYNC,
    SyncVerdict.INCREMENTAL_FROM_LOCAL: SyncVerdict.INCREMENTAL_FROM_PEER,
    SyncVerdict.INCREMENTAL_FROM_PEER: SyncVerdict.INCREMENTAL_FROM_LOCAL,
    SyncVerdict.FULL_FROM_LOCAL: SyncVerdict.FULL_FROM_PEER,
    SyncVerdict.FULL_FROM_PEER: SyncVerdict.FULL_FROM_LOCAL,
    SyncVerdict.SPLIT_BRAIN: SyncVerdict.SPLIT_BRAIN,
    SyncVerdict.UNRELATED: SyncVerdict.UNRELATED,
}


def test_first_meeting_of_a_new_cluster() -> None:
    assert compare(Generations(), Generations()) is SyncVerdict.FIRST_START


def test_a_node_that_ran_alone_resyncs_incrementally_to_its_peer() -> None:
    base = Generations(current=11)
    alone = base.serving_alone(12)
    assert alone == Generations(current=12, bitmap=11)
    assert compare(alone, base) is SyncVerdict.INCREMENTAL_FROM_LOCAL
    assert compare(base, alone) is SyncVerdict.INCREMENTAL_FROM_PEER
    # Two sessions alone in a row keep the oldest base: still incremental.
    again = alone.serving_alone(13)
    assert again.bitmap == 11
    assert compare(again, base) is SyncVerdict.INCREMENTAL_FROM_LOCAL


def test_both_ran_alone_from_the_same_base_is_a_split_brain() -> None:
    base = Generations(current=11)
    assert compare(base.serving_alone(12), base.serving_alone(13)) is SyncVerdict.SPLIT_BRAIN


def test_data_with_nothing_in_common_is_reported_as_unrelated() -> None:
    assert compare(Generations(current=5), Generations(current=7)) is SyncVerdict.UNRELATED


def test_an_empty_node_gets_everything() -> None:
    assert compare(Generations(), Generations(current=3)) is SyncVerdict.FULL_FROM_PEER
    assert compare(Generations(current=3), Generations()) is SyncVerdict.FULL_FROM_LOCAL


def test_after_a_resync_both_are_in_sync_and_the_base_is_history() -> None:
    source = Generations(current=11).serving_alone(12)
    target = Generations(current=11).after_resync_as_target(source)
    source = source.after_resync_as_source()
    assert compare(source, target) is SyncVerdict.IN_SYNC
    assert source == Generations(current=12, bitmap=EMPTY, history=(11,))


def test_a_new_generation_needs_a_fresh_id() -> None:
    with pytest.raises(ValueError, match="fresh"):
        Generations(current=4).serving_alone(4)
    with pytest.raises(ValueError, match="fresh"):
        Generations(current=4).serving_alone(EMPTY)


NODES = ("a", "b")


class Pair(RuleBasedStateMachine):
    """Two nodes; the truth is the set of writes each copy holds."""

    def __init__(self) -> None:
        super().__init__()
        self.ids = itertools.count(1)
        self.gens = {n: Generations() for n in NODES}
        self.writes: dict[str, frozenset[int]] = {n: frozenset() for n in NODES}
        self.session_open = {n: False for n in NODES}
        self.connected = False
        self.met = False

    def other(self, node: str) -> str:
        return "b" if node == "a" else "a"

    @precondition(lambda self: self.connected)
    @rule()
    def mirrored_write(self) -> None:
        write = next(self.ids)
        for n in NODES:
            self.writes[n] |= {write}

    @precondition(lambda self: self.connected)
    @rule()
    def disconnect(self) -> None:
        self.connected = False
        self.session_open = {n: False for n in NODES}

    @precondition(lambda self: not self.connected)
    @rule(node=st.sampled_from(NODES))
    def write_alone(self, node: str) -> None:
        if not self.session_open[node]:
            # Serving without the peer opens a new generation before the first write.
            self.gens[node] = self.gens[node].serving_alone(next(self.ids))
            self.session_open[node] = True
        self.writes[node] |= {next(self.ids)}

    @precondition(lambda self: not self.connected)
    @rule(node=st.sampled_from(NODES))
    def reboot(self, node: str) -> None:
        self.session_open[node] = False

    @precondition(lambda self: not self.connected)
    @rule(keep=st.sampled_from(NODES))
    def meet(self, keep: str) -> None:
        a, b = self.gens["a"], self.gens["b"]
        verdict = compare(a, b)
        assert compare(b, a) is MIRROR[verdict]
        wa, wb = self.writes["a"], self.writes["b"]
        if not wa and not wb and a.is_empty and b.is_empty:
            assert verdict is SyncVerdict.FIRST_START
            self.gens["a"] = Generations(current=next(self.ids))
            source = "a"
        elif wa == wb:
            assert verdict is SyncVerdict.IN_SYNC, (verdict, a, b)
            source = "a"
        elif wa > wb:
            assert verdict in FROM_LOCAL, (verdict, a, b)
            source = "a"
        elif wb > wa:
            assert verdict in FROM_PEER, (verdict, a, b)
            source = "b"
        else:
            # Copies that once met share a generation: a split brain. Copies both started
            # alone (each forced) before they ever met share nothing.
            expected = SyncVerdict.SPLIT_BRAIN if self.met else SyncVerdict.UNRELATED
            assert verdict is expected, (verdict, a, b)
            source = keep  # resolved by an administrator (`resolve --keep`)
        target = self.other(source)
        self.gens[target] = self.gens[target].after_resync_as_target(self.gens[source])
        self.gens[source] = self.gens[source].after_resync_as_source()
        self.writes[target] = self.writes[source]
        self.connected = True
        self.met = True

    @invariant()
    def connected_means_same_generation(self) -> None:
        if self.connected:
            assert self.gens["a"].current == self.gens["b"].current
            assert self.writes["a"] == self.writes["b"]


Pair.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestPair = Pair.TestCase


# --- plan_connect: every verdict with every flag --------------------------------------------

SPLITS = {SyncVerdict.SPLIT_BRAIN, SyncVerdict.UNRELATED}
FLAGS = list(itertools.product([False, True], repeat=5))


@pytest.mark.parametrize("verdict", list(SyncVerdict))
@pytest.mark.parametrize(
    ("peer_empty", "here_pristine", "peer_pristine", "kept_here", "peer_covered"), FLAGS
)
def test_a_primary_connects_only_when_nothing_can_be_lost_and_keeps_what_it_overwrites(
    verdict: SyncVerdict,
    peer_empty: bool,
    here_pristine: bool,
    peer_pristine: bool,
    kept_here: bool,
    peer_covered: bool,
) -> None:
    plan = plan_connect(
        verdict,
        peer_empty=peer_empty,
        here_pristine=here_pristine,
        peer_pristine=peer_pristine,
        kept_here=kept_here,
        peer_covered=peer_covered,
    )
    if verdict in FROM_PEER:
        # The peer holds writes this primary lacks: overwriting them would lose them.
        assert plan.resync is None and plan.problem is not None
        return
    assert plan.problem is None
    if verdict in SPLITS:
        # Nothing moves until one side is chosen; then the other side's files are kept aside.
        assert plan == (ConnectPlan("full", quarantine=True) if kept_here else ConnectPlan(None))
        return
    assert plan.resync is not None
    # A journal describes the difference only if neither copy changed outside the mirror, or
    # the peer's activity log names where it did (a crash while it was primary).
    assert (plan.resync == "incremental") == (
        verdict is SyncVerdict.INCREMENTAL_FROM_LOCAL
        and here_pristine
        and (peer_pristine or peer_covered)
    )
    # The activity log is asked for exactly when the peer's copy is not pristine.
    assert plan.activity == (plan.resync == "incremental" and not peer_pristine)
    assert (plan.resync == "none") == (verdict is SyncVerdict.IN_SYNC)
    # Files found on a peer with no generation were never mirrored: kept, not overwritten.
    assert plan.quarantine == peer_empty


def test_the_first_meeting_keeps_the_new_secondary_files_aside() -> None:
    verdict = compare(Generations(), Generations())
    plan = plan_connect(
        verdict, peer_empty=True, here_pristine=True, peer_pristine=True, kept_here=False
    )
    assert plan == ConnectPlan("full", quarantine=True)


# --- split-brain policies -------------------------------------------------------------------

POLICIES = ["manual", "discard-younger-primary", "discard-least-changes"]
SINCES = list(itertools.product([0.0, 100.0, 200.0], repeat=2))
COUNTS = list(itertools.product([-1, 0, 3, 7], repeat=2))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("here_since", "peer_since"), SINCES)
@pytest.mark.parametrize(("here_changes", "peer_changes"), COUNTS)
def test_a_policy_keeps_one_side_only_on_figures_both_know_and_the_same_from_both_ends(
    policy: str, here_since: float, peer_since: float, here_changes: int, peer_changes: int
) -> None:
    node1 = SplitSide("node1", here_since, here_changes)
    node2 = SplitSide("node2", peer_since, peer_changes)
    kept = policy_keeps(policy, node1, node2)
    # Both nodes decide alone: they must name the same node, or both leave it to a person.
    assert policy_keeps(policy, node2, node1) == kept
    if policy == "manual":
        assert kept is None
    elif policy == "discard-younger-primary":
        if 0.0 in (here_since, peer_since) or here_since == peer_since:
            assert kept is None  # unknown or a tie
        else:
            assert kept == ("node1" if here_since < peer_since else "node2")
    else:
        if -1 in (here_changes, peer_changes) or here_changes == peer_changes:
            assert kept is None  # a journal that overflowed cannot lose by its count
        else:
            assert kept == ("node1" if here_changes > peer_changes else "node2")
