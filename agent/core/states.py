"""Module states, data states and their colours (the ⚑ contract of shared/DESIGN.md)."""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """The state of one module on one node; SafeKit's names."""

    STOP = "STOP"
    WAIT = "WAIT"
    ALONE = "ALONE"
    PRIM = "PRIM"
    SECOND = "SECOND"

    @property
    def is_serving(self) -> bool:
        """True where the application runs and the VIP is held."""
        return self in (State.ALONE, State.PRIM)


class DataState(StrEnum):
    """What a node knows of its copy of the module's data (persisted)."""

    UP_TO_DATE = "UP_TO_DATE"
    OUTDATED = "OUTDATED"
    UNKNOWN = "UNKNOWN"


COLOURS: dict[State, str] = {
    State.STOP: "grey",
    State.WAIT: "red",
    State.ALONE: "orange",
    State.PRIM: "green",
    State.SECOND: "green",
}


def colour(state: State, resyncing: bool = False) -> str:
    """The colour shown for a state; PRIM and SECOND turn orange while a resync runs."""
    if resyncing and state in (State.PRIM, State.SECOND):
        return "orange"
    return COLOURS[state]
