"""The module state machine: every rule of DESIGN.md's "Module states", in examples and at random.

Example tests assert one decision's state, data, reason and requests. The
stateful tests drive a simulated pair and witness (`simulation.py`) through
power losses, restarts, cuts, witness outages, checker failures and every
command, and check the safety invariants after every step.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from agent.core.commands import Command, Outcome
from agent.core.machine import (
    Decision,
    LeaseAction,
    ModuleView,
    PeerModule,
    WitnessView,
    decide,
    is_eligible,
)
from agent.core.states import DataState, State
from tests.unit.agent.core.simulation import (
    NODES,
    PEER_TIMEOUT,
    TICK,
    InvariantError,
    Sim,
    SimConfig,
)

UTD = DataState.UP_TO_DATE
OUTDATED = DataState.OUTDATED
UNKNOWN = DataState.UNKNOWN
LOST = "peer lost on 2/2 links for 1.5 s"
VIP = "198.18.0.100/24"
WITNESS_OK = WitnessView(configured=True, reachable=True)
GRANTED = WitnessView(configured=True, reachable=True, lease_valid=True)
UNREACHABLE = WitnessView(configured=True, reachable=False)
NO_WITNESS = WitnessView()


def denied(holder: str = "node2") -> WitnessView:
    return WitnessView(configured=True, reachable=True, holder=holder)


def view(
    state: State = State.WAIT,
    data: DataState = UTD,
    peer: PeerModule | None = None,
    witness: WitnessView = WITNESS_OK,
    preferred: bool = True,
    **kwargs: object,
) -> ModuleView:
    """node1's view (the preferred node unless told otherwise) of module `web`."""
    defaults: dict[str, object] = {
        "auto_failback": False,
        "peer_lost_reason": LOST,
        "peer_silence": None if peer is not None else PEER_TIMEOUT,
    }
    defaults.update(kwargs)
    return ModuleView(
        node="node1",
        peer_node="node2",
        vip=VIP,
        state=state,
        data=data,
        preferred=preferred,
        peer=peer,
        witness=witness,
        **defaults,  # type: ignore[arg-type]
    )


def peer(
    state: State,
    data: DataState = UTD,
    eligible: bool = True,
    holds: bool | None = None,
    **kwargs: bool,
) -> PeerModule:
    return PeerModule(state, data, eligible, state.is_serving if holds is None else holds, **kwargs)


def check(decision: Decision, state: State, reason: str, data: DataState | None = None) -> Decision:
    assert decision.state is state, decision
    assert reason in decision.reason, decision.reason
    if data is not None:
        assert decision.data is data, decision
    return decision


# -- first start ------------------------------------------------------------------------------


def test_first_start_the_preferred_node_promotes_and_the_other_waits() -> None:
    p = check(
        decide(view(data=UNKNOWN, peer=peer(State.WAIT, UNKNOWN), witness=NO_WITNESS)),
        State.ALONE,
        "first start: node1 is the default primary",
        data=UTD,
    )
    assert p.serves and p.consumed == {"force_primary", "want_primary"}
    n = decide(view(data=UNKNOWN, peer=peer(State.WAIT, UNKNOWN), preferred=False))
    check(n, State.WAIT, "waiting for node2, the preferred node, to take the primary role")
    assert n.data is UNKNOWN and not n.wants_primary and not n.yielding


def test_first_start_with_a_witness_asks_for_the_lease_first() -> None:
    asking = decide(view(data=UNKNOWN, peer=peer(State.WAIT, UNKNOWN)))
    check(asking, State.WAIT, "first start: node1 is the default primary; asking the witness")
    assert asking.lease is LeaseAction.ACQUIRE
    granted = decide(view(data=UNKNOWN, peer=peer(State.WAIT, UNKNOWN), witness=GRANTED))
    check(granted, State.ALONE, "first start: node1 is the default primary; witness granted")
    assert granted.lease is LeaseAction.RENEW


def test_first_start_alone_waits_for_the_peer_or_prim_force() -> None:
    for witness in (WITNESS_OK, NO_WITNESS):
        d = decide(view(data=UNKNOWN, witness=witness))
        check(d, State.WAIT, "first start: waiting for node2 or `prim --force`", data=UNKNOWN)
        assert d.reason == "first start: waiting for node2 or `prim --force`"
        assert d.lease is LeaseAction.NONE and not d.probe_vip


def test_first_start_when_the_preferred_node_cannot_serve_it_hands_over() -> None:
    failing = view(
        data=UNKNOWN,
        peer=peer(State.WAIT, UNKNOWN),
        checkers_ok=False,
        checker_problem="checker interface eth0 failing here",
    )
    d = check(decide(failing), State.WAIT, "checker interface eth0 failing here: may not serve")
    assert d.yielding
    other = view(
        data=UNKNOWN,
        peer=peer(State.WAIT, UNKNOWN, eligible=False, yielding=True),
        preferred=False,
        witness=NO_WITNESS,
    )
    check(decide(other), State.ALONE, "first start: node2 handed over the primary role")


# -- failover with a witness ------------------------------------------------------------------


@pytest.mark.parametrize("state", [State.SECOND, State.WAIT])
def test_failover_asks_the_witness_and_promotes_once_granted(state: State) -> None:
    asking = decide(view(state))
    check(asking, State.WAIT, f"{LOST}; asking the witness", data=UTD)
    assert asking.lease is LeaseAction.ACQUIRE and not asking.serves
    granted = decide(view(state, witness=GRANTED))
    check(granted, State.ALONE, f"{LOST}; witness granted primary", data=UTD)
    assert granted.lease is LeaseAction.RENEW


def test_failover_denied_while_the_other_node_holds_the_lease() -> None:
    d = decide(view(State.SECOND, witness=denied()))
    check(d, State.WAIT, f"{LOST}; witness: lease held by node2")
    assert d.lease is LeaseAction.ACQUIRE


def test_failover_waits_while_the_witness_is_unreachable() -> None:
    d = decide(view(State.SECOND, witness=UNREACHABLE))
    check(d, State.WAIT, "witness unreachable: not taking over, since node2 may still serve")
    assert d.lease is LeaseAction.ACQUIRE and not d.probe_vip


# -- failover without a witness ---------------------------------------------------------------


def test_failover_without_a_witness_probes_the_vip_first() -> None:
    probe = decide(view(State.SECOND, witness=NO_WITNESS))
    check(probe, State.WAIT, f"checking that VIP {VIP} does not answer on the LAN")
    assert probe.probe_vip and probe.lease is LeaseAction.NONE
    free = decide(view(State.SECOND, witness=NO_WITNESS, vip_in_use=False))
    check(free, State.ALONE, f"{LOST}; VIP {VIP} is free: taking over", data=UTD)


def test_failover_without_a_witness_waits_while_the_vip_answers() -> None:
    d = decide(view(State.SECOND, witness=NO_WITNESS, vip_in_use=True))
    check(d, State.WAIT, f"VIP {VIP} still answers on the LAN (heartbeat-only cut?)")
    assert "not taking over without a witness" in d.reason
    assert d.probe_vip  # keep probing: the peer may really be gone later


# -- data rules and `prim --force` -----------------------------------------------------------


@pytest.mark.parametrize("witness", [GRANTED, NO_WITNESS])
def test_outdated_data_waits_instead_of_promoting(witness: WitnessView) -> None:
    d = decide(view(data=OUTDATED, witness=witness, vip_in_use=False))
    check(d, State.WAIT, "data outdated: node2 ran as primary without this node", OUTDATED)
    assert "waiting for node2 or `prim --force`" in d.reason
    assert not d.serves and not d.probe_vip


def test_outdated_data_with_the_peer_up_but_unable_waits_naming_prim_force() -> None:
    d = decide(view(data=OUTDATED, peer=peer(State.STOP, UTD, eligible=False)))
    check(d, State.WAIT, "data OUTDATED here and node2 cannot serve (STOP)", OUTDATED)
    assert "`prim --force` overrides" in d.reason


def test_prim_force_overrides_the_data_rule() -> None:
    d = decide(view(data=OUTDATED, force_primary=True, witness=GRANTED))
    check(d, State.ALONE, "forced by the administrator (`prim --force`); witness granted", UTD)
    assert "force_primary" in d.consumed


@pytest.mark.parametrize(
    ("witness", "why"),
    [
        (denied(), "witness: lease held by node2"),
        (UNREACHABLE, "witness unreachable: not taking over"),
        (WITNESS_OK, "asking the witness"),
    ],
)
def test_prim_force_never_overrides_the_witness(witness: WitnessView, why: str) -> None:
    d = decide(view(data=OUTDATED, force_primary=True, witness=witness))
    check(d, State.WAIT, "forced by the administrator (`prim --force`)", OUTDATED)
    assert why in d.reason
    assert d.lease is LeaseAction.ACQUIRE and "force_primary" not in d.consumed


def test_prim_is_dropped_once_the_data_is_no_longer_up_to_date() -> None:
    d = decide(view(data=OUTDATED, peer=peer(State.WAIT, OUTDATED), want_primary=True))
    check(d, State.WAIT, "`prim` dropped: data here is OUTDATED now; `prim --force` overrides")
    assert d.consumed == {"want_primary"} and not d.wants_primary


# -- the primary loses its peer ---------------------------------------------------------------


@pytest.mark.parametrize("state", [State.PRIM, State.ALONE])
def test_primary_with_its_lease_runs_alone(state: State) -> None:
    d = decide(view(state, witness=GRANTED))
    check(d, State.ALONE, f"{LOST}; witness lease held: running alone", UTD)
    assert d.lease is LeaseAction.RENEW


@pytest.mark.parametrize("state", [State.PRIM, State.ALONE])
@pytest.mark.parametrize("witness", [WITNESS_OK, UNREACHABLE, denied()])
def test_primary_losing_peer_and_witness_steps_down(state: State, witness: WitnessView) -> None:
    holding = decide(view(state, witness=witness, holds_resources=True))
    check(holding, State.WAIT, f"{LOST} and no valid witness lease: stepping down", UTD)
    assert holding.reason.endswith("before the lease could pass to the other node")
    # The lease is renewed while the VIP and application are still up here: a
    # witness that answers again never grants the peer a VIP this node still holds.
    assert holding.lease is LeaseAction.RENEW and not holding.serves
    assert holding.consumed == {"handover"}


def test_a_node_that_stepped_down_releases_its_lease_once_its_resources_are_down() -> None:
    why = "checker tcp failed; giving the module up here"
    holding = decide(view(State.ALONE, witness=GRANTED, gave_up=why, holds_resources=True))
    check(holding, State.WAIT, why)
    assert holding.lease is LeaseAction.RENEW
    down = decide(view(State.WAIT, witness=GRANTED, gave_up=why))
    check(down, State.WAIT, why)
    assert down.lease is LeaseAction.RELEASE
    # Without a lease to give back there is nothing to ask.
    assert decide(view(State.WAIT, witness=WITNESS_OK, gave_up=why)).lease is LeaseAction.NONE


def test_primary_without_lease_steps_down_before_the_peer_times_out() -> None:
    silent = view(State.PRIM, peer=peer(State.SECOND), witness=UNREACHABLE, peer_silence=0.8)
    check(decide(silent), State.WAIT, "witness lease lost and node2 silent for 0.8 s")
    heard = view(State.PRIM, peer=peer(State.SECOND), witness=UNREACHABLE, peer_silence=0.5)
    check(decide(heard), State.PRIM, "node2 is an up-to-date secondary")


def test_primary_without_a_witness_runs_alone_when_the_peer_is_lost() -> None:
    d = decide(view(State.PRIM, witness=NO_WITNESS))
    check(d, State.ALONE, f"{LOST}; running alone", UTD)
    assert d.lease is LeaseAction.NONE


# -- split brain ------------------------------------------------------------------------------


@pytest.mark.parametrize("mine", [State.ALONE, State.PRIM])
def test_split_brain_with_a_witness_the_lease_holder_keeps_the_role(mine: State) -> None:
    other = peer(State.ALONE)
    keep = decide(view(mine, peer=other, witness=GRANTED))
    check(keep, State.ALONE, "node2 also serves the module (split brain)")
    assert "the witness lease holder keeps it: keeping the role" in keep.reason
    give = decide(view(mine, peer=other, witness=denied(), peer_silence=0.25))
    check(give, State.WAIT, "the witness lease holder keeps it: giving up the role", OUTDATED)


def test_split_brain_without_a_witness_exactly_one_keeps_the_role() -> None:
    decisions = [
        decide(view(State.ALONE, peer=peer(State.ALONE), witness=NO_WITNESS, preferred=p))
        for p in (True, False)
    ]
    assert [d.serves for d in decisions] == [True, False]
    check(decisions[0], State.ALONE, "the preferred node keeps it: keeping the role")
    check(decisions[1], State.WAIT, "the preferred node keeps it: giving up the role", OUTDATED)


# -- swap handshake ---------------------------------------------------------------------------


def test_swap_the_primary_becomes_a_yielding_secondary() -> None:
    d = decide(view(State.PRIM, peer=peer(State.SECOND), witness=GRANTED, handover=True))
    check(d, State.SECOND, "swap requested: handing the primary role to node2", UTD)
    assert d.yielding and d.consumed == {"handover"} and not d.serves
    # The lease follows the VIP: kept while it is up here, released once it is down.
    holding = decide(
        view(
            State.PRIM,
            peer=peer(State.SECOND),
            witness=GRANTED,
            handover=True,
            holds_resources=True,
        )
    )
    assert holding.lease is LeaseAction.RENEW


def test_swap_is_not_done_toward_a_secondary_that_cannot_serve() -> None:
    for other in (
        peer(State.SECOND, OUTDATED),
        peer(State.SECOND, eligible=False),
        peer(State.SECOND, maintenance=True),
        peer(State.WAIT),
    ):
        d = decide(view(State.PRIM, peer=other, witness=GRANTED, handover=True))
        assert d.serves and d.consumed >= {"handover"}, (other, d)


def test_swap_the_secondary_waits_for_the_release_then_promotes() -> None:
    releasing = peer(State.SECOND, holds=True)
    waiting = decide(view(State.SECOND, peer=releasing, witness=GRANTED, want_primary=True))
    check(waiting, State.SECOND, "waiting for node2 to release the VIP and application")
    released = peer(State.SECOND, yielding=True)
    asking = decide(view(State.SECOND, peer=released, preferred=False))
    check(asking, State.SECOND, "node2 handed over the primary role; asking the witness")
    granted = decide(view(State.SECOND, peer=released, witness=GRANTED, preferred=False))
    check(granted, State.PRIM, "node2 handed over the primary role; witness granted primary")


def test_swap_the_old_primary_keeps_handing_over_until_the_peer_serves() -> None:
    d = decide(view(State.SECOND, peer=peer(State.WAIT), yielding=True))
    check(d, State.SECOND, "handing the primary role to node2")
    assert d.yielding and not d.serves
    done = decide(view(State.SECOND, peer=peer(State.PRIM), yielding=True))
    check(done, State.SECOND, "node2 is primary (PRIM); this node is an up-to-date secondary")
    assert not done.yielding


def test_the_secondary_asks_for_the_role_and_the_primary_hands_it_over() -> None:
    ask = decide(view(State.SECOND, peer=peer(State.PRIM), want_primary=True))
    check(ask, State.SECOND, "this node is an up-to-date secondary; asking for the primary role")
    assert ask.wants_primary
    hand = decide(view(State.PRIM, peer=peer(State.SECOND, wants_primary=True), witness=GRANTED))
    check(hand, State.SECOND, "node2 asked for the primary role: handing the primary role")
    assert hand.yielding


# -- failback with default_primary ------------------------------------------------------------


def test_failback_the_returning_node_is_secondary_first_and_never_preempts() -> None:
    catching_up = view(State.WAIT, UTD, peer=peer(State.ALONE), in_sync=False, auto_failback=True)
    d = check(
        decide(catching_up), State.SECOND, "node2 is primary (ALONE); this node is catching up"
    )
    assert d.data is OUTDATED and not d.wants_primary and not d.serves


def test_failback_asks_for_the_role_back_once_up_to_date() -> None:
    synced = view(State.SECOND, OUTDATED, peer=peer(State.PRIM), auto_failback=True)
    d = check(decide(synced), State.SECOND, "asking for the primary role back", UTD)
    assert d.wants_primary and not d.serves
    # The primary hands it over only to an up-to-date, eligible secondary.
    primary = decide(view(State.PRIM, peer=peer(State.SECOND, wants_primary=True), preferred=False))
    check(primary, State.SECOND, "node2 asked for the primary role")
    behind = decide(
        view(State.PRIM, peer=peer(State.SECOND, OUTDATED, wants_primary=True), witness=GRANTED)
    )
    check(behind, State.PRIM, "node2 is secondary and catching up")


# -- stop, maintenance, checkers, giving up ---------------------------------------------------


def test_stop_of_the_primary_hands_the_module_over() -> None:
    stopping = view(State.PRIM, peer=peer(State.SECOND), witness=GRANTED, running=False)
    d = check(decide(stopping), State.STOP, "stopped by the administrator", UTD)
    assert d.yielding and not d.serves and d.lease is LeaseAction.RELEASE
    holding = decide(
        view(
            State.PRIM,
            peer=peer(State.SECOND),
            witness=GRANTED,
            running=False,
            holds_resources=True,
        )
    )
    assert holding.lease is LeaseAction.RENEW
    waiting = decide(view(State.SECOND, peer=peer(State.STOP, holds=True, eligible=False)))
    check(waiting, State.SECOND, "waiting for node2 to release the VIP and application")
    released = peer(State.STOP, eligible=False, yielding=True)
    taking = decide(view(State.SECOND, peer=released, preferred=False, witness=GRANTED))
    check(taking, State.ALONE, "node2 handed over the primary role; witness granted primary")


def test_stop_is_remembered_and_the_data_goes_outdated_while_the_peer_serves() -> None:
    d = decide(view(State.STOP, peer=peer(State.ALONE), running=False))
    check(d, State.STOP, "stopped by the administrator", OUTDATED)


@pytest.mark.parametrize("state", [State.SECOND, State.WAIT])
def test_maintenance_freezes_the_standby(state: State) -> None:
    d = decide(view(state, witness=GRANTED, maintenance=True))
    check(d, state, "maintenance mode: no failover, no checkers, no automatic action")
    assert not d.serves and d.lease is LeaseAction.RELEASE  # a lease it does not need


def test_maintenance_freezes_the_primary_but_never_the_witness_rule() -> None:
    kept = decide(view(State.PRIM, witness=GRANTED, maintenance=True))
    check(kept, State.PRIM, "maintenance mode")
    assert kept.lease is LeaseAction.RENEW
    lost = decide(view(State.PRIM, witness=UNREACHABLE, maintenance=True))
    check(lost, State.WAIT, "no valid witness lease: stepping down")
    silent = view(
        State.PRIM,
        peer=peer(State.SECOND),
        witness=UNREACHABLE,
        maintenance=True,
        peer_silence=0.8,
    )
    check(decide(silent), State.WAIT, "witness lease lost and node2 silent for 0.8 s")


def test_maintenance_still_keeps_the_data_state_true() -> None:
    waiting = decide(view(State.WAIT, peer=peer(State.ALONE), maintenance=True))
    check(waiting, State.WAIT, "maintenance mode", OUTDATED)
    receiving = decide(view(State.SECOND, OUTDATED, peer=peer(State.PRIM), maintenance=True))
    check(receiving, State.SECOND, "maintenance mode", UTD)
    behind = view(State.SECOND, UTD, peer=peer(State.PRIM), maintenance=True, in_sync=False)
    check(decide(behind), State.SECOND, "maintenance mode", OUTDATED)
    alone = decide(view(State.SECOND, UTD, maintenance=True))
    check(alone, State.SECOND, "maintenance mode", UTD)


def test_a_node_in_maintenance_while_the_peer_ran_alone_does_not_promote_on_stale_data() -> None:
    sim = steady(SimConfig(witness=False, acquire_ticks=0, release_ticks=0, resync_ticks=0))
    sim.restart("node2")
    sim.set_checker("node1", True)
    assert sim.command("node2", Command.MAINTENANCE_ON).accepted
    sim.run(0.75)  # node1 runs ALONE and writes while node2 does not receive
    assert sim.nodes["node1"].state is State.ALONE
    assert sim.command("node2", Command.MAINTENANCE_OFF).accepted
    sim.run(1.0)  # node1 gives up: node2 must not take over on stale data
    assert sim.nodes["node2"].data is OUTDATED
    assert sim.serving() == []
    assert "data OUTDATED here and node1 cannot serve" in sim.nodes["node2"].reason


def test_maintenance_on_a_stopped_module_that_starts_waits() -> None:
    d = decide(view(State.STOP, maintenance=True))
    check(d, State.WAIT, "maintenance mode")


def test_a_failing_checker_keeps_the_secondary_waiting() -> None:
    d = decide(
        view(
            State.SECOND,
            peer=peer(State.PRIM),
            checkers_ok=False,
            checker_problem="checker interface eth0 failing here",
        )
    )
    check(d, State.WAIT, "checker interface eth0 failing here: may not serve", OUTDATED)
    assert not is_eligible(view(checkers_ok=False))
    alone = decide(view(State.SECOND, checkers_ok=False, checker_problem="checker x failing"))
    check(alone, State.WAIT, "checker x failing: may not serve")
    assert alone.lease is LeaseAction.NONE


def test_gave_up_steps_down_and_holds_the_node_back() -> None:
    why = "checker tcp failed; 2 local restart(s) within 60 s did not help"
    d = decide(view(State.PRIM, peer=peer(State.SECOND), witness=GRANTED, gave_up=why))
    check(d, State.WAIT, why, UTD)
    assert d.reason == why and not d.serves and "handover" in d.consumed
    standby = decide(view(State.WAIT, gave_up=why))
    check(standby, State.WAIT, why)
    assert standby.yielding
    behind = decide(view(State.WAIT, peer=peer(State.ALONE), gave_up=why))
    check(behind, State.WAIT, why, OUTDATED)
    held = decide(view(State.WAIT, hold="held back after giving it up"))
    check(held, State.WAIT, "held back after giving it up")
    assert not is_eligible(view(hold="x")) and not is_eligible(view(gave_up="x"))


def test_an_incompatible_peer_is_reported_and_nothing_promotes() -> None:
    why = "node2 runs another configuration"
    d = decide(view(peer=peer(State.WAIT), peer_incompatible=why))
    assert d.state is State.WAIT and d.reason == why and not d.yielding
    serving = decide(view(peer=peer(State.PRIM), peer_incompatible=why))
    check(serving, State.WAIT, why, OUTDATED)


# -- the election between two heard nodes -----------------------------------------------------


def test_the_node_not_preferred_never_promotes_on_its_own_while_the_preferred_is_heard() -> None:
    for other in (
        peer(State.WAIT, OUTDATED),
        peer(State.STOP, UTD, eligible=False),
        peer(State.WAIT, UTD, eligible=False),
        peer(State.WAIT, UNKNOWN),
    ):
        d = decide(view(peer=other, preferred=False, witness=GRANTED))
        assert d.state is State.WAIT and not d.serves, (other, d)
        assert "waiting for node2" in d.reason


def test_the_preferred_node_hands_the_role_to_a_better_peer() -> None:
    d = decide(view(data=OUTDATED, peer=peer(State.WAIT, UTD)))
    check(d, State.WAIT, "waiting for node2 to take the primary role")
    assert d.yielding
    taken = decide(view(peer=peer(State.WAIT, OUTDATED, yielding=True), preferred=False))
    check(taken, State.WAIT, "node2 handed over the primary role; asking the witness")


def test_a_forced_peer_is_handed_the_role_even_by_the_preferred_node() -> None:
    claim = decide(
        view(data=OUTDATED, peer=peer(State.WAIT, UTD), preferred=False, force_primary=True)
    )
    check(claim, State.WAIT, "asking node2 to hand over the primary role")
    assert claim.wants_primary
    d = decide(view(peer=peer(State.WAIT, OUTDATED, wants_primary=True)))
    check(d, State.WAIT, "node2 asks for the primary role: handing it over")
    assert d.yielding and not d.serves


def test_a_node_that_was_handing_over_waits_one_heartbeat_before_promoting() -> None:
    d = decide(view(peer=peer(State.WAIT, eligible=False), yielding=True, witness=GRANTED))
    check(d, State.WAIT, "no longer handing the primary role to node2")
    assert not d.yielding and not d.serves
    nxt = decide(view(peer=peer(State.WAIT, eligible=False), witness=GRANTED))
    check(nxt, State.ALONE, "node2 cannot serve (WAIT, data UP_TO_DATE); witness granted")


# -- the simulated pair: liveness -------------------------------------------------------------


def steady(config: SimConfig) -> Sim:
    """A pair that has started and settled: node1 PRIM, node2 an up-to-date SECOND."""
    sim = Sim(config)
    sim.run(4.0)
    assert [sim.nodes[n].state for n in NODES] == [State.PRIM, State.SECOND], sim.trace[-4:]
    assert sim.nodes["node2"].data is UTD
    return sim


@pytest.mark.parametrize("first", [*NODES, None])
def test_power_loss_of_the_primary_fails_over_within_peer_timeout(first: str | None) -> None:
    sim = steady(SimConfig(witness=True))
    sim.kill("node1")
    took = sim.run_until(lambda: sim.serving() == ["node2"], 10.0, first)
    assert took <= PEER_TIMEOUT + 3 * TICK
    assert "witness granted primary" in sim.nodes["node2"].reason
    assert sim.nodes["node2"].state is State.ALONE


@pytest.mark.parametrize("witness", [True, False])
@pytest.mark.parametrize("first", [*NODES, None])
def test_swap_on_a_healthy_pair_exchanges_the_roles(witness: bool, first: str | None) -> None:
    sim = steady(SimConfig(witness=witness))
    assert sim.command("node1", Command.SWAP).accepted
    sim.run_until(
        lambda: sim.nodes["node2"].state is State.PRIM and sim.nodes["node1"].state is State.SECOND,
        8 * TICK,
        first,
    )
    sim.run(2.0, first)  # and they stay so: the preferred node does not take it back
    assert [sim.nodes[n].state for n in NODES] == [State.SECOND, State.PRIM]
    assert sim.vip_holders() == ["node2"]


def test_swap_back_to_the_preferred_node() -> None:
    sim = steady(SimConfig(witness=True))
    assert sim.command("node1", Command.SWAP).accepted
    sim.run(2.0)
    assert sim.command("node1", Command.SWAP).accepted  # from the secondary: take it back
    sim.run_until(lambda: sim.nodes["node1"].state is State.PRIM, 8 * TICK)
    sim.run(1.0)
    assert [sim.nodes[n].state for n in NODES] == [State.PRIM, State.SECOND]


def test_failback_to_the_default_primary_after_it_returns() -> None:
    sim = steady(SimConfig(witness=True, default_primary="node1", resync_ticks=4))
    sim.kill("node1")
    sim.run(3.0)
    assert sim.serving() == ["node2"]
    sim.restart("node1")
    sim.run(1.0)
    assert sim.nodes["node1"].state is State.SECOND  # secondary first, catching up
    assert sim.serving() == ["node2"]
    sim.run_until(lambda: sim.serving() == ["node1"], 4.0)
    assert "node2 handed over the primary role" in sim.nodes["node1"].reason
    sim.run(1.0)
    assert [sim.nodes[n].state for n in NODES] == [State.PRIM, State.SECOND]


def test_stop_of_the_primary_moves_the_module_and_start_keeps_it_there() -> None:
    sim = steady(SimConfig(witness=True, release_ticks=3))
    assert sim.command("node1", Command.STOP).accepted
    sim.run_until(lambda: sim.serving() == ["node2"], 3.0)
    assert sim.nodes["node1"].state is State.STOP
    assert sim.command("node1", Command.START).accepted
    sim.run(3.0)
    assert [sim.nodes[n].state for n in NODES] == [State.SECOND, State.PRIM]


def test_stop_all_stops_both() -> None:
    sim = steady(SimConfig(witness=True))
    assert sim.command("node2", Command.STOP_ALL).accepted
    sim.run(2.0)
    assert [sim.nodes[n].state for n in NODES] == [State.STOP, State.STOP]
    assert sim.vip_holders() == []


# -- the simulated pair: fixed races ----------------------------------------------------------


@pytest.mark.parametrize("witness", [True, False])
def test_both_nodes_started_at_the_same_instant_give_one_primary(witness: bool) -> None:
    sim = steady(SimConfig(witness=witness))
    sim.command("node1", Command.STOP_ALL)
    sim.run(2.0)
    sim.command("node1", Command.START)
    sim.command("node2", Command.START)
    sim.run(3.0, first=None)  # raises on two VIP holders
    assert len(sim.serving()) == 1


@pytest.mark.parametrize("witness", [True, False])
def test_prim_force_while_the_peer_starts_gives_one_primary(witness: bool) -> None:
    sim = steady(SimConfig(witness=witness))
    sim.command("node1", Command.STOP)
    sim.run(2.0)
    sim.command("node2", Command.STOP)
    sim.run(2.0)
    sim.command("node1", Command.START)
    sim.run(1.0)
    assert sim.nodes["node1"].data is OUTDATED
    sim.command("node2", Command.START)
    assert sim.command("node1", Command.PRIM_FORCE).accepted
    sim.run(3.0, first=None)
    assert sim.serving() == ["node1"]  # the forced node, not the one with newer data


def test_a_partitioned_primary_that_gives_up_keeps_its_lease_until_its_vip_is_gone() -> None:
    # The daemon's order: a 2 s stop script, and only then is the VIP removed.
    sim = steady(SimConfig(witness=True, release_ticks=8, vip_first=False))
    sim.cut_heartbeats()
    sim.run(3.0)
    assert sim.serving() == ["node1"]
    sim.set_checker("node1", True)
    sim.run(6.0, first="node2")  # raises if node2 took the VIP before node1 let it go
    # node1 wrote alone meanwhile: the witness keeps node2 (outdated) from taking over,
    # and `prim --force` on node2 is the administrator's way to accept that loss.
    assert sim.serving() == []
    assert "data outdated" in (sim.view("node2").witness.refusal or "")
    assert sim.command("node2", Command.PRIM_FORCE).accepted
    sim.run(4.0, first="node2")
    assert sim.serving() == ["node2"]


def lose_peer_and_witness(sim: Sim) -> None:
    """node1 (primary) loses the witness and then its peer: it must step down in time."""
    sim.cut_witness("node1")
    sim.cut_heartbeats()
    for first in (*NODES, None) * 4:  # raises the moment both hold the VIP
        sim.tick(first)
    assert sim.serving() == ["node2"]
    reasons = [d.reason for d in sim.nodes["node2"].decisions]
    assert any(r.endswith("; witness granted primary") for r in reasons)


def test_a_primary_losing_its_lease_removes_its_vip_before_the_peer_is_granted() -> None:
    # A 2 s stop script: harmless as long as the VIP goes first.
    sim = steady(SimConfig(witness=True, release_ticks=8, vip_first=True))
    lose_peer_and_witness(sim)
    reasons = [d.reason for d in sim.nodes["node1"].decisions]
    assert any(r.startswith("witness lease lost and node2 silent for") for r in reasons)


def test_the_vip_must_go_before_a_slow_stop_script_when_the_lease_is_lost() -> None:
    # Why module._bring_down removes the VIP first: the lease margin is one heartbeat,
    # shorter than a stop script, so the other order lets the peer take the VIP early.
    with pytest.raises(InvariantError, match="both nodes hold the VIP"):
        lose_peer_and_witness(steady(SimConfig(witness=True, release_ticks=4, vip_first=False)))


def test_a_heartbeat_only_cut_without_witness_keeps_the_secondary_waiting() -> None:
    sim = steady(SimConfig(witness=False))
    sim.cut_heartbeats()
    sim.run(10.0)
    assert sim.serving() == ["node1"]
    assert sim.vip_holders() == ["node1"]
    second = sim.nodes["node2"]
    assert second.state is State.WAIT
    assert f"VIP {VIP} still answers on the LAN (heartbeat-only cut?)" in second.reason
    sim.restore_heartbeats()
    sim.run(2.0)
    assert [sim.nodes[n].state for n in NODES] == [State.PRIM, State.SECOND]


def test_writes_made_alone_before_a_crash_are_never_lost() -> None:
    sim = steady(SimConfig(witness=True, acquire_ticks=0))
    sim.cut_heartbeats()
    sim.run(2.5)  # node1 runs ALONE with its lease and writes, in a generation of its own
    assert sim.nodes["node1"].writes - sim.nodes["node2"].writes, "node1 wrote alone"
    sim.kill("node1")
    sim.run(3.0)
    # The witness knows node1 served a generation node2 never got: node2 must not serve.
    assert sim.serving() == []
    assert not sim.unknowable_losses
    assert "data outdated" in (sim.view("node2").witness.refusal or "")


# -- the simulated pair: random faults --------------------------------------------------------

NODE = st.sampled_from(NODES)
FIRST = st.sampled_from([*NODES, None])


class Pair(RuleBasedStateMachine):
    """Two nodes and a witness under random faults, commands and time."""

    witness = True

    def __init__(self) -> None:
        super().__init__()
        self.sim = Sim(SimConfig(witness=self.witness))

    @initialize(
        default_primary=st.sampled_from([None, *NODES]),
        acquire=st.integers(0, 2),
        release=st.integers(0, 4),
        resync=st.integers(0, 3),
        settled=st.booleans(),
    )
    def setup(
        self,
        default_primary: str | None,
        acquire: int,
        release: int,
        resync: int,
        settled: bool,
    ) -> None:
        self.sim = Sim(
            SimConfig(
                witness=self.witness,
                default_primary=default_primary,
                acquire_ticks=acquire,
                release_ticks=release,
                resync_ticks=resync,
            )
        )
        if settled:
            self.sim.run(3.0)

    @rule(first=FIRST, ticks=st.integers(1, 8))
    def tick(self, first: str | None, ticks: int) -> None:
        for _ in range(ticks):
            self.sim.tick(first)

    @rule(name=NODE)
    def power_loss(self, name: str) -> None:
        if self.sim.nodes[name].alive:
            self.sim.kill(name)

    @rule(name=NODE)
    def restart(self, name: str) -> None:
        self.sim.restart(name)

    @rule(up=st.booleans())
    def heartbeats(self, up: bool) -> None:
        if up:
            self.sim.restore_heartbeats()
        else:
            self.sim.cut_heartbeats()

    @rule(name=NODE, up=st.booleans())
    def witness_link(self, name: str, up: bool) -> None:
        if up:
            self.sim.restore_witness(name)
        else:
            self.sim.cut_witness(name)

    @rule(up=st.booleans(), persisted=st.booleans())
    def witness_process(self, up: bool, persisted: bool) -> None:
        if not up:
            self.sim.stop_witness()
        elif not self.sim.witness_up:
            self.sim.start_witness(persisted)

    @rule(name=NODE, command=st.sampled_from(list(Command)))
    def command(self, name: str, command: Command) -> None:
        if not self.sim.nodes[name].alive:
            return
        outcome = self.sim.command(name, command)
        assert isinstance(outcome, Outcome)
        assert outcome.reason.strip()
        assert outcome.accepted or not outcome.intents

    @rule(name=NODE, failing=st.booleans())
    def checker(self, name: str, failing: bool) -> None:
        self.sim.set_checker(name, failing)

    @invariant()
    def every_decision_has_a_reason(self) -> None:
        for n in self.sim.nodes.values():
            assert all(d.reason.strip() for d in n.decisions[-2:])

    @invariant()
    def the_vip_follows_the_decisions(self) -> None:
        for n in self.sim.nodes.values():
            if n.vip:
                assert n.alive and (n.state.is_serving or n.app != "up"), n


class PairWithoutWitness(Pair):
    witness = False


FAST = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPairWithWitness = Pair.TestCase
TestPairWithWitness.settings = FAST
TestPairWithoutWitness = PairWithoutWitness.TestCase
TestPairWithoutWitness.settings = FAST
