"""Operator commands: whether each is accepted in the current situation, and what it does.

Every command in every state has a defined outcome: accepted with the intents
it sets and the states that mean it is done, or refused with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from agent.core.machine import ModuleView
from agent.core.states import DataState, State


class Command(StrEnum):
    START = "start"
    STOP = "stop"
    STOP_ALL = "stop-all"
    FORCESTOP = "forcestop"
    RESTART = "restart"
    SWAP = "swap"
    PRIM = "prim"
    PRIM_FORCE = "prim-force"
    SECOND = "second"
    MAINTENANCE_ON = "maintenance-on"
    MAINTENANCE_OFF = "maintenance-off"


class Intent(StrEnum):
    """What an accepted command changes in the module's runtime."""

    RUN = "run"  # clears an administrator's stop
    STOP = "stop"
    STOP_BOTH = "stop_both"  # also tells the peer
    KILL = "kill"  # stop without the stop script
    RESTART_APP = "restart_app"
    HANDOVER = "handover"
    WANT_PRIMARY = "want_primary"
    FORCE_PRIMARY = "force_primary"
    MAINTENANCE_ON = "maintenance_on"
    MAINTENANCE_OFF = "maintenance_off"


SERVING = frozenset({State.PRIM, State.ALONE})


@dataclass(frozen=True)
class Outcome:
    """The verdict on one command."""

    accepted: bool
    reason: str
    intents: frozenset[Intent] = frozenset()
    done_states: frozenset[State] = frozenset()  # local states meaning "done"
    peer_done_states: frozenset[State] | None = None  # also required of the peer, if heard
    already: bool = False  # nothing to do: the module is already as asked


def _refuse(reason: str) -> Outcome:
    return Outcome(False, reason)


def _accept(
    reason: str,
    intents: set[Intent],
    done: frozenset[State],
    peer_done: frozenset[State] | None = None,
) -> Outcome:
    return Outcome(True, reason, frozenset(intents), done, peer_done)


def _peer_can_take_over(view: ModuleView) -> str | None:
    """None if the peer is an up-to-date secondary able to take the role; else why not."""
    peer = view.peer
    if peer is None:
        return f"{view.peer_node} is not reachable"
    if peer.state is not State.SECOND:
        return f"{view.peer_node} is {peer.state}, not an up-to-date secondary"
    if peer.data is not DataState.UP_TO_DATE:
        return f"{view.peer_node} is still catching up ({peer.data})"
    if not peer.eligible or peer.maintenance:
        return f"{view.peer_node} cannot serve now (checker failing, maintenance or on hold)"
    return None


def evaluate(command: Command, view: ModuleView) -> Outcome:
    """Accept or refuse `command` given the module's situation on this node."""
    state = view.state
    peer = view.peer
    if command is Command.START:
        if view.running and view.hold is None and view.gave_up is None:
            return Outcome(True, "already started", already=True)
        # On a running module, `start` is how an operator lifts a hold after fixing its cause.
        return _accept("starting", {Intent.RUN}, frozenset(State) - {State.STOP})
    if command is Command.STOP:
        return _accept("stopping here", {Intent.STOP}, frozenset({State.STOP}))
    if command is Command.STOP_ALL:
        return _accept(
            "stopping on both nodes",
            {Intent.STOP, Intent.STOP_BOTH},
            frozenset({State.STOP}),
            frozenset({State.STOP}),
        )
    if command is Command.FORCESTOP:
        return _accept(
            "stopping at once (no stop script)", {Intent.STOP, Intent.KILL}, frozenset({State.STOP})
        )
    if command is Command.MAINTENANCE_ON:
        return _accept("maintenance on", {Intent.MAINTENANCE_ON}, frozenset(State))
    if command is Command.MAINTENANCE_OFF:
        return _accept("maintenance off", {Intent.MAINTENANCE_OFF}, frozenset(State))
    if command is Command.RESTART:
        if state not in SERVING:
            return _refuse(f"restart applies where the module is primary; here it is {state}")
        return _accept("restarting the application here", {Intent.RESTART_APP}, SERVING)
    if not view.running:
        if command is Command.SECOND:
            return _accept("starting as secondary", {Intent.RUN}, frozenset({State.SECOND}))
        return _refuse("the module is stopped here; start it first (`tandemctl start MODULE`)")
    if view.maintenance:
        return _refuse("the module is in maintenance mode; `maintenance off` first")
    if command is Command.SWAP:
        if state in SERVING:
            why_not = _peer_can_take_over(view)
            if why_not:
                return _refuse(f"swap needs an up-to-date secondary: {why_not}")
            return _accept(
                f"handing the primary role to {view.peer_node}",
                {Intent.HANDOVER},
                frozenset({State.SECOND}),
                SERVING,
            )
        if state is State.SECOND and peer is not None and peer.state in SERVING:
            if view.data is not DataState.UP_TO_DATE:
                return _refuse("swap needs this secondary up to date; it is still catching up")
            return _accept(
                f"taking the primary role from {view.peer_node}",
                {Intent.WANT_PRIMARY},
                SERVING,
                frozenset({State.SECOND}),
            )
        return _refuse(
            f"swap needs a primary and an up-to-date secondary; here {state}, "
            f"{view.peer_node} {peer.state if peer else 'unreachable'}"
        )
    if command is Command.PRIM:
        if state in SERVING:
            return Outcome(True, "already primary", already=True)
        if peer is not None and peer.state in SERVING:
            if state is not State.SECOND or view.data is not DataState.UP_TO_DATE:
                return _refuse(
                    f"{view.peer_node} is primary and this node is not an up-to-date secondary"
                )
            return _accept(
                f"taking the primary role from {view.peer_node}", {Intent.WANT_PRIMARY}, SERVING
            )
        if view.data is not DataState.UP_TO_DATE:
            return _refuse(
                f"data here is {view.data}: becoming primary could lose what "
                f"{view.peer_node} wrote; `prim --force` overrides"
            )
        return _accept("becoming primary", {Intent.WANT_PRIMARY}, SERVING)
    if command is Command.PRIM_FORCE:
        if state in SERVING:
            return Outcome(True, "already primary", already=True)
        if peer is not None and peer.state in SERVING:
            return _refuse(f"{view.peer_node} is primary; use `swap` to move the role")
        warning = ""
        if view.data is not DataState.UP_TO_DATE:
            warning = (
                f"; data here is {view.data}: anything {view.peer_node} wrote that this "
                "node never received is lost"
            )
        return _accept(f"forcing the primary role here{warning}", {Intent.FORCE_PRIMARY}, SERVING)
    # Command.SECOND
    if state in SERVING:
        why_not = _peer_can_take_over(view)
        if why_not:
            return _refuse(f"this node cannot become secondary: {why_not}")
        return _accept(
            f"handing the primary role to {view.peer_node}",
            {Intent.HANDOVER},
            frozenset({State.SECOND}),
        )
    if state is State.SECOND:
        return Outcome(True, "already secondary", already=True)
    if peer is None or peer.state not in SERVING:
        theirs = f"{view.peer_node} is {peer.state}" if peer else f"{view.peer_node} unreachable"
        return _refuse(f"a secondary needs a primary to follow; {theirs}")
    return _accept("becoming secondary", {Intent.RUN}, frozenset({State.SECOND}))
