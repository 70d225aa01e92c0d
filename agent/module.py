"""One module on this node: its remembered state, and the actions that bring the world in line.

The pure core decides; this class holds what the decisions look at between
ticks (intents, lease, probe and checker results) and carries out the two
transitions the world needs: bring the module up (VIP, then application) and
bring it down (application, then VIP).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.config import CheckerConfig, ModuleConfig
from agent.core.machine import Decision, LeaseAction
from agent.core.restarts import RestartPolicy, RestartVerdict
from agent.core.states import DataState, State
from agent.host.cgroup import ModuleGroup
from agent.host.checkers import CheckResult, CheckSpec, run_check
from agent.host.services import ScriptResult, ServiceController, ServiceSpec
from agent.host.vip import Vip, add_vip, address_in_use, announce, remove_vip
from agent.logs import log_event
from agent.mirror.handle import MirrorError
from agent.replication import ReplicationRuntime
from agent.store import Store

log = logging.getLogger("tandem.module")

PROBE_VALID_FOR = 1.0  # seconds a VIP probe result is trusted
_FIGURES = re.compile(r"\d+(?:\.\d+)?")


def _step(step: ScriptResult | str) -> str:
    return step if isinstance(step, str) else step.describe()


def checker_name(checker: CheckerConfig) -> str:
    """A short label for a checker in status and events."""
    target = checker.name or checker.address or ""
    if checker.type == "tcp":
        target = f"{checker.address}:{checker.port}"
    if checker.type == "command":
        target = str(checker.command)
    return f"{checker.type} {target}".strip()


@dataclass
class CheckerRuntime:
    config: CheckerConfig
    result: CheckResult | None = None
    last_run: float = 0.0
    task: asyncio.Task[None] | None = None


@dataclass
class Lease:
    """This node's lease for the module at the witness, as its replies told."""

    valid_until: float = 0.0
    reachable: bool = False
    holder: str | None = None
    refusal: str | None = None  # the witness refused for this node's data (outdated)


@dataclass
class ModuleRuntime:
    """The mutable side of one module on this node."""

    cfg: ModuleConfig
    node: str
    store: Store
    vip: Vip | None
    state: State = State.WAIT
    data: DataState = DataState.UNKNOWN
    reason: str = "agent starting"
    since: float = field(default_factory=time.time)
    running: bool = True
    stop_reason: str = "stopped by the administrator"
    maintenance: bool = False
    intent_at: float = 0.0  # wall time of the last local start/stop
    stop_all_at: float = 0.0  # wall time of the last `stop --all` issued here
    pending: dict[str, float] = field(default_factory=dict)  # one-shot intent -> deadline
    yielding: bool = False
    wants_primary: bool = False
    failback_suppressed: bool = False  # default_primary gave the role away on purpose
    kill_on_stop: bool = False
    vip_held: bool = False
    app_started: bool = False
    transition: asyncio.Task[None] | None = None
    transition_up: bool = False
    lease: Lease = field(default_factory=Lease)
    last_lease_action: LeaseAction = LeaseAction.NONE
    probe_task: asyncio.Task[None] | None = None
    vip_in_use: bool | None = None
    probe_at: float = 0.0
    checkers: list[CheckerRuntime] = field(default_factory=list)
    restarts: RestartPolicy = field(default_factory=lambda: RestartPolicy(2, 60.0))
    gave_up: str | None = None
    hold: str | None = None
    hold_until: float = 0.0
    restart_task: asyncio.Task[None] | None = None
    announce_task: asyncio.Task[None] | None = None
    on_probed: Callable[[], None] | None = None  # wakes the decision loop
    vip_conflict: str | None = None  # another host answers for the VIP
    conflict_checked_at: float = 0.0
    vip_checked: bool = False
    conflict_task: asyncio.Task[None] | None = None
    started_app_at: float = float("inf")  # monotonic end of the last start script
    replication: ReplicationRuntime | None = None
    group: ModuleGroup = field(init=False)
    service: ServiceController | None = field(init=False)

    def __post_init__(self) -> None:
        self.group = ModuleGroup(self.node, self.cfg.name)
        svc = self.cfg.service
        self.service = None
        if svc is not None:
            spec = ServiceSpec(
                start=str(svc.start) if svc.start else None,
                stop=str(svc.stop) if svc.stop else None,
                systemd=svc.systemd,
                start_timeout=svc.start_timeout,
                stop_timeout=svc.stop_timeout,
            )
            self.service = ServiceController(spec, self.group, {})
        self.checkers = [CheckerRuntime(c) for c in self.cfg.checkers]
        self.restarts = RestartPolicy(self.cfg.restart.attempts, self.cfg.restart.within)
        self._load()

    # -- persistence -------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"module.{self.cfg.name}.{name}"

    def _load(self) -> None:
        self.data = DataState(self.store.get(self._key("data")) or DataState.UNKNOWN.value)
        self.running = self.store.get(self._key("running"), "1") == "1"
        self.maintenance = self.store.get(self._key("maintenance"), "0") == "1"
        self.intent_at = float(self.store.get(self._key("intent_at"), "0") or 0)
        self.stop_all_at = float(self.store.get(self._key("stop_all_at"), "0") or 0)
        if not self.running:
            self.state = State.STOP
            stopped = self.store.get(self._key("stop_reason")) or "stopped by the administrator"
            self.stop_reason = f"{stopped} (remembered across restarts)"
            self.reason = self.stop_reason

    def set_running(self, running: bool, reason: str, at: float | None = None) -> None:
        self.running = running
        self.stop_reason = reason
        self.intent_at = at if at is not None else time.time()
        self.store.put(self._key("running"), "1" if running else "0")
        self.store.put(self._key("stop_reason"), reason)
        self.store.put(self._key("intent_at"), repr(self.intent_at))

    def set_maintenance(self, on: bool) -> None:
        self.maintenance = on
        self.store.put(self._key("maintenance"), "1" if on else "0")

    def mark_stop_all(self) -> None:
        self.stop_all_at = time.time()
        self.store.put(self._key("stop_all_at"), repr(self.stop_all_at))

    # -- what the world holds ------------------------------------------------------------------

    @property
    def holds_resources(self) -> bool:
        """True while the VIP or the application may be up here (also while bringing down)."""
        busy = self.transition is not None and not self.transition.done()
        return self.vip_held or self.app_started or busy

    def service_label(self) -> str:
        if self.transition is not None and not self.transition.done():
            return "starting" if self.transition_up else "stopping"
        if self.restart_task is not None and not self.restart_task.done():
            return "restarting"
        if self.service is None:
            return "none"
        return "running" if self.app_started else "stopped"

    # -- decisions applied -----------------------------------------------------------------

    def record(self, decision: Decision, now: float) -> None:
        """Remember a decision; log and store it when the state or the reason changed."""
        for intent in decision.consumed:
            self.pending.pop(intent, None)
        if decision.serves:
            self.failback_suppressed = False
        elif self.state.is_serving and decision.yielding:
            # The role was handed over on an operator's word (swap, `second`, `stop`):
            # automatic failback is for a node that returns, not for undoing that.
            self.failback_suppressed = True
        self.yielding = decision.yielding
        self.last_lease_action = decision.lease
        if decision.data is not self.data:
            self.data = decision.data
            self.store.put(self._key("data"), decision.data.value)
        if decision.state is self.state and decision.reason == self.reason:
            return
        changed = decision.state is not self.state
        # A reason that only counts on ("peer lost ... for 2.3 s") is shown live in status,
        # but logged once: otherwise it would push the failover itself out of the log.
        news = changed or _FIGURES.sub("#", decision.reason) != _FIGURES.sub("#", self.reason)
        if changed:
            self.since = time.time()
        self.state = decision.state
        self.reason = decision.reason
        if not news:
            return
        self.store.add_event(
            "transition" if changed else "reason",
            decision.reason,
            module=self.cfg.name,
            state=decision.state.value,
            detail={"data": decision.data.value},
        )
        log_event(
            log,
            decision.reason,
            node=self.node,
            module=self.cfg.name,
            state=decision.state.value,
            event="transition" if changed else "reason",
        )

    def event(self, kind: str, reason: str, **detail: object) -> None:
        self.store.add_event(
            kind,
            reason,
            module=self.cfg.name,
            state=self.state.value,
            detail=dict(detail) if detail else None,
        )
        log_event(log, reason, node=self.node, module=self.cfg.name, event=kind)

    def expire_intents(self, now: float) -> None:
        for intent, deadline in list(self.pending.items()):
            if now > deadline:
                del self.pending[intent]
        if self.hold is not None and now > self.hold_until:
            self.hold = None

    def reconcile(self, decision: Decision) -> None:
        """Start the transition the decision needs, if one is not already under way."""
        busy = self.transition is not None and not self.transition.done()
        if decision.serves:
            if busy or (self.vip_held and self.app_started) or self.gave_up:
                return
            self.transition_up = True
            self.transition = asyncio.create_task(self._bring_up())
            return
        if busy and self.transition_up and self.transition is not None:
            # Stepping down wins over a start still under way: the start may hang for its
            # whole timeout, and the peer may be about to take over.
            self.transition.cancel()
            busy = False
        if busy or not (self.vip_held or self.app_started):
            return
        self.transition_up = False
        self.transition = asyncio.create_task(self._bring_down())

    async def _bring_up(self) -> None:
        if self.vip is not None and not self.vip_held:
            try:
                await add_vip(self.vip)
            except Exception as exc:  # any failure is reported and gives the role up
                self.gave_up = f"could not add VIP {self.vip.address}: {exc}"
                self.hold = f"{self.gave_up}; held back from the primary role for 30 s"
                self.hold_until = time.monotonic() + 30.0
                self.event("vip", self.gave_up)
                return
            self.vip_held = True
            self.event("vip", f"VIP {self.vip.address} added on {self.vip.interface}")
            with contextlib.suppress(Exception):  # a lost announcement is repeated, not fatal
                self.announce_task = await announce(self.vip)
        if self.replication is not None and self.replication.enabled:
            try:
                await self.replication.become_primary()
            except MirrorError as exc:
                self.gave_up = f"could not mount the replicated directories: {exc}"
                self.hold = f"{self.gave_up}; held back from the primary role for 30 s"
                self.hold_until = time.monotonic() + 30.0
                self.event("mirror", self.gave_up)
                return
        await self._start_app()

    async def _start_app(self) -> None:
        self.app_started = True
        self.started_app_at = float("inf")  # checkers wait until the start script is done
        for checker in self.checkers:
            checker.result = None
        if self.service is None:
            self.started_app_at = time.monotonic()
            return
        self.group.create()
        result = await self.service.start()
        self.started_app_at = time.monotonic()
        if result is None:
            return
        self.event(
            "service",
            f"start: {result.describe()}",
            output=result.output,
            duration=round(result.duration, 3),
        )
        if not result.ok:
            self.on_failure(time.monotonic(), "start script failed")

    async def _bring_down(self) -> None:
        # The VIP goes first: once this node steps down its lease margin is short, and a
        # stop script may take longer than that; clients lose nothing they had not already.
        if self.announce_task is not None:
            self.announce_task.cancel()
        if self.vip is not None and self.vip_held:
            await remove_vip(self.vip)
            self.vip_held = False
            self.event("vip", f"VIP {self.vip.address} removed")
        if self.app_started and self.service is not None:
            if self.kill_on_stop:
                await self.service.force_stop()
                self.event("service", "application killed (forcestop)")
            else:
                results = await self.service.stop()
                self.event("service", "application stopped", steps=[_step(r) for r in results])
        elif self.app_started:
            await self.group.kill_async()
        self.kill_on_stop = False
        self.app_started = False
        if self.replication is not None and self.replication.role == "primary":
            await self.replication.stop_mirror()
            self.event("mirror", "replicated directories unmounted")

    async def shutdown(self) -> None:
        """Orderly exit: cancel work under way and release everything this node holds."""
        for task in [
            self.transition,
            self.probe_task,
            self.restart_task,
            *(c.task for c in self.checkers),
        ]:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self.replication is not None:
            self.replication.shutting_down = True
        if self.app_started or self.vip_held:
            self.app_started = self.app_started or (self.service is not None)
            await self._bring_down()
        if self.replication is not None:
            await self.replication.shutdown()

    # -- restarts and checkers -------------------------------------------------------------

    def on_failure(self, now: float, what: str) -> None:
        """A primary checker or a start failed: restart locally, or give the module up."""
        verdict = self.restarts.on_failure(now)
        if verdict is RestartVerdict.GIVE_UP:
            self.gave_up = (
                f"{what}; {self.restarts.attempts} local restart(s) within "
                f"{self.restarts.within:g} s did not help: giving the module up here"
            )
            self.hold = f"{what}; held back from the primary role after giving it up"
            self.hold_until = now + self.restarts.within
            return
        self.event(
            "restart",
            f"{what}: restarting the application here "
            f"({self.restarts.used(now)}/{self.restarts.attempts})",
        )
        self.restart_app()

    def restart_app(self) -> None:
        if self.restart_task is not None and not self.restart_task.done():
            return
        self.restart_task = asyncio.create_task(self._restart())

    async def _restart(self) -> None:
        if self.service is not None and self.app_started:
            await self.service.stop()
        self.app_started = False
        await self._start_app()

    def after_step_down(self) -> None:
        """Once down after giving up, the give-up turns into a hold on promotion."""
        if self.gave_up is not None and not self.holds_resources:
            self.gave_up = None

    def run_checkers(self, now: float, serving: bool) -> None:
        if self.maintenance or not self.running:
            return
        for checker in self.checkers:
            applies = checker.config.on == "both" or serving
            if not applies:
                checker.result = None
                continue
            if serving and not (
                self.app_started and now - self.started_app_at >= checker.config.interval
            ):
                continue  # give the application one interval after its start to come up
            if checker.task is not None and not checker.task.done():
                continue
            if now - checker.last_run < checker.config.interval:
                continue
            checker.last_run = now
            checker.task = asyncio.create_task(self._check(checker))

    async def _check(self, checker: CheckerRuntime) -> None:
        cfg = checker.config
        spec = CheckSpec(
            type=cfg.type,
            address=str(cfg.address) if cfg.address else None,
            port=cfg.port,
            name=cfg.name,
            command=cfg.command,
            timeout=cfg.timeout,
        )
        result = await run_check(spec, self.group)
        previous = checker.result
        checker.result = result
        if previous is None or previous.ok != result.ok:
            self.event(
                "checker",
                f"checker {checker_name(cfg)}: {'ok' if result.ok else 'FAILED'} ({result.detail})",
            )
        if not result.ok and self.state.is_serving and self.app_started:
            busy = self.restart_task is not None and not self.restart_task.done()
            if not busy and self.gave_up is None:
                self.on_failure(time.monotonic(), f"checker {checker_name(cfg)} failed")

    def standby_checkers(self) -> tuple[bool, str]:
        """Whether the `on: both` checkers pass here (needed to be primary or secondary)."""
        for checker in self.checkers:
            if (
                checker.config.on == "both"
                and checker.result is not None
                and not (checker.result.ok)
            ):
                return False, f"checker {checker_name(checker.config)} failing here"
        return True, ""

    # -- VIP probe -------------------------------------------------------------------------

    def probe(self, now: float) -> None:
        if self.vip is None or (self.probe_task is not None and not self.probe_task.done()):
            return
        self.probe_task = asyncio.create_task(self._probe())

    async def _probe(self) -> None:
        assert self.vip is not None
        in_use = await address_in_use(self.vip, timeout=0.3)
        self.vip_in_use = in_use
        self.probe_at = time.monotonic()
        if self.on_probed is not None:
            self.on_probed()

    def probe_result(self, now: float) -> bool | None:
        if now - self.probe_at > PROBE_VALID_FOR:
            return None
        return self.vip_in_use
