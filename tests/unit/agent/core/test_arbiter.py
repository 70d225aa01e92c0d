"""The witness's grant rule: never two holders, and a restart never lets the other node in early."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.arbiter import Arbiter
from agent.core.frames import Action, LeaseItem, Verdict

NODES = ("node1", "node2")
MODULES = ("web", "db")


def ask(arbiter: Arbiter, node: str, action: Action, now: float, module: str = "web") -> Verdict:
    return arbiter.decide("shop", node, LeaseItem(module, action), 1.5, now)


def test_the_first_node_gets_the_lease_and_the_other_waits_for_its_expiry() -> None:
    arbiter = Arbiter()
    first = ask(arbiter, "node1", "acquire", 10.0)
    assert first.granted and first.holder == "node1"
    assert first.expires_in == pytest.approx(1.5)
    denied = ask(arbiter, "node2", "acquire", 10.7)
    assert not denied.granted
    assert denied.holder == "node1"
    assert denied.expires_in == pytest.approx(0.8)
    assert denied.reason == "lease held by node1 for another 0.8 s"
    assert not ask(arbiter, "node2", "renew", 11.4).granted
    taken = ask(arbiter, "node2", "acquire", 11.5)
    assert taken.granted and taken.holder == "node2"
    assert "node1" in taken.reason and "expired" in taken.reason
    assert arbiter.holders() == {("shop", "web"): "node2"}


def test_renewing_extends_the_lease_and_never_shortens_it() -> None:
    arbiter = Arbiter()
    ask(arbiter, "node1", "acquire", 0.0)
    for now in (1.0, 2.0, 3.0):
        assert ask(arbiter, "node1", "renew", now).granted
    assert not ask(arbiter, "node2", "acquire", 4.4).granted
    long = arbiter.decide("shop", "node1", LeaseItem("web", "renew"), 60.0, 5.0)
    assert long.expires_in == pytest.approx(60.0)
    short = arbiter.decide("shop", "node1", LeaseItem("web", "renew"), 1.0, 6.0)
    assert short.expires_in == pytest.approx(59.0)
    assert not ask(arbiter, "node2", "acquire", 64.9).granted


def test_release_by_the_holder_ends_the_lease_at_once() -> None:
    arbiter = Arbiter()
    ask(arbiter, "node1", "acquire", 0.0)
    refused = ask(arbiter, "node2", "release", 0.5)
    assert not refused.granted and refused.holder == "node1"
    assert "held by node1" in refused.reason
    released = ask(arbiter, "node1", "release", 0.5)
    assert released.granted and released.holder is None
    assert arbiter.holders() == {}
    assert ask(arbiter, "node2", "acquire", 0.5).granted
    assert ask(arbiter, "node1", "release", 0.6).reason == "not released: held by node2"
    assert Arbiter().decide("c", "n", LeaseItem("m", "release"), 1.0, 0.0).granted


def test_leases_are_per_cluster_and_module() -> None:
    arbiter = Arbiter()
    assert ask(arbiter, "node1", "acquire", 0.0, module="web").granted
    assert ask(arbiter, "node2", "acquire", 0.0, module="db").granted
    assert arbiter.decide("other", "node2", LeaseItem("web", "acquire"), 1.5, 0.0).granted
    assert arbiter.holders() == {
        ("shop", "web"): "node1",
        ("shop", "db"): "node2",
        ("other", "web"): "node2",
    }
    assert arbiter.leases()[("shop", "web")].duration == 1.5


def test_a_restored_holder_gets_a_full_lease_from_the_restart() -> None:
    before = Arbiter()
    ask(before, "node1", "acquire", 0.0)
    after = Arbiter()
    after.restore(before.holders(), now=100.0, duration=1.5)
    assert not ask(after, "node2", "acquire", 101.4).granted
    assert ask(after, "node1", "renew", 101.0).granted
    assert ask(after, "node2", "acquire", 102.6).granted


def test_a_witness_without_records_waits_a_lease_before_granting_a_newcomer() -> None:
    arbiter = Arbiter(started=50.0)
    waiting = ask(arbiter, "node2", "acquire", 50.5)
    assert not waiting.granted and waiting.holder is None
    assert "restarted without its lease records" in waiting.reason
    assert ask(arbiter, "node1", "renew", 50.6).granted  # the holder it forgot keeps its lease
    assert not ask(arbiter, "node2", "acquire", 51.5).granted
    assert ask(arbiter, "node1", "acquire", 51.6, module="db").granted


def test_bad_durations_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        Arbiter().decide("c", "n", LeaseItem("m", "acquire"), 0.0, 0.0)
    with pytest.raises(ValueError, match="positive"):
        Arbiter().restore({("c", "m"): "n"}, 0.0, -1.0)


@dataclass(frozen=True)
class Request:
    node: str
    module: str
    action: Action
    advance: float
    duration: float


requests = st.lists(
    st.builds(
        Request,
        st.sampled_from(NODES),
        st.sampled_from(MODULES),
        st.sampled_from(["acquire", "renew", "release"]),
        st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0, 1.5, 3.0]) | st.floats(0, 5),
        st.sampled_from([0.5, 1.5]) | st.floats(0.01, 10),
    ),
    max_size=60,
)


def run(
    arbiter: Arbiter, script: list[Request], start: float
) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Play requests with time moving forward; what each node was told it holds, per module."""
    held: dict[str, dict[str, list[tuple[float, float]]]] = {
        m: {n: [] for n in NODES} for m in MODULES
    }
    now = start
    for r in script:
        now += r.advance
        verdict = arbiter.decide("shop", r.node, LeaseItem(r.module, r.action), r.duration, now)
        intervals = held[r.module][r.node]
        if r.action == "release" and verdict.reason == "lease released":
            # The holder gave it up: from now on it no longer relies on its grants.
            intervals[:] = [(a, min(b, now)) for a, b in intervals]
        elif r.action != "release" and verdict.granted:
            assert verdict.holder == r.node
            intervals.append((now, now + verdict.expires_in))
        elif r.action != "release":
            assert verdict.holder != r.node
    return held


def overlaps(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> bool:
    return any(s1 < e2 - 1e-9 and s2 < e1 - 1e-9 for s1, e1 in a for s2, e2 in b)


@given(requests)
def test_two_nodes_never_hold_overlapping_grants(script: list[Request]) -> None:
    held = run(Arbiter(), script, start=1000.0)
    for module in MODULES:
        assert not overlaps(held[module]["node1"], held[module]["node2"])


@given(requests, requests, st.floats(0, 100), st.floats(0.01, 10))
def test_a_restored_arbiter_never_grants_another_node_early(
    before: list[Request], after: list[Request], gap: float, duration: float
) -> None:
    first = Arbiter()
    run(first, before, start=0.0)
    restart = sum(r.advance for r in before) + gap
    restored = Arbiter()
    restored.restore(first.holders(), restart, duration)
    now = restart
    for r in after:
        now += r.advance
        verdict = restored.decide("shop", r.node, LeaseItem(r.module, r.action), r.duration, now)
        holder = first.holders().get(("shop", r.module))
        if verdict.granted and r.action != "release" and holder not in (None, r.node):
            assert now >= restart + duration
        if r.action == "release" and verdict.reason == "lease released":
            first.decide("shop", r.node, LeaseItem(r.module, "release"), 1.0, now)


@given(requests, st.floats(0.01, 10))
def test_an_amnesic_arbiter_grants_newcomers_only_after_a_lease_period(
    script: list[Request], duration: float
) -> None:
    arbiter = Arbiter(started=0.0)
    now = 0.0
    for r in script:
        now += r.advance
        verdict = arbiter.decide("shop", r.node, LeaseItem(r.module, r.action), duration, now)
        if verdict.granted and r.action == "acquire" and now < duration:
            # Before a lease period has passed only a renewal (by the holder the witness
            # forgot) may create a lease from nothing.
            assert verdict.reason != f"lease granted for {duration:g} s"


# -- data generations (outdate-peer kept by the witness) ---------------------------------------

G0, G1, G2 = 0x1111, 0x2222, 0x3333


def ask_with(arbiter: Arbiter, node: str, action: Action, generation: int, now: float) -> Verdict:
    return arbiter.decide("c", node, LeaseItem("web", action, generation), 1.5, now)


def test_a_node_whose_data_is_behind_the_last_holders_is_not_let_in() -> None:
    arbiter = Arbiter()
    assert ask_with(arbiter, "node1", "acquire", G0, 0.0).granted
    # node1 lost its peer and serves alone: a new generation, reported with its renewals
    renewed = ask_with(arbiter, "node1", "renew", G1, 1.0)
    assert renewed.granted and renewed.generation == G1
    # node1 dies; its lease expires; node2 still holds G0
    refused = ask_with(arbiter, "node2", "acquire", G0, 10.0)
    assert not refused.granted and refused.holder is None
    assert "data outdated here" in refused.reason and f"{G1:016x}" in refused.reason
    assert refused.generation == G1


def test_a_node_in_sync_with_the_last_holder_takes_over_and_reports_its_own_generation() -> None:
    arbiter = Arbiter()
    ask_with(arbiter, "node1", "acquire", G1, 0.0)
    granted = ask_with(arbiter, "node2", "acquire", G1, 10.0)
    assert granted.granted
    assert ask_with(arbiter, "node2", "renew", G2, 10.5).generation == G2
    # node1 returns without having resynced: behind node2 now
    assert not ask_with(arbiter, "node1", "acquire", G1, 30.0).granted


def test_the_generation_outlives_a_release_and_a_forced_request_skips_the_check() -> None:
    arbiter = Arbiter()
    ask_with(arbiter, "node1", "acquire", G1, 0.0)
    ask_with(arbiter, "node1", "release", G1, 1.0)
    assert not ask_with(arbiter, "node2", "acquire", G0, 2.0).granted
    assert ask_with(arbiter, "node2", "acquire", 0, 2.0).granted  # `prim --force`: no generation


def test_the_last_holder_itself_and_first_starts_are_never_refused_for_data() -> None:
    arbiter = Arbiter()
    assert ask_with(arbiter, "node1", "acquire", 0, 0.0).granted  # no data history yet
    ask_with(arbiter, "node1", "renew", G1, 0.5)
    assert ask_with(arbiter, "node1", "acquire", G0, 10.0).granted  # its own data, whatever it is
