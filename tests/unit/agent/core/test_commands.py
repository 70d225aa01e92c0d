"""Operator commands: every command in every situation has a defined outcome with a reason."""

from __future__ import annotations

import itertools

import pytest

from agent.core.commands import SERVING, Command, Intent, Outcome, evaluate
from agent.core.machine import ModuleView, PeerModule
from agent.core.states import DataState, State

# Every peer a node can see: unreachable, or any state, data and eligibility.
PEERS: list[PeerModule | None] = [None] + [
    PeerModule(state, data, eligible, holds_resources=state.is_serving, maintenance=maint)
    for state, data, eligible, maint in itertools.product(
        State, DataState, (True, False), (False, True)
    )
]


def view(
    state: State,
    data: DataState = DataState.UP_TO_DATE,
    peer: PeerModule | None = None,
    running: bool = True,
    maintenance: bool = False,
) -> ModuleView:
    return ModuleView(
        node="node1",
        peer_node="node2",
        vip="198.18.0.100/24",
        state=state,
        data=data,
        preferred=True,
        auto_failback=False,
        running=running,
        maintenance=maintenance,
        peer=peer,
    )


def secondary(data: DataState = DataState.UP_TO_DATE, eligible: bool = True) -> PeerModule:
    return PeerModule(State.SECOND, data, eligible, holds_resources=False)


def primary(state: State = State.PRIM) -> PeerModule:
    return PeerModule(state, DataState.UP_TO_DATE, True, holds_resources=True)


def situations(state: State) -> list[ModuleView]:
    """Every combination of data, peer, running and maintenance for a local state."""
    return [
        view(state, data, peer, running, maintenance)
        for data, peer, running, maintenance in itertools.product(
            DataState, PEERS, (True, False), (False, True)
        )
        # A stopped module is in STOP, and only a stopped module is.
        if running == (state is not State.STOP)
    ]


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("command", list(Command))
def test_every_command_in_every_situation_has_an_outcome_with_a_reason(
    command: Command, state: State
) -> None:
    for situation in situations(state):
        outcome = evaluate(command, situation)
        assert isinstance(outcome, Outcome)
        assert outcome.reason.strip(), (command, situation)
        if not outcome.accepted:
            assert not outcome.intents and not outcome.done_states and not outcome.already
        elif outcome.already:
            assert not outcome.intents
        else:
            assert outcome.intents, (command, situation)
            assert outcome.done_states, (command, situation)


@pytest.mark.parametrize("command", [Command.SWAP, Command.PRIM, Command.PRIM_FORCE])
@pytest.mark.parametrize("state", [State.WAIT, State.SECOND, State.PRIM, State.ALONE])
def test_role_commands_are_refused_in_maintenance(command: Command, state: State) -> None:
    for peer in PEERS:
        outcome = evaluate(command, view(state, peer=peer, maintenance=True))
        if outcome.already:
            continue  # `prim` on the primary: nothing to change
        assert not outcome.accepted
        assert outcome.reason == "the module is in maintenance mode; `maintenance off` first"


@pytest.mark.parametrize(
    "command", [Command.SWAP, Command.PRIM, Command.PRIM_FORCE, Command.RESTART]
)
def test_role_commands_on_a_stopped_module_say_to_start_it(command: Command) -> None:
    outcome = evaluate(command, view(State.STOP, running=False, peer=primary()))
    assert not outcome.accepted
    if command is Command.RESTART:
        assert outcome.reason == "restart applies where the module is primary; here it is STOP"
    else:
        assert "start it first (`tandemctl start MODULE`)" in outcome.reason


def test_swap_on_the_primary_hands_over_to_an_up_to_date_secondary() -> None:
    outcome = evaluate(Command.SWAP, view(State.PRIM, peer=secondary()))
    assert outcome.accepted
    assert outcome.intents == {Intent.HANDOVER}
    assert outcome.done_states == {State.SECOND}
    assert outcome.peer_done_states == SERVING
    assert outcome.reason == "handing the primary role to node2"


@pytest.mark.parametrize(
    ("peer", "why"),
    [
        (None, "node2 is not reachable"),
        (secondary(DataState.OUTDATED), "node2 is still catching up (OUTDATED)"),
        (PeerModule(State.WAIT, DataState.UP_TO_DATE, True, False), "node2 is WAIT"),
        (PeerModule(State.STOP, DataState.UP_TO_DATE, False, False), "node2 is STOP"),
        (secondary(eligible=False), "node2 cannot serve now"),
        (
            PeerModule(State.SECOND, DataState.UP_TO_DATE, True, False, maintenance=True),
            "node2 cannot serve now",
        ),
    ],
)
def test_swap_is_refused_without_an_up_to_date_secondary(peer: PeerModule | None, why: str) -> None:
    for state in SERVING:
        outcome = evaluate(Command.SWAP, view(state, peer=peer))
        assert not outcome.accepted
        assert outcome.reason.startswith("swap needs an up-to-date secondary: ")
        assert why in outcome.reason


def test_swap_on_the_secondary_asks_for_the_role() -> None:
    outcome = evaluate(Command.SWAP, view(State.SECOND, peer=primary()))
    assert outcome.accepted
    assert outcome.intents == {Intent.WANT_PRIMARY}
    assert outcome.done_states == SERVING
    assert outcome.peer_done_states == frozenset({State.SECOND})
    assert outcome.reason == "taking the primary role from node2"


def test_swap_on_a_secondary_still_catching_up_is_refused() -> None:
    outcome = evaluate(Command.SWAP, view(State.SECOND, DataState.OUTDATED, primary()))
    assert not outcome.accepted
    assert outcome.reason == "swap needs this secondary up to date; it is still catching up"


@pytest.mark.parametrize("state", [State.WAIT, State.SECOND])
def test_swap_without_a_primary_is_refused_naming_both_states(state: State) -> None:
    outcome = evaluate(Command.SWAP, view(state, peer=None))
    assert not outcome.accepted
    assert outcome.reason == (
        f"swap needs a primary and an up-to-date secondary; here {state}, node2 unreachable"
    )


@pytest.mark.parametrize("data", [DataState.OUTDATED, DataState.UNKNOWN])
@pytest.mark.parametrize("peer", [None, PeerModule(State.WAIT, DataState.UP_TO_DATE, True, False)])
def test_prim_on_data_not_up_to_date_is_refused_naming_prim_force(
    data: DataState, peer: PeerModule | None
) -> None:
    outcome = evaluate(Command.PRIM, view(State.WAIT, data, peer))
    assert not outcome.accepted
    assert outcome.reason == (
        f"data here is {data}: becoming primary could lose what node2 wrote; "
        "`prim --force` overrides"
    )


def test_prim_with_up_to_date_data_asks_for_the_role() -> None:
    outcome = evaluate(Command.PRIM, view(State.WAIT, peer=None))
    assert outcome.accepted
    assert outcome.intents == {Intent.WANT_PRIMARY}
    assert outcome.done_states == SERVING
    assert outcome.reason == "becoming primary"


def test_prim_on_an_up_to_date_secondary_takes_the_role_from_the_primary() -> None:
    outcome = evaluate(Command.PRIM, view(State.SECOND, peer=primary(State.ALONE)))
    assert outcome.accepted
    assert outcome.intents == {Intent.WANT_PRIMARY}
    assert outcome.reason == "taking the primary role from node2"


def test_prim_while_the_peer_serves_needs_an_up_to_date_secondary() -> None:
    outcome = evaluate(Command.PRIM, view(State.WAIT, peer=primary()))
    assert not outcome.accepted
    assert outcome.reason == "node2 is primary and this node is not an up-to-date secondary"


@pytest.mark.parametrize("command", [Command.PRIM, Command.PRIM_FORCE])
@pytest.mark.parametrize("state", sorted(SERVING))
def test_prim_on_the_primary_is_already_done(command: Command, state: State) -> None:
    outcome = evaluate(command, view(state, peer=secondary()))
    assert outcome.accepted and outcome.already
    assert outcome.reason == "already primary"


@pytest.mark.parametrize("data", [DataState.OUTDATED, DataState.UNKNOWN])
def test_prim_force_warns_that_writes_missing_here_are_lost(data: DataState) -> None:
    outcome = evaluate(Command.PRIM_FORCE, view(State.WAIT, data, peer=None))
    assert outcome.accepted
    assert outcome.intents == {Intent.FORCE_PRIMARY}
    assert outcome.done_states == SERVING
    assert outcome.reason == (
        f"forcing the primary role here; data here is {data}: anything node2 wrote that "
        "this node never received is lost"
    )


def test_prim_force_on_up_to_date_data_has_no_warning() -> None:
    outcome = evaluate(Command.PRIM_FORCE, view(State.WAIT, peer=None))
    assert outcome.accepted
    assert outcome.reason == "forcing the primary role here"


def test_prim_force_never_takes_the_role_from_a_serving_peer() -> None:
    for state in SERVING:
        outcome = evaluate(Command.PRIM_FORCE, view(State.WAIT, DataState.OUTDATED, primary(state)))
        assert not outcome.accepted
        assert outcome.reason == "node2 is primary; use `swap` to move the role"


def test_second_on_the_primary_hands_over_or_says_why_not() -> None:
    accepted = evaluate(Command.SECOND, view(State.ALONE, peer=secondary()))
    assert accepted.accepted
    assert accepted.intents == {Intent.HANDOVER}
    assert accepted.done_states == {State.SECOND}
    refused = evaluate(Command.SECOND, view(State.ALONE, peer=None))
    assert not refused.accepted
    assert refused.reason == "this node cannot become secondary: node2 is not reachable"


def test_second_starts_a_stopped_module() -> None:
    outcome = evaluate(Command.SECOND, view(State.STOP, running=False, peer=primary()))
    assert outcome.accepted
    assert outcome.intents == {Intent.RUN}
    assert outcome.done_states == {State.SECOND}


def test_stop_is_local_and_stop_all_waits_for_both() -> None:
    for state in State:
        stop = evaluate(Command.STOP, view(state, peer=secondary()))
        assert stop.accepted and stop.intents == {Intent.STOP}
        assert stop.done_states == {State.STOP} and stop.peer_done_states is None
        both = evaluate(Command.STOP_ALL, view(state, peer=secondary()))
        assert both.accepted and both.intents == {Intent.STOP, Intent.STOP_BOTH}
        assert both.done_states == {State.STOP} and both.peer_done_states == frozenset({State.STOP})
        force = evaluate(Command.FORCESTOP, view(state, peer=secondary()))
        assert force.accepted and force.intents == {Intent.STOP, Intent.KILL}


def test_start_clears_a_stop_and_is_already_done_when_running() -> None:
    start = evaluate(Command.START, view(State.STOP, running=False))
    assert start.accepted and start.intents == {Intent.RUN}
    assert State.STOP not in start.done_states
    again = evaluate(Command.START, view(State.WAIT))
    assert again.accepted and again.already
    assert again.reason == "already started"


@pytest.mark.parametrize("state", [State.WAIT, State.SECOND])
def test_restart_applies_only_where_the_module_is_primary(state: State) -> None:
    refused = evaluate(Command.RESTART, view(state, peer=primary()))
    assert not refused.accepted
    assert refused.reason == f"restart applies where the module is primary; here it is {state}"
    accepted = evaluate(Command.RESTART, view(State.PRIM, peer=secondary()))
    assert accepted.accepted and accepted.intents == {Intent.RESTART_APP}


def test_maintenance_is_always_accepted_and_done_at_once() -> None:
    for state in State:
        on = evaluate(Command.MAINTENANCE_ON, view(state, running=state is not State.STOP))
        off = evaluate(Command.MAINTENANCE_OFF, view(state, running=state is not State.STOP))
        assert on.accepted and on.intents == {Intent.MAINTENANCE_ON}
        assert off.accepted and off.intents == {Intent.MAINTENANCE_OFF}
        assert state in on.done_states and state in off.done_states


def test_second_without_a_primary_to_follow_is_refused_naming_the_peer() -> None:
    alone = evaluate(Command.SECOND, view(State.WAIT))
    assert not alone.accepted and "node2 unreachable" in alone.reason
    waiting = PeerModule(State.WAIT, DataState.UP_TO_DATE, True, holds_resources=False)
    both_waiting = evaluate(Command.SECOND, view(State.WAIT, peer=waiting))
    assert not both_waiting.accepted and "node2 is WAIT" in both_waiting.reason
    following = evaluate(Command.SECOND, view(State.WAIT, peer=primary()))
    assert following.accepted and following.done_states == {State.SECOND}


def test_start_lifts_a_hold_on_a_running_module() -> None:
    held = ModuleView(
        node="node1", peer_node="node2", vip=None, state=State.WAIT,
        data=DataState.UP_TO_DATE, preferred=True, auto_failback=False,
        hold="checker failed; held back from the primary role",
    )  # fmt: skip
    outcome = evaluate(Command.START, held)
    assert outcome.accepted and not outcome.already
    assert Intent.RUN in outcome.intents
    assert evaluate(Command.START, view(State.WAIT)).already
