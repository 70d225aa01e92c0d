"""The module state machine: one pure decision per module and tick.

The daemon builds a frozen :class:`ModuleView` of everything a decision may look
at (its own state, the peer's last heartbeat, the witness, checkers, pending
operator intents) and :func:`decide` returns the state to be in, the data state,
a reason in words and the requests the daemon must carry out (witness lease,
VIP probe). The daemon then reconciles the world with the state: the
application runs and the VIP is held exactly where the state is ALONE or PRIM.

Decisions are level-triggered, as Patroni's cycle is: the same view always
gives the same decision, so a lost heartbeat or a restarted agent never leaves
a half-done transition behind. Two rules keep the VIP on one node at a time:
a node promotes only when its peer reports holding nothing (the peer removes
its VIP and stops its application before it says so), and a node that cannot
see its peer promotes only with the witness's lease or, without a witness,
after probing that the VIP does not answer on the LAN.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from agent.core.states import DataState, State


class LeaseAction(StrEnum):
    """What the daemon must ask the witness for this module on this tick."""

    NONE = "none"
    ACQUIRE = "acquire"
    RENEW = "renew"
    RELEASE = "release"


@dataclass(frozen=True)
class PeerModule:
    """The module as the peer's last heartbeat described it."""

    state: State
    data: DataState
    eligible: bool  # runs, not in maintenance, its checkers pass (data not included)
    holds_resources: bool  # its VIP or application is still up (also while stopping)
    yielding: bool = False  # handing the primary role to this node (swap, `second`)
    wants_primary: bool = False  # asks to become primary (`prim`, swap, failback)
    maintenance: bool = False


@dataclass(frozen=True)
class WitnessView:
    """What this node knows of its lease for the module."""

    configured: bool = False
    reachable: bool = False
    lease_valid: bool = False  # granted and still valid with a safety margin
    holder: str | None = None  # who holds it, when our last request was denied


@dataclass(frozen=True)
class ModuleView:
    """A frozen snapshot of everything one decision looks at."""

    node: str
    peer_node: str
    vip: str | None
    state: State
    data: DataState
    preferred: bool  # default_primary, else the first node listed
    auto_failback: bool  # default_primary is configured and names this node
    running: bool = True  # False once an administrator stopped the module here
    stop_reason: str = "stopped by the administrator"
    maintenance: bool = False
    force_primary: bool = False  # `prim --force` pending
    handover: bool = False  # swap or `second` pending on the primary
    want_primary: bool = False  # `prim` or swap pending on the secondary
    yielding: bool = False  # this node is handing the role over (advertised)
    peer: PeerModule | None = None  # None while the peer is not heard
    peer_lost_reason: str = "peer not heard"
    peer_silence: float | None = None  # seconds since the peer's last heartbeat
    peer_incompatible: str | None = None  # peers that must not work together
    peer_timeout: float = 1.5
    in_sync: bool = True  # replication: this SECOND's copy equals the primary's
    witness: WitnessView = WitnessView()
    vip_in_use: bool | None = None  # result of the last probe; None: not probed
    checkers_ok: bool = True  # checkers that must pass here to be primary or secondary
    checker_problem: str = ""
    gave_up: str | None = None  # primary: restarts exhausted, the role is given up
    hold: str | None = None  # a reason this node must not promote for now
    vip_checked: bool = True  # the start-up probe found no other host answering for the VIP


@dataclass(frozen=True)
class Decision:
    """What one tick decided for one module, with the reason in words."""

    state: State
    data: DataState
    reason: str
    lease: LeaseAction = LeaseAction.NONE
    probe_vip: bool = False
    yielding: bool = False
    wants_primary: bool = False
    consumed: frozenset[str] = frozenset()  # one-shot intents now done with

    @property
    def serves(self) -> bool:
        """True where the application must run and the VIP must be held."""
        return self.state.is_serving


def is_eligible(view: ModuleView) -> bool:
    """Whether this node could take the primary role, data aside (advertised to the peer)."""
    return (
        view.running
        and not view.maintenance
        and view.checkers_ok
        and view.gave_up is None
        and view.hold is None
        and view.peer_incompatible is None
    )


def decide(view: ModuleView) -> Decision:
    """The one decision of this tick for this module."""
    if not view.running:
        return _stopped(view)
    if view.maintenance:
        return _maintenance(view)
    if view.state.is_serving:
        return _serving(view)
    return _standby(view)


def _stopped(view: ModuleView) -> Decision:
    data = _data_when_not_receiving(view)
    lease = (
        LeaseAction.RELEASE
        if view.witness.configured and view.state.is_serving
        else (LeaseAction.NONE)
    )
    return Decision(State.STOP, data, view.stop_reason, lease=lease)


def _maintenance(view: ModuleView) -> Decision:
    if (
        view.state.is_serving
        and view.peer is None
        and view.witness.configured
        and not view.witness.lease_valid
    ):
        # Maintenance suspends failover, never the witness's guarantee.
        return _serving(view)
    lease = (
        LeaseAction.RENEW
        if view.witness.configured and view.state.is_serving
        else (LeaseAction.NONE)
    )
    state = State.WAIT if view.state is State.STOP else view.state
    return Decision(
        state,
        view.data,
        "maintenance mode: no failover, no checkers, no automatic action",
        lease=lease,
    )


def _data_when_not_receiving(view: ModuleView) -> DataState:
    """OUTDATED once the peer is seen serving while this node does not receive."""
    peer = view.peer
    if peer is not None and peer.state.is_serving:
        return DataState.OUTDATED
    return view.data


def _step_down(view: ModuleView, reason: str, data: DataState = DataState.UP_TO_DATE) -> Decision:
    lease = LeaseAction.RELEASE if view.witness.configured else LeaseAction.NONE
    return Decision(State.WAIT, data, reason, lease=lease, consumed=frozenset({"handover"}))


def _serving(view: ModuleView) -> Decision:
    renew = LeaseAction.RENEW if view.witness.configured else LeaseAction.NONE
    if view.gave_up is not None:
        return _step_down(view, view.gave_up)
    peer = view.peer
    if peer is None:
        if not view.witness.configured:
            return Decision(
                State.ALONE,
                DataState.UP_TO_DATE,
                f"{view.peer_lost_reason}; running alone",
                lease=renew,
            )
        if view.witness.lease_valid:
            return Decision(
                State.ALONE,
                DataState.UP_TO_DATE,
                f"{view.peer_lost_reason}; witness lease held: running alone",
                lease=renew,
            )
        return _step_down(
            view,
            f"{view.peer_lost_reason} and no valid witness lease: stepping down before the "
            "lease could pass to the other node",
        )
    if (
        view.witness.configured
        and not view.witness.lease_valid
        and view.peer_silence is not None
        and view.peer_silence > view.peer_timeout / 2
    ):
        # Without a lease nothing stops the peer from being granted the role once it
        # stops hearing us; step down well before its peer_timeout can run out.
        return _step_down(
            view,
            f"witness lease lost and {view.peer_node} silent for {view.peer_silence:.1f} s: "
            "stepping down",
        )
    if peer.state.is_serving:
        return _double_primary(view, peer)
    hand_over = view.handover or (peer.wants_primary and not view.yielding)
    if hand_over and _can_take_over(peer):
        why = "swap requested" if view.handover else f"{view.peer_node} asked for the primary role"
        return Decision(
            State.SECOND,
            DataState.UP_TO_DATE,
            f"{why}: handing the primary role to {view.peer_node}",
            lease=LeaseAction.RELEASE if view.witness.configured else LeaseAction.NONE,
            yielding=True,
            consumed=frozenset({"handover"}),
        )
    consumed = frozenset({"handover"}) if view.handover else frozenset()
    if peer.state is State.SECOND:
        reason = f"{view.peer_node} is an up-to-date secondary"
        if peer.data is not DataState.UP_TO_DATE:
            reason = f"{view.peer_node} is secondary and catching up"
        return Decision(
            State.PRIM,
            DataState.UP_TO_DATE,
            reason,
            lease=renew,
            consumed=consumed | {"force_primary", "want_primary"},
        )
    return Decision(
        State.ALONE,
        DataState.UP_TO_DATE,
        f"{view.peer_node} is {peer.state}: running without a secondary",
        lease=renew,
        consumed=consumed | {"force_primary", "want_primary"},
    )


def _can_take_over(peer: PeerModule) -> bool:
    return (
        peer.state is State.SECOND
        and peer.data is DataState.UP_TO_DATE
        and peer.eligible
        and not peer.maintenance
    )


def _double_primary(view: ModuleView, peer: PeerModule) -> Decision:
    """Both nodes serve (they were cut apart): exactly one keeps the role."""
    if view.witness.configured:
        keep = view.witness.lease_valid
        rule = "the witness lease holder keeps it"
    else:
        keep = view.preferred
        rule = "the preferred node keeps it"
    if keep:
        renew = LeaseAction.RENEW if view.witness.configured else LeaseAction.NONE
        return Decision(
            State.ALONE,
            DataState.UP_TO_DATE,
            f"{view.peer_node} also serves the module (split brain); {rule}: keeping the role",
            lease=renew,
        )
    return _step_down(
        view,
        f"{view.peer_node} also serves the module (split brain); {rule}: giving up the role",
        data=DataState.OUTDATED,
    )


def _standby(view: ModuleView) -> Decision:
    if view.peer_incompatible is not None:
        return Decision(State.WAIT, view.data, view.peer_incompatible)
    if not view.checkers_ok:
        return Decision(
            State.WAIT, _data_when_not_receiving(view), f"{view.checker_problem}: may not serve"
        )
    if view.gave_up is not None:
        return Decision(State.WAIT, view.data, view.gave_up)
    peer = view.peer
    if peer is not None and peer.state.is_serving:
        return _secondary(view, peer)
    if view.hold is not None:
        return Decision(State.WAIT, _data_when_not_receiving(view), view.hold)
    if peer is not None:
        return _standby_with_peer(view, peer)
    return _standby_alone(view)


def _secondary(view: ModuleView, peer: PeerModule) -> Decision:
    data = DataState.UP_TO_DATE if view.in_sync else _data_when_not_receiving(view)
    wants = view.want_primary or (
        view.auto_failback and data is DataState.UP_TO_DATE and view.hold is None
    )
    primary = f"{view.peer_node} is primary ({peer.state})"
    if view.in_sync:
        reason = f"{primary}; this node is an up-to-date secondary"
        if wants:
            reason += (
                "; asking for the primary role back"
                if view.auto_failback and not (view.want_primary)
                else "; asking for the primary role"
            )
    else:
        reason = f"{primary}; this node is catching up"
    return Decision(State.SECOND, data, reason, wants_primary=wants)


def _standby_with_peer(view: ModuleView, peer: PeerModule) -> Decision:
    """Both nodes are up and neither serves: at most one of them promotes."""
    if peer.holds_resources:
        # A secondary stays SECOND while the primary releases (swap, stop): not a fault.
        return Decision(
            State.SECOND if view.state is State.SECOND else State.WAIT,
            view.data,
            f"waiting for {view.peer_node} to release the VIP and application",
            yielding=view.yielding,
        )
    first_start = view.data is DataState.UNKNOWN and peer.data is DataState.UNKNOWN
    mine_ok = view.data is DataState.UP_TO_DATE or view.force_primary or first_start
    peer_ok = (
        peer.eligible and not peer.yielding and (peer.data is DataState.UP_TO_DATE or first_start)
    )
    if peer.yielding and mine_ok:
        return _promote(view, f"{view.peer_node} handed over the primary role")
    if view.yielding and peer_ok:
        return Decision(
            State.SECOND, view.data, f"handing the primary role to {view.peer_node}", yielding=True
        )
    if not mine_ok:
        if peer_ok:
            return Decision(
                State.WAIT, view.data, f"waiting for {view.peer_node} to take the primary role"
            )
        return Decision(State.WAIT, view.data, _no_good_data_reason(view, peer))
    if peer_ok and not view.preferred and not view.force_primary:
        if view.data is DataState.UP_TO_DATE and peer.data is not DataState.UP_TO_DATE:
            return _promote(
                view, f"this node has the up-to-date data ({view.peer_node}: {peer.data})"
            )
        return Decision(
            State.WAIT,
            view.data,
            f"waiting for {view.peer_node}, the preferred node, to take the primary role",
        )
    if first_start:
        return _promote(
            view,
            f"first start: {view.node} is the default primary"
            if view.preferred
            else f"first start: {view.peer_node} cannot serve",
        )
    if view.force_primary and view.data is not DataState.UP_TO_DATE:
        return _promote(view, "forced by the administrator (`prim --force`)")
    if peer_ok:
        return _promote(view, f"{view.node} is the preferred node")
    return _promote(view, f"{view.peer_node} cannot serve ({peer.state}, data {peer.data})")


def _no_good_data_reason(view: ModuleView, peer: PeerModule) -> str:
    if not peer.eligible:
        return (
            f"data {view.data} here and {view.peer_node} cannot serve ({peer.state}); "
            "`prim --force` overrides (writes missing here would be lost)"
        )
    return (
        f"neither node has data known to be up to date ({view.node}: {view.data}, "
        f"{view.peer_node}: {peer.data}); `prim --force` on the node to keep"
    )


def _standby_alone(view: ModuleView) -> Decision:
    lost = view.peer_lost_reason
    if view.force_primary:
        return _promote(view, f"{lost}; forced by the administrator (`prim --force`)")
    if view.data is DataState.UNKNOWN:
        return Decision(
            State.WAIT, view.data, f"first start: waiting for {view.peer_node} or `prim --force`"
        )
    if view.data is DataState.OUTDATED:
        return Decision(
            State.WAIT,
            view.data,
            f"data outdated: {view.peer_node} ran as primary without this node; waiting for "
            f"{view.peer_node} or `prim --force` (what {view.peer_node} wrote alone would be "
            "lost)",
        )
    return _promote(view, lost)


def _promote(view: ModuleView, why: str) -> Decision:
    """Become primary if the witness (or, without one, the LAN) allows it."""
    connected = view.peer is not None
    serving_state = (
        State.PRIM if view.peer is not None and view.peer.state is State.SECOND else State.ALONE
    )
    done = frozenset({"force_primary", "want_primary"})
    if not view.vip_checked:
        return Decision(
            view.state if view.state is State.SECOND else State.WAIT,
            view.data,
            f"{why}; first checking that VIP {view.vip} is not used by another host",
        )
    if view.witness.configured:
        if view.witness.lease_valid:
            return Decision(
                serving_state,
                DataState.UP_TO_DATE,
                f"{why}; witness granted primary",
                lease=LeaseAction.RENEW,
                consumed=done,
            )
        if not view.witness.reachable:
            return Decision(
                State.WAIT,
                view.data,
                f"{why}; witness unreachable: not taking over, since {view.peer_node} may "
                "still serve",
                lease=LeaseAction.ACQUIRE,
            )
        if view.witness.holder is not None and view.witness.holder != view.node:
            return Decision(
                State.WAIT,
                view.data,
                f"{why}; witness: lease held by {view.witness.holder}",
                lease=LeaseAction.ACQUIRE,
            )
        return Decision(
            State.WAIT, view.data, f"{why}; asking the witness", lease=LeaseAction.ACQUIRE
        )
    if connected or view.vip is None:
        return Decision(serving_state, DataState.UP_TO_DATE, why, consumed=done)
    if view.vip_in_use is None:
        return Decision(
            State.WAIT,
            view.data,
            f"{why}; checking that VIP {view.vip} does not answer on the LAN",
            probe_vip=True,
        )
    if view.vip_in_use:
        return Decision(
            State.WAIT,
            view.data,
            f"{why}, but VIP {view.vip} still answers on the LAN (heartbeat-only cut?): not "
            "taking over without a witness",
            probe_vip=True,
        )
    return Decision(
        serving_state,
        DataState.UP_TO_DATE,
        f"{why}; VIP {view.vip} is free: taking over",
        consumed=done,
    )
