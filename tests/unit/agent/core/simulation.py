"""A simulated pair of nodes and a witness driving the module state machine as the daemon does.

Time moves in ticks of one heartbeat interval. On its tick a live node does what
`agent/daemon.py` and `agent/module.py` do: it builds a frozen `ModuleView`,
calls `decide`, records the decision, reconciles the world, asks the witness,
runs a VIP probe, and sends one heartbeat. The world is modelled honestly:

- bringing the module up adds the VIP at once and has the application up
  `acquire_ticks` later; bringing it down stops the application in
  `release_ticks`, and removes the VIP first (`vip_first`, the daemon's order,
  which a lost lease needs) or only once the application is down; the node
  reports `holds_resources` until both are down;
- heartbeats sent by the node that ticks first are seen by the other on the same
  tick (their clocks are out of phase; `tick(first=...)` says which node leads),
  and `tick(first=None)` runs both at the same instant, each on the other's
  previous heartbeat;
- the witness decides a request the moment it is sent; the reply is read on the
  node's next cycle, and a newly granted lease wakes the node for an extra cycle
  at once (the daemon's `wake`); a request or reply crossing a cut link is lost;
  with nothing to ask, a node pings the witness every second;
- a probe sees whether the other node holds the VIP at the moment it runs, and
  is trusted for one second (`PROBE_VALID_FOR`); the start-up VIP check is done
  once the peer was heard or `peer_timeout` has passed (`vip_checked`);
- the application writes once per tick while it is up on a serving node: on
  PRIM it is mirrored to the in-sync secondary, journalled for the resync of a
  secondary still catching up, and blocked (sync mode) while no secondary is
  attached, until the primary goes ALONE; on ALONE it is journalled locally.
  A secondary catches up `resync_ticks` after it starts receiving, and its own
  divergent writes then go to quarantine, as do a split brain loser's.

Nothing here is a mock of our code: decisions, command verdicts, the failure
detector, the witness rule and the restart policy are the real ones. A broken
safety rule raises `InvariantError` with the last events:

- with a witness, never two nodes holding the VIP at the same instant; without
  one, never once heartbeats have flowed long enough to settle a split brain;
- a node promotes only on data known up to date (both UNKNOWN at a first start
  counts) unless `prim --force` is pending, and never without writes it saw its
  peer make; writes made alone by a peer it never heard from again cannot be
  known and are only counted (`unknowable_losses`);
- every decision has a reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.core.arbiter import Arbiter
from agent.core.commands import Command, Intent, Outcome, evaluate
from agent.core.detector import FailureDetector
from agent.core.frames import Action, LeaseItem
from agent.core.machine import (
    Decision,
    LeaseAction,
    ModuleView,
    PeerModule,
    WitnessView,
    decide,
    is_eligible,
)
from agent.core.restarts import RestartPolicy, RestartVerdict
from agent.core.states import DataState, State

TICK = 0.25
PEER_TIMEOUT = 1.5
PROBE_VALID_FOR = 1.0
WITNESS_PING = 1.0
COMMAND_TIMEOUT = 10.0
CLUSTER = "shop"
MODULE = "web"
VIP = "198.18.0.100/24"
NODES = ("node1", "node2")
ACTIONS: dict[LeaseAction, Action] = {
    LeaseAction.ACQUIRE: "acquire",
    LeaseAction.RENEW: "renew",
    LeaseAction.RELEASE: "release",
}


class InvariantError(AssertionError):
    """A safety invariant of the module state machine was broken in the simulation."""


@dataclass(frozen=True)
class SimConfig:
    """What differs between simulated clusters."""

    witness: bool = True
    default_primary: str | None = None  # the node with automatic failback; preferred if set
    acquire_ticks: int = 1
    release_ticks: int = 1
    vip_first: bool = True
    resync_ticks: int = 2
    restart_attempts: int = 2
    restart_within: float = 5.0
    vip: str | None = VIP

    @property
    def preferred(self) -> str:
        return self.default_primary or NODES[0]


@dataclass(frozen=True)
class Heartbeat:
    sent_at: float
    module: PeerModule
    stop_all_at: float
    writes: frozenset[int]  # what the sender had written, when it says it serves


@dataclass(frozen=True)
class LeaseReply:
    sent_at: float
    action: LeaseAction
    granted: bool
    holder: str | None
    generation: int = 0
    reason: str = ""


@dataclass
class SimNode:
    """One node: what its agent remembers, what it holds in the world, and its true data."""

    name: str
    peer_name: str
    started_at: float = 0.0
    alive: bool = True
    # persisted by the agent
    state: State = State.WAIT
    data: DataState = DataState.UNKNOWN
    running: bool = True
    maintenance: bool = False
    intent_at: float = -1.0
    stop_all_at: float = -1.0
    # in the agent's memory only
    reason: str = "agent starting"
    stop_reason: str = "stopped by the administrator"
    pending: dict[str, float] = field(default_factory=dict)
    yielding: bool = False
    wants_primary: bool = False
    detector: FailureDetector = field(default_factory=lambda: FailureDetector(1, PEER_TIMEOUT))
    last_peer: PeerModule | None = None
    last_peer_writes: frozenset[int] = frozenset()
    inbox: list[Heartbeat] = field(default_factory=list)
    replies: list[LeaseReply] = field(default_factory=list)
    lease_valid_until: float = 0.0
    lease_holder: str | None = None
    witness_reachable: bool = False
    witness_asked: float = -math.inf
    vip_checked: bool = False
    vip_in_use: bool | None = None
    probe_at: float = -math.inf
    gave_up: str | None = None
    hold: str | None = None
    hold_until: float = 0.0
    restarts: RestartPolicy = field(default_factory=lambda: RestartPolicy(2, 5.0))
    kill_on_stop: bool = False
    in_sync: bool = False
    resync_progress: int = 0
    # data generations, as the daemon keeps them: a node that writes without its peer first
    # opens a new generation, and holds those writes until the witness has recorded it
    generation: int = 1
    shared: bool = True  # the generation is the one the peer had when they last synced
    witness_generation: int = 0
    lease_refusal: str | None = None
    # the world
    vip: bool = False
    app: str = "down"  # down | starting | up | stopping
    app_left: int = 0
    checker_failing: bool = False
    writes: set[int] = field(default_factory=set)
    knowable: set[int] = field(default_factory=set)  # peer writes this node could know of
    decisions: list[Decision] = field(default_factory=list)

    @property
    def holds_resources(self) -> bool:
        return self.vip or self.app != "down"


class Sim:
    """Two simulated nodes and a witness; `tick()` advances time by one heartbeat interval."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.now = 0.0
        self.nodes = {name: self._fresh_node(name, other) for name, other in (NODES, NODES[::-1])}
        self.arbiter = Arbiter()
        self.witness_up = True
        self.witness_link = dict.fromkeys(NODES, True)
        self.link_up = True
        self.flowing_ticks = 0
        self.simultaneous = False
        self.next_write = 0
        self.next_generation = 1
        self.must_keep: set[int] = set()
        self.unknowable_losses: list[tuple[float, str, int]] = []
        self.trace: list[str] = []

    def _fresh_node(self, name: str, peer_name: str) -> SimNode:
        policy = RestartPolicy(self.config.restart_attempts, self.config.restart_within)
        return SimNode(name, peer_name, started_at=self.now, restarts=policy)

    # -- what a node sees ------------------------------------------------------------------

    def view(self, name: str) -> ModuleView:
        """The frozen view the daemon would build for `name` now."""
        n = self.nodes[name]
        peer = n.last_peer if n.detector.peer_alive(self.now) else None
        fresh_probe = self.now - n.probe_at <= PROBE_VALID_FOR
        return ModuleView(
            node=name,
            peer_node=n.peer_name,
            vip=self.config.vip,
            state=n.state,
            data=n.data,
            preferred=self.config.preferred == name,
            auto_failback=self.config.default_primary == name,
            running=n.running,
            stop_reason=n.stop_reason,
            maintenance=n.maintenance,
            force_primary="force_primary" in n.pending,
            handover="handover" in n.pending,
            want_primary="want_primary" in n.pending,
            yielding=n.yielding,
            peer=peer,
            peer_lost_reason=n.detector.lost_reason(self.now),
            peer_silence=n.detector.silence(self.now),
            peer_timeout=PEER_TIMEOUT,
            in_sync=n.in_sync,
            witness=WitnessView(
                configured=self.config.witness,
                reachable=n.witness_reachable,
                lease_valid=self.now < n.lease_valid_until,
                holder=n.lease_holder,
                refusal=n.lease_refusal,
            ),
            vip_in_use=n.vip_in_use if fresh_probe else None,
            checkers_ok=not n.checker_failing,
            checker_problem="checker interface eth0 failing here" if n.checker_failing else "",
            gave_up=n.gave_up,
            hold=n.hold,
            vip_checked=self.config.vip is None or n.vip_checked,
            holds_resources=n.holds_resources,
        )

    def connected(self) -> bool:
        return self.link_up and all(n.alive for n in self.nodes.values())

    def serving(self) -> list[str]:
        """The live nodes whose last decision was to serve."""
        return [n.name for n in self.nodes.values() if n.alive and n.state.is_serving]

    def vip_holders(self) -> list[str]:
        return [n.name for n in self.nodes.values() if n.vip]

    # -- faults and operators --------------------------------------------------------------

    def kill(self, name: str) -> None:
        """Power loss: resources vanish at once, heartbeats stop."""
        n = self.nodes[name]
        n.alive = False
        n.vip, n.app, n.app_left = False, "down", 0
        n.inbox.clear()
        n.replies.clear()
        self.flowing_ticks = 0
        self._log(f"{name} killed")

    def restart(self, name: str) -> None:
        """The agent (re)starts: the guard fenced what it held; persisted state is kept."""
        n = self.nodes[name]
        if n.alive:
            self.kill(name)
        fresh = self._fresh_node(name, n.peer_name)
        fresh.data, fresh.running, fresh.maintenance = n.data, n.running, n.maintenance
        fresh.intent_at, fresh.stop_all_at = n.intent_at, n.stop_all_at
        fresh.state = State.WAIT if n.running else State.STOP
        fresh.reason = "agent restarted"
        fresh.checker_failing = n.checker_failing
        fresh.writes, fresh.knowable = n.writes, n.knowable
        self.nodes[name] = fresh
        self._log(f"{name} restarted")

    def cut_heartbeats(self) -> None:
        self.link_up = False
        for n in self.nodes.values():
            n.inbox.clear()
        self._log("peer link cut")

    def restore_heartbeats(self) -> None:
        self.link_up = True
        # Reconnected peers compare data generations first: a secondary knows at once
        # whether it missed writes.
        for n in self.nodes.values():
            n.in_sync = n.writes == self.nodes[n.peer_name].writes
        self._log("peer link restored")

    def cut_witness(self, name: str) -> None:
        self.witness_link[name] = False
        self.nodes[name].replies.clear()
        self._log(f"{name} cut from the witness")

    def restore_witness(self, name: str) -> None:
        self.witness_link[name] = True
        self._log(f"{name} reaches the witness again")

    def stop_witness(self) -> None:
        self.witness_up = False
        for n in self.nodes.values():
            n.replies.clear()
        self._log("witness down")

    def start_witness(self, persisted: bool = True) -> None:
        """The witness restarts: with its persisted holders, or without them (blocks acquires)."""
        holders = self.arbiter.holders()
        self.arbiter = Arbiter(started=self.now)
        if persisted:
            self.arbiter.restore(holders, self.now, PEER_TIMEOUT)
        self.witness_up = True
        self._log(f"witness up ({'with' if persisted else 'without'} its records)")

    def set_checker(self, name: str, failing: bool) -> None:
        self.nodes[name].checker_failing = failing
        self._log(f"{name} checker {'failing' if failing else 'passing'}")

    def command(self, name: str, command: Command) -> Outcome:
        """Evaluate an operator command on `name` and apply its intents if accepted."""
        n = self.nodes[name]
        if not n.alive:
            raise ValueError(f"{name} is down: a command needs its agent")
        outcome = evaluate(command, self.view(name))
        self._log(f"{name} `{command}`: {'accepted' if outcome.accepted else 'refused'}")
        if outcome.accepted and not outcome.already:
            self._apply(n, outcome.intents)
        return outcome

    def _apply(self, n: SimNode, intents: frozenset[Intent]) -> None:
        deadline = self.now + COMMAND_TIMEOUT
        if Intent.RUN in intents:
            n.running, n.intent_at = True, self.now
            n.gave_up = n.hold = None
            n.restarts.reset()
        if Intent.STOP in intents:
            n.running, n.intent_at = False, self.now
            n.stop_reason = "stopped by the administrator"
        if Intent.STOP_BOTH in intents:
            n.stop_reason = "stopped on both nodes by the administrator (`stop --all`)"
            n.stop_all_at = self.now
        if Intent.KILL in intents:
            n.kill_on_stop = True
        if Intent.RESTART_APP in intents and n.app == "up":
            n.app, n.app_left = "starting", self.config.acquire_ticks
        if Intent.MAINTENANCE_ON in intents:
            n.maintenance = True
        if Intent.MAINTENANCE_OFF in intents:
            n.maintenance = False
        for intent in (Intent.HANDOVER, Intent.WANT_PRIMARY, Intent.FORCE_PRIMARY):
            if intent in intents:
                n.pending[intent.value] = deadline
        if Intent.FORCE_PRIMARY in intents:
            n.hold = None

    # -- time ------------------------------------------------------------------------------

    def tick(self, first: str | None = NODES[0]) -> None:
        """One heartbeat interval: each live node runs its cycle.

        `first` runs slightly ahead, so the other node already sees its heartbeat;
        None runs both at the same instant, each on the other's previous heartbeat.
        """
        self.now = round(self.now + TICK, 6)
        self.simultaneous = first is None
        lead = first or NODES[0]
        for name in (lead, self.nodes[lead].peer_name):
            if self.nodes[name].alive:
                self._cycle(self.nodes[name], wake=True)
            self._check_vip()
        self._replicate()
        self.flowing_ticks = self.flowing_ticks + 1 if self.connected() else 0
        self._check_no_witness_double_primary()

    def run(self, seconds: float, first: str | None = NODES[0]) -> None:
        for _ in range(round(seconds / TICK)):
            self.tick(first)

    def run_until(
        self, done: Callable[[], bool], seconds: float, first: str | None = NODES[0]
    ) -> float:
        """Tick until `done()` holds; return how long it took (fails after `seconds`)."""
        start = self.now
        for _ in range(round(seconds / TICK)):
            if done():
                return self.now - start
            self.tick(first)
        if done():
            return self.now - start
        raise AssertionError(f"not done after {seconds} s:\n" + "\n".join(self.trace[-20:]))

    def _cycle(self, n: SimNode, wake: bool) -> None:
        self._receive(n)
        for intent, deadline in list(n.pending.items()):
            if self.now > deadline:
                del n.pending[intent]
        if n.hold is not None and self.now > n.hold_until:
            n.hold = None
        view = self.view(n.name)
        if view.peer is not None:
            # What a decision saw of its peer serving (the daemon keeps the last heartbeat).
            n.knowable |= n.last_peer_writes
        decision = decide(view)
        self._check_decision(n, view, decision)
        n.wants_primary = decision.wants_primary
        for intent in decision.consumed:
            n.pending.pop(intent, None)
        n.yielding = decision.yielding
        n.data, n.state, n.reason = decision.data, decision.state, decision.reason
        n.decisions.append(decision)
        self._reconcile(n, decision)
        if n.gave_up is not None and not n.holds_resources:
            n.gave_up = None
        self._run_checker(n, decision)
        if decision.probe_vip and self.config.vip is not None:
            n.vip_in_use = self.nodes[n.peer_name].vip
            n.probe_at = self.now
        if not n.vip_checked and not n.holds_resources and not decision.serves:
            # The daemon's start-up probe: once the peer was heard, or peer_timeout passed.
            n.vip_checked = (
                n.detector.peer_alive(self.now) or self.now - n.started_at > PEER_TIMEOUT
            )
        granted = False
        if self.config.witness:
            granted = self._ask_witness(n, decision.lease)
        self._write(n)
        self._send_heartbeat(n)
        if granted and wake:
            self._cycle(n, wake=False)

    def _receive(self, n: SimNode) -> None:
        late = [hb for hb in n.inbox if self.simultaneous and hb.sent_at >= self.now]
        for hb in n.inbox:
            if hb in late:
                continue
            n.detector.heard(0, hb.sent_at)
            n.last_peer, n.last_peer_writes = hb.module, hb.writes
            if hb.stop_all_at > n.intent_at and n.running:
                n.running, n.intent_at = False, hb.stop_all_at
                n.stop_reason = f"stopped on both nodes from {n.peer_name} (`stop --all`)"
        n.inbox = late
        for reply in n.replies:
            n.witness_reachable = True
            if reply.action is LeaseAction.RELEASE:
                n.lease_valid_until, n.lease_holder = 0.0, None
            elif reply.granted:
                n.lease_valid_until = reply.sent_at + PEER_TIMEOUT - TICK
                n.lease_holder = None
                n.lease_refusal = None
                n.witness_generation = reply.generation
            elif reply.action is not LeaseAction.NONE:
                n.lease_valid_until, n.lease_holder = 0.0, reply.holder
                outdated = reply.generation not in (0, n.generation)
                n.lease_refusal = reply.reason if reply.holder is None and outdated else None
        n.replies.clear()

    def _ask_witness(self, n: SimNode, action: LeaseAction) -> bool:
        """Send this cycle's lease request; True if it newly grants a lease (the daemon wakes)."""
        if action is LeaseAction.NONE and self.now - n.witness_asked <= WITNESS_PING:
            return False
        n.witness_asked = self.now
        if not (self.witness_up and self.witness_link[n.name]):
            n.witness_reachable = False
            return False
        if action is LeaseAction.NONE:
            n.replies.append(LeaseReply(self.now, action, False, None))
            return False
        generation = 0 if "force_primary" in n.pending else n.generation
        item = LeaseItem(MODULE, ACTIONS[action], generation)
        verdict = self.arbiter.decide(CLUSTER, n.name, item, PEER_TIMEOUT, self.now)
        n.replies.append(
            LeaseReply(
                self.now,
                action,
                verdict.granted,
                verdict.holder,
                verdict.generation,
                verdict.reason,
            )
        )
        return (
            verdict.granted and action is LeaseAction.ACQUIRE and not self.now < n.lease_valid_until
        )

    def _reconcile(self, n: SimNode, decision: Decision) -> None:
        # Work under way advances first, then the decision starts what it needs.
        if n.app in ("starting", "stopping"):
            n.app_left -= 1
            if n.app_left <= 0:
                n.app = "up" if n.app == "starting" else "down"
        if n.app == "down" and n.vip and not decision.serves:
            n.vip = False  # the daemon's order: the VIP goes once the application is down
        if decision.serves:
            if n.app == "down" and n.gave_up is None:
                n.vip = True
                n.app, n.app_left = "starting", self.config.acquire_ticks
                if n.app_left <= 0:
                    n.app = "up"
            return
        if n.app in ("starting", "up"):
            ticks = 0 if n.kill_on_stop else self.config.release_ticks
            n.app, n.app_left = "stopping", ticks
            if self.config.vip_first:
                n.vip = False
            if ticks <= 0:
                n.app = "down"
                n.vip = False
        if not n.holds_resources:
            n.kill_on_stop = False

    def _run_checker(self, n: SimNode, decision: Decision) -> None:
        if not (n.checker_failing and decision.serves and n.app == "up" and n.gave_up is None):
            return
        if n.maintenance or not n.running:
            return
        if n.restarts.on_failure(self.now) is RestartVerdict.GIVE_UP:
            n.gave_up = "checker tcp failed; local restarts did not help: giving the module up here"
            n.hold = "checker tcp failed; held back from the primary role after giving it up"
            n.hold_until = self.now + self.config.restart_within
        else:
            n.app, n.app_left = "starting", self.config.acquire_ticks

    def _send_heartbeat(self, n: SimNode) -> None:
        peer = self.nodes[n.peer_name]
        if not (self.link_up and peer.alive):
            return
        module = PeerModule(
            state=n.state,
            data=n.data,
            eligible=is_eligible(self.view(n.name)),
            holds_resources=n.holds_resources,
            yielding=n.yielding and not n.holds_resources,
            wants_primary="want_primary" in n.pending or n.wants_primary,
            maintenance=n.maintenance,
        )
        writes = frozenset(n.writes) if n.state.is_serving else frozenset()
        peer.inbox.append(Heartbeat(self.now, module, n.stop_all_at, writes))

    # -- data ------------------------------------------------------------------------------

    def _write(self, n: SimNode) -> None:
        if not (n.app == "up" and n.state.is_serving):
            return
        peer = self.nodes[n.peer_name]
        attached = self.connected() and peer.state is State.SECOND
        if n.state is State.PRIM and not attached:
            return  # sync mode: the write waits for its secondary until it goes ALONE
        mirrored = n.state is State.PRIM and peer.in_sync
        if not mirrored:
            if n.shared:
                self.next_generation += 1
                n.generation, n.shared = self.next_generation, False
            if self.config.witness and n.witness_generation != n.generation:
                return  # held until the witness has recorded the new generation
        self.next_write += 1
        n.writes.add(self.next_write)
        self.must_keep.add(self.next_write)
        if mirrored:
            peer.writes.add(self.next_write)
        elif self.connected():
            peer.in_sync = False  # a resync (or a later one) has this write to send

    def _replicate(self) -> None:
        """While the pair is connected, a serving node's secondary catches up, then keeps up."""
        if not self.connected():
            return
        for n in self.nodes.values():
            primary = self.nodes[n.peer_name]
            if n.writes == primary.writes:
                n.in_sync, n.resync_progress = True, 0
                if primary.state.is_serving and n.generation != primary.generation:
                    n.generation = primary.generation
                    n.shared = primary.shared = True
                continue
            n.in_sync = False
            if n.state is not State.SECOND or not primary.state.is_serving:
                n.resync_progress = 0
                continue
            n.resync_progress += 1
            if n.resync_progress >= self.config.resync_ticks:
                quarantined = n.writes - primary.writes
                self.must_keep -= quarantined
                n.writes = set(primary.writes)
                n.in_sync, n.resync_progress = True, 0
                n.generation = primary.generation
                n.shared = primary.shared = True
                self._log(f"{n.name} resynced from {primary.name}; {len(quarantined)} quarantined")

    # -- invariants ------------------------------------------------------------------------

    def _check_decision(self, n: SimNode, view: ModuleView, decision: Decision) -> None:
        self._log(
            f"{n.name} {view.state}->{decision.state} data {decision.data} "
            f"lease {decision.lease}{' yielding' if decision.yielding else ''}: {decision.reason}"
        )
        if not decision.reason.strip():
            self._fail(f"{n.name}: a decision without a reason: {decision}")
        if view.state.is_serving and not decision.serves and decision.data is DataState.OUTDATED:
            # The loser of a split brain: what it wrote alone goes to quarantine.
            self.must_keep -= n.writes - self.nodes[n.peer_name].writes
        if view.state.is_serving or not decision.serves:
            return
        if view.force_primary:
            self.must_keep &= n.writes  # the administrator accepted losing the rest
            return
        first_start = view.data is DataState.UNKNOWN and (
            view.peer is not None and view.peer.data is DataState.UNKNOWN
        )
        if view.data is not DataState.UP_TO_DATE and not first_start:
            self._fail(f"{n.name} promoted on {view.data} data without `prim --force`")
        lost = (self.must_keep & n.knowable) - n.writes
        if lost:
            self._fail(
                f"{n.name} promoted without {len(lost)} write(s) it saw its peer make, "
                "and without `prim --force`"
            )
        missing = self.must_keep - n.writes
        if missing:
            # Writes made alone by a peer this node never heard of again cannot be known
            # without the witness keeping the data generation (see test_machine.py).
            self.unknowable_losses.append((self.now, n.name, len(missing)))

    def _check_vip(self) -> None:
        if self.config.witness and len(self.vip_holders()) > 1:
            self._fail("both nodes hold the VIP while a witness is configured")

    def _check_no_witness_double_primary(self) -> None:
        # A split brain formed during a cut ends within a few ticks of reconnection;
        # one that forms or lasts while heartbeats flow is a bug.
        settle = round(PEER_TIMEOUT / TICK) + self.config.release_ticks + 2
        if len(self.vip_holders()) > 1 and self.flowing_ticks >= settle:
            self._fail(f"both nodes hold the VIP although heartbeats flowed for {settle} ticks")

    def _fail(self, message: str) -> None:
        tail = "\n".join(self.trace[-40:])
        raise InvariantError(f"t={self.now:.2f}: {message}\n--- last events ---\n{tail}")

    def _log(self, line: str) -> None:
        self.trace.append(f"{self.now:7.2f} {line}")
