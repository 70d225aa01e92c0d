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

Two more keep it so when decisions cross in flight. While both nodes hear each
other and neither serves, only the preferred node promotes on its own judgement;
the other promotes only once the preferred one hands it the role (`yielding`),
so two decisions taken at the same instant on each other's previous heartbeat
never both promote. And the witness lease follows the resources, not the
state: a node keeps renewing it until its VIP and application are down, so the
peer is never granted the role while this node still answers for the VIP.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    refusal: str | None = None  # the witness's reason when it refused for our data (outdated)


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
    holds_resources: bool = False  # this node's VIP or application is still up (or stopping)


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
        decision = _stopped(view)
    elif view.maintenance:
        decision = _maintenance(view)
    elif view.state.is_serving:
        decision = _serving(view)
    else:
        decision = _standby(view)
    return _lease_follows_resources(view, decision)


def _lease_follows_resources(view: ModuleView, decision: Decision) -> Decision:
    """Keep the witness lease while the VIP or application is still up here; then let it go.

    Releasing the lease the moment a node decides to step down would let the peer
    (if it does not hear this node) be granted the role while this node still
    stops its application and holds the VIP.
    """
    if not view.witness.configured or decision.serves:
        return decision
    if view.holds_resources:
        lease = LeaseAction.RENEW
    elif decision.lease is LeaseAction.ACQUIRE:
        return decision
    elif view.witness.lease_valid or decision.lease is LeaseAction.RELEASE:
        lease = LeaseAction.RELEASE
    else:
        lease = LeaseAction.NONE
    return decision if lease is decision.lease else replace(decision, lease=lease)


def _stopped(view: ModuleView) -> Decision:
    data = _data_when_not_receiving(view)
    lease = (
        LeaseAction.RELEASE
        if view.witness.configured and view.state.is_serving
        else (LeaseAction.NONE)
    )
    # A stopped node hands the role to its peer (who promotes once this node released).
    return Decision(State.STOP, data, view.stop_reason, lease=lease, yielding=True)


def _maintenance(view: ModuleView) -> Decision:
    if view.state.is_serving:
        # Maintenance suspends failover, never the witness's guarantee.
        guard = _lease_guard(view)
        if guard is not None:
            return guard
    lease = (
        LeaseAction.RENEW
        if view.witness.configured and view.state.is_serving
        else (LeaseAction.NONE)
    )
    state = State.WAIT if view.state is State.STOP else view.state
    # No automatic action, but the data bookkeeping goes on: a peer serving while
    # this node does not receive still leaves it behind.
    if state.is_serving:
        data = view.data
    elif state is State.SECOND and view.in_sync and view.peer is not None:
        data = DataState.UP_TO_DATE if view.peer.state.is_serving else view.data
    else:
        data = _data_when_not_receiving(view)
    return Decision(
        state,
        data,
        "maintenance mode: no failover, no checkers, no automatic action",
        lease=lease,
        yielding=not state.is_serving,
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


def _lease_guard(view: ModuleView) -> Decision | None:
    """A serving node without a valid lease steps down before the peer could be granted it."""
    if not view.witness.configured or view.witness.lease_valid:
        return None
    if view.peer is None:
        return _step_down(
            view,
            f"{view.peer_lost_reason} and no valid witness lease: stepping down before the "
            "lease could pass to the other node",
        )
    if view.peer_silence is not None and view.peer_silence > view.peer_timeout / 2:
        # Without a lease nothing stops the peer from being granted the role once it
        # stops hearing us; step down well before its peer_timeout can run out.
        return _step_down(
            view,
            f"witness lease lost and {view.peer_node} silent for {view.peer_silence:.1f} s: "
            "stepping down",
        )
    return None


def _serving(view: ModuleView) -> Decision:
    renew = LeaseAction.RENEW if view.witness.configured else LeaseAction.NONE
    if view.gave_up is not None:
        return _step_down(view, view.gave_up)
    guard = _lease_guard(view)
    if guard is not None:
        return guard
    peer = view.peer
    if peer is None:
        lease = "; witness lease held:" if view.witness.configured else ";"
        return Decision(
            State.ALONE,
            DataState.UP_TO_DATE,
            f"{view.peer_lost_reason}{lease} running alone",
            lease=renew,
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
    # Where this node cannot serve it hands the role to its peer (`yielding`): the
    # peer, if it is not the preferred node, promotes only on that word.
    if view.peer_incompatible is not None:
        return Decision(State.WAIT, _data_when_not_receiving(view), view.peer_incompatible)
    if not view.checkers_ok:
        return Decision(
            State.WAIT,
            _data_when_not_receiving(view),
            f"{view.checker_problem}: may not serve",
            yielding=True,
        )
    if view.gave_up is not None:
        return Decision(State.WAIT, _data_when_not_receiving(view), view.gave_up, yielding=True)
    peer = view.peer
    if peer is not None and peer.state.is_serving:
        return _secondary(view, peer)
    if view.hold is not None:
        return Decision(State.WAIT, _data_when_not_receiving(view), view.hold, yielding=True)
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
    """Both nodes are up and neither serves: the preferred node decides who promotes.

    Each node decides on the other's previous heartbeat, so both may decide at the
    same instant on stale news. Only the preferred node promotes on its own
    judgement; the other promotes only once the preferred node hands it the role
    (`yielding`). A node that was itself handing the role over promotes only one
    heartbeat after it stopped saying so, when its peer can no longer act on it.
    """
    standby = State.SECOND if view.state is State.SECOND else State.WAIT
    if peer.holds_resources:
        # A secondary stays SECOND while the primary releases (swap, stop): not a fault.
        return Decision(
            standby,
            view.data,
            f"waiting for {view.peer_node} to release the VIP and application",
            yielding=view.yielding,
        )
    first_start = view.data is DataState.UNKNOWN and peer.data is DataState.UNKNOWN
    mine_ok = view.data is DataState.UP_TO_DATE or view.force_primary or first_start
    if view.want_primary and not mine_ok:
        return Decision(
            State.WAIT,
            view.data,
            f"`prim` dropped: data here is {view.data} now; `prim --force` overrides",
            consumed=frozenset({"want_primary"}),
        )
    claim = view.force_primary or view.want_primary
    wants = claim and mine_ok
    peer_claims = peer.wants_primary and peer.eligible and not peer.maintenance
    peer_ok = peer.eligible and (peer.data is DataState.UP_TO_DATE or first_start or peer_claims)
    if view.yielding and peer_ok and not claim and not peer.yielding:
        return Decision(
            standby, view.data, f"handing the primary role to {view.peer_node}", yielding=True
        )
    takes = mine_ok and (peer.yielding or (view.preferred and not (peer_claims and not claim)))
    if takes and view.yielding:
        return Decision(
            standby,
            view.data,
            f"no longer handing the primary role to {view.peer_node}: taking it at the next "
            "heartbeat, once it has heard",
            wants_primary=wants,
        )
    if takes:
        if peer.yielding:
            why = f"{view.peer_node} handed over the primary role"
            why = f"first start: {why}" if first_start else why
        elif first_start:
            why = f"first start: {view.node} is the default primary"
        elif view.force_primary and view.data is not DataState.UP_TO_DATE:
            why = "forced by the administrator (`prim --force`)"
        elif peer_ok:
            why = f"{view.node} is the preferred node"
        else:
            why = f"{view.peer_node} cannot serve ({peer.state}, data {peer.data})"
        return _claiming(_promote(view, why), wants)
    if not view.preferred:
        return Decision(
            State.WAIT,
            view.data,
            _waiting_reason(view, peer, mine_ok, peer_ok),
            wants_primary=wants,
        )
    if peer_claims:
        reason = f"{view.peer_node} asks for the primary role: handing it over"
    elif peer_ok:
        reason = f"waiting for {view.peer_node} to take the primary role"
    else:
        reason = _no_good_data_reason(view, peer)
    return Decision(standby, view.data, reason, yielding=True)


def _claiming(decision: Decision, wants: bool) -> Decision:
    """While a claimed promotion waits (witness, probe), keep telling the peer about it."""
    if decision.serves or not wants:
        return decision
    return replace(decision, wants_primary=True)


def _waiting_reason(view: ModuleView, peer: PeerModule, mine_ok: bool, peer_ok: bool) -> str:
    """Why the node that is not preferred waits for the preferred one."""
    if not mine_ok:
        if peer_ok:
            return f"waiting for {view.peer_node} to take the primary role"
        return _no_good_data_reason(view, peer)
    if view.force_primary or view.want_primary:
        return f"asking {view.peer_node} to hand over the primary role"
    if not peer_ok:
        return (
            f"waiting for {view.peer_node} to hand over the primary role "
            f"({view.peer_node} cannot serve: {peer.state}, data {peer.data})"
        )
    return f"waiting for {view.peer_node}, the preferred node, to take the primary role"


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
    # A secondary handed the role by a peer it hears stays SECOND while it asks.
    waiting = State.SECOND if view.state is State.SECOND and connected else State.WAIT
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
                waiting,
                view.data,
                f"{why}; witness unreachable: not taking over, since {view.peer_node} may "
                "still serve",
                lease=LeaseAction.ACQUIRE,
            )
        if view.witness.holder is not None and view.witness.holder != view.node:
            return Decision(
                waiting,
                view.data,
                f"{why}; witness: lease held by {view.witness.holder}",
                lease=LeaseAction.ACQUIRE,
            )
        if view.witness.refusal is not None:
            # The witness knows the peer served data this node never got: it is outdated.
            return Decision(
                State.WAIT,
                DataState.OUTDATED,
                f"{why}; witness: {view.witness.refusal}",
                lease=LeaseAction.ACQUIRE,
            )
        return Decision(waiting, view.data, f"{why}; asking the witness", lease=LeaseAction.ACQUIRE)
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
