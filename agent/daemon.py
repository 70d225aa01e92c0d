"""tandem-agent: the one place where the core's decisions become actions.

Every `heartbeat_interval` the decision loop reads a frozen view per module,
asks the pure core what to do, records it, reconciles the world (VIP,
application), talks to the witness, sends one heartbeat and feeds the guard.
Heartbeats are sent only from this loop, so a stalled loop goes silent and is
fenced by the guard before the peer's timeout runs out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from agent import __version__
from agent.api.routes import create_app
from agent.api.schemas import (
    CheckerStatus,
    CommandResult,
    DataResult,
    EventOut,
    Latency,
    LinkStatus,
    ModuleStatus,
    NodeStatus,
    PeerStatus,
    ReplicationFigures,
    ResyncStatus,
    Status,
    WitnessStatus,
)
from agent.config import ClusterConfig, ConfigError, config_hash, load_config, node_checks
from agent.core import mirror_frames as mf
from agent.core.commands import Command, Intent, evaluate
from agent.core.detector import FailureDetector
from agent.core.frames import Action, Heartbeat, LeaseItem, Verdict
from agent.core.machine import (
    Decision,
    LeaseAction,
    ModuleView,
    PeerModule,
    WitnessView,
    decide,
    is_eligible,
)
from agent.core.states import DataState, State, colour
from agent.guard import GuardHandle
from agent.host.vip import Vip, address_in_use, remove_vip
from agent.keys import KeyFileError, load_key
from agent.logs import log_event, setup_logging
from agent.mirror.handle import MirrorError
from agent.mirror.link import parse_hello_frame
from agent.module import ModuleRuntime, checker_name
from agent.net.heartbeat import HeartbeatLinks
from agent.net.witness_client import WitnessClient
from agent.paths import default_socket_path
from agent.replication import ReplicationRuntime
from agent.store import Store

log = logging.getLogger("tandem.agent")


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about readiness and liveness; a no-op without systemd.

    The protocol is one datagram on $NOTIFY_SOCKET; ten lines do not justify a dependency.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


class Agent:
    """The node agent: configuration, peer, witness, modules and the decision loop."""

    def __init__(self, cfg: ClusterConfig, node: str, state_dir: Path, socket_path: Path) -> None:
        self.cfg = cfg
        self.node = cfg.node(node)
        self.peer_cfg = cfg.peer_of(node)
        self.state_dir = state_dir
        self.socket_path = socket_path
        self.config_hash = config_hash(cfg)
        self.key = load_key(cfg.cluster.secret_file)
        self.incarnation = time.time_ns()
        self.started = time.time()
        self.started_mono = time.monotonic()
        timing = cfg.timing
        self.interval = timing.heartbeat_interval
        self.peer_timeout = timing.peer_timeout
        self.fence_after = timing.peer_timeout * 2 / 3
        self.store = Store(state_dir / "events.db", node)
        self.modules: dict[str, ModuleRuntime] = {}
        for m in cfg.modules:
            vip = None
            if m.vip is not None:
                interface = m.vip_interface(node)
                assert interface is not None
                vip = Vip(str(m.vip.address), interface)
            self.modules[m.name] = ModuleRuntime(cfg=m, node=node, store=self.store, vip=vip)
            self.modules[m.name].on_probed = self.wake_soon
            if m.directories:
                self.modules[m.name].replication = ReplicationRuntime(
                    cfg, m, node, self.store, state_dir, self.wake_soon
                )
        self.peer_server: asyncio.Server | None = None
        self.mirror_tasks: dict[str, asyncio.Task[None]] = {}
        self.detector = FailureDetector(len(self.node.heartbeat), timing.peer_timeout)
        self.peer_payload: dict[str, Any] = {}
        self.peer_hash: str | None = None
        self.peer_problem: str | None = None
        self.links: HeartbeatLinks | None = None
        self.witness: WitnessClient | None = None
        self.witness_task: asyncio.Task[None] | None = None
        self.witness_asked = 0.0
        self.witness_reachable: bool | None = None  # None until the witness was asked
        self.guard: GuardHandle | None = None
        self.guard_task: asyncio.Task[None] | None = None
        self.tick_done = asyncio.Event()
        self.event_added = asyncio.Condition()
        self.stopping = asyncio.Event()
        self.wake = asyncio.Event()  # set when something must be decided before the next tick
        self.retry_witness_at = 0.0
        self.last_tick = time.monotonic()

    # -- start and stop --------------------------------------------------------------------

    async def clean_leftovers(self) -> None:
        """A crashed agent may have left VIPs and processes behind: remove them first."""
        for module in self.modules.values():
            if module.vip is not None and await remove_vip(module.vip):
                module.event("vip", f"removed VIP {module.vip.address} left by an earlier run")
            pids = module.group.pids()
            if pids:
                await module.group.kill_async()
                module.event("service", f"killed {len(pids)} process(es) left by an earlier run")

    async def run(self) -> int:
        self.store.add_event("agent", f"agent starting (version {__version__})")
        log_event(log, "agent starting", node=self.node.name, config_hash=self.config_hash)
        await self.clean_leftovers()
        self.links = HeartbeatLinks(
            self.key,
            self.cfg.cluster.name,
            self.node.name,
            self.incarnation,
            self.config_hash,
            self.node.heartbeat,
            self.peer_cfg.heartbeat,
            self.cfg.ports.heartbeat,
            self.on_heartbeat,
            on_problem=self.on_link_problem,
        )
        await self.links.start()
        if self.cfg.witness is not None:
            self.witness = WitnessClient(
                str(self.cfg.witness.address),
                self.cfg.witness.port,
                self.key,
                self.cfg.cluster.name,
                self.node.name,
                self.incarnation,
            )
            await self.witness.start()
        server = await self.start_api()
        if any(m.replication is not None for m in self.modules.values()):
            self.peer_server = await asyncio.start_server(
                self.on_peer_stream, str(self.node.address), self.cfg.ports.peer
            )
        # The guard comes last: nothing is held before the loop runs, and a start that
        # fails above (a port in use) leaves no process behind.
        self.guard = await GuardHandle.spawn(self.fence_after)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            await self.loop()
        finally:
            await self.shutdown()
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server_task, 3)
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        return 0

    async def start_api(self) -> Any:
        import uvicorn  # imported here: the CLI and the tests import this module without it

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Any:  # the agent owns SIGTERM and SIGINT
                yield

        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        config = uvicorn.Config(
            create_app(self), uds=str(self.socket_path), log_level="warning", lifespan="off"
        )
        server = Server(config)
        old = os.umask(0o177)  # the socket is root's only: it can stop the application
        try:
            self.server_task = asyncio.create_task(server.serve())
            while not server.started and not self.server_task.done():
                await asyncio.sleep(0.01)
        finally:
            os.umask(old)
        if self.server_task.done():
            self.server_task.result()
        return server

    async def loop(self) -> None:
        ready = False
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                self.tick(started)
            except Exception:  # one bad cycle must not end the agent (Patroni's rule)
                log.exception("decision cycle failed", extra={"fields": {"node": self.node.name}})
            if not ready:
                sd_notify("READY=1")
                ready = True
            sd_notify("WATCHDOG=1")
            self.tick_done.set()
            self.tick_done.clear()
            await self.sleep_until_next_tick(started)

    async def sleep_until_next_tick(self, started: float) -> None:
        """Sleep one interval, but wake at once for what cannot wait a whole interval.

        The peer's timeout expiring, a witness answer or a VIP probe result each end the
        sleep, so a failover does not lose up to an interval at every step.
        """
        now = time.monotonic()
        wake_at = started + self.interval
        silence = self.detector.silence(now)
        if silence is not None and silence < self.peer_timeout:
            wake_at = min(wake_at, now + (self.peer_timeout - silence) + 0.005)
        if self.retry_witness_at > now:
            wake_at = min(wake_at, self.retry_witness_at)
        for m in self.modules.values():
            if m.state.is_serving and m.lease.valid_until > now:
                wake_at = min(wake_at, m.lease.valid_until)  # step down the moment it lapses
        self.wake.clear()
        stop = asyncio.ensure_future(self.stopping.wait())
        woken = asyncio.ensure_future(self.wake.wait())
        try:
            await asyncio.wait(
                {stop, woken},
                timeout=max(0.0, wake_at - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stop.cancel()
            woken.cancel()

    async def shutdown(self) -> None:
        """SIGTERM: release every VIP and application, tell the peer, then exit."""
        sd_notify("STOPPING=1")
        self.store.add_event("agent", "agent stopping: releasing VIPs and applications")
        if self.peer_server is not None:
            self.peer_server.close()
        keepalive = asyncio.create_task(self.keep_alive_while_stopping())
        try:
            await asyncio.gather(*(m.shutdown() for m in self.modules.values()))
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive
        for module in self.modules.values():
            if module.state is not State.STOP:
                module.state = State.WAIT
                module.reason = "agent stopped"
            module.yielding = True  # the peer may take over at once, not after peer_timeout
        if self.witness is not None:
            items = [LeaseItem(name, "release") for name in self.modules]
            with contextlib.suppress(Exception):
                await self.witness.request(items, self.peer_timeout, self.interval)
            self.witness.close()
        if self.links is not None:
            for _ in range(3):  # datagrams get lost; the peer ignores the repeats
                self.links.send(self.payload(leaving=True))
        if self.guard is not None:
            await self.guard.close()
        if self.links is not None:
            self.links.close()
        self.store.add_event("agent", "agent stopped")
        self.store.close()

    async def keep_alive_while_stopping(self) -> None:
        """While applications stop (their scripts may take a while) the loop no longer ticks:
        keep feeding the guard, which would otherwise fence a clean stop as a stalled agent,
        and keep the peer hearing us, so it waits for our `leaving` instead of timing out."""
        while True:
            if self.guard is not None and self.guard.alive():
                self.feed_guard()
            if self.links is not None:
                self.links.send(self.payload())
            await asyncio.sleep(self.interval)

    # -- peer --------------------------------------------------------------------------------

    def on_heartbeat(self, frame: Heartbeat, link: int, now: float) -> None:
        if frame.node != self.peer_cfg.name:
            return
        self.detector.heard(link, now)
        self.peer_payload = frame.payload
        self.peer_hash = frame.config_hash
        if frame.config_hash != self.config_hash:
            self.peer_problem = (
                f"{self.peer_cfg.name} runs another configuration (hash "
                f"{frame.config_hash[:12]} vs {self.config_hash[:12]} here): apply the same "
                "file on both nodes"
            )
        else:
            self.peer_problem = None

    def on_link_problem(self, message: str) -> None:
        self.peer_problem = message
        self.store.add_event("peer", message)

    def peer_module(self, name: str, now: float) -> PeerModule | None:
        if not self.detector.peer_alive(now):
            return None
        raw = self.peer_payload.get("modules", {}).get(name)
        if not isinstance(raw, dict):
            return None
        try:
            return PeerModule(
                state=State(raw["s"]),
                data=DataState(raw["d"]),
                eligible=bool(raw["e"]),
                holds_resources=bool(raw["h"]),
                yielding=bool(raw["y"]),
                wants_primary=bool(raw["w"]),
                maintenance=bool(raw["m"]),
            )
        except (KeyError, ValueError):
            return None

    def payload(self, leaving: bool = False) -> dict[str, Any]:
        modules: dict[str, Any] = {}
        for name, m in self.modules.items():
            view = self.view(m, time.monotonic()) if not leaving else None
            eligible = view is not None and is_eligible(view)
            modules[name] = {
                "s": m.state.value,
                "d": m.data.value,
                "e": eligible,
                "h": m.holds_resources,
                "y": m.yielding and not m.holds_resources,
                "w": "want_primary" in m.pending or m.wants_primary,
                "m": m.maintenance,
                "sa": m.stop_all_at,
            }
            if m.replication is not None:
                modules[name]["r"] = m.replication.advertised()
        return {"modules": modules, "leaving": leaving}

    # -- the decision cycle --------------------------------------------------------------------

    def view(self, m: ModuleRuntime, now: float) -> ModuleView:
        peer = self.peer_module(m.cfg.name, now)
        checkers_ok, problem = m.standby_checkers()
        lease = m.lease
        witness = WitnessView(
            configured=self.cfg.witness is not None,
            reachable=self.witness_reachable is not False,
            lease_valid=now < lease.valid_until,
            holder=lease.holder,
            refusal=lease.refusal,
        )
        preferred = m.cfg.preferred_node(self.cfg) == self.node.name
        return ModuleView(
            node=self.node.name,
            peer_node=self.peer_cfg.name,
            vip=str(m.cfg.vip.address) if m.cfg.vip else None,
            state=m.state,
            data=m.data,
            preferred=preferred,
            auto_failback=m.cfg.default_primary == self.node.name and not m.failback_suppressed,
            running=m.running,
            stop_reason=m.stop_reason,
            maintenance=m.maintenance,
            force_primary="force_primary" in m.pending,
            handover="handover" in m.pending,
            want_primary="want_primary" in m.pending,
            yielding=m.yielding,
            peer=peer,
            peer_lost_reason=self.detector.lost_reason(now),
            peer_silence=self.detector.silence(now),
            peer_incompatible=self.peer_problem if peer is not None else None,
            peer_timeout=self.peer_timeout,
            in_sync=self.in_sync(m),
            witness=witness,
            vip_in_use=m.probe_result(now),
            checkers_ok=checkers_ok,
            checker_problem=problem,
            gave_up=m.gave_up,
            hold=m.hold or m.vip_conflict,
            vip_checked=m.vip is None or m.vip_checked,
            holds_resources=m.holds_resources,
        )

    def tick(self, now: float) -> None:
        stalled = now - self.last_tick > self.fence_after
        self.last_tick = now
        if self.guard is not None and (self.guard.fenced or stalled):
            self.after_fence(now, stalled)
        self.apply_peer_stop_all()
        self.check_vip_conflicts(now)
        lease_items: list[LeaseItem] = []
        for m in self.modules.values():
            m.expire_intents(now)
            decision = decide(self.view(m, now))
            m.wants_primary = decision.wants_primary
            m.record(decision, now)
            m.reconcile(decision)
            m.after_step_down()
            if decision.probe_vip:
                m.probe(now)
            if decision.lease is not LeaseAction.NONE:
                lease_items.append(
                    LeaseItem(m.cfg.name, cast(Action, decision.lease.value), self.generation(m))
                )
            m.run_checkers(now, decision.serves)
            self.steer_replication(m, decision, now)
        if self.witness is not None and (lease_items or now - self.witness_asked > 1.0):
            # With nothing to ask, an empty request every second keeps the witness's
            # reachability known (shown in status, needed before a failover).
            self.ask_witness(lease_items, now)
        if self.links is not None:
            self.links.send(self.payload())
        if self.guard is not None:
            if not self.guard.alive():
                self.store.add_event("guard", "fence guard died: starting a new one")
                self.guard_task = asyncio.create_task(self.respawn_guard())
            else:
                self.feed_guard()

    def feed_guard(self) -> None:
        """Tell the guard we live, and what to remove and kill if we stop doing so."""
        assert self.guard is not None
        self.guard.feed(
            [m.vip for m in self.modules.values() if m.vip is not None],
            [(self.node.name, name) for name in self.modules],
        )

    # -- replication -------------------------------------------------------------------------

    def generation(self, m: ModuleRuntime) -> int:
        """The data generation a lease request carries (0: none, or `prim --force` pending)."""
        if m.replication is None or "force_primary" in m.pending:
            return 0
        return m.replication.generations.current

    def peer_replication(self, name: str) -> Any:
        raw = self.peer_payload.get("modules", {}).get(name)
        return raw.get("r") if isinstance(raw, dict) else None

    def in_sync(self, m: ModuleRuntime) -> bool:
        """A module without directories is always in sync; otherwise replication says."""
        if m.replication is None:
            return True
        peer = ReplicationRuntime.peer_generations(self.peer_replication(m.cfg.name) or {})
        return m.replication.secondary_in_sync(peer)

    def steer_replication(self, m: ModuleRuntime, decision: Decision, now: float) -> None:
        """Keep the mirror process in the role the decision gives this node."""
        r = m.replication
        if r is None:
            return
        peer_alive = self.detector.peer_alive(now)
        r.observe(self.peer_replication(m.cfg.name) if peer_alive else None, m.state.is_serving)
        r.tick(
            decision.state,
            self.peer_replication(m.cfg.name) if peer_alive else None,
            str(self.peer_cfg.address),
            self.cfg.ports.peer,
            now,
        )
        busy = m.transition is not None and not m.transition.done()
        task = self.mirror_tasks.get(m.cfg.name)
        if busy or m.app_started or m.vip_held or (task is not None and not task.done()):
            return
        if now < r.retry_at:
            return
        if decision.state in (State.SECOND, State.WAIT) and r.role != "secondary":
            self.mirror_tasks[m.cfg.name] = asyncio.create_task(self._mirror_role(m, "secondary"))
        elif decision.state is State.STOP and r.role is not None:
            self.mirror_tasks[m.cfg.name] = asyncio.create_task(self._mirror_role(m, None))

    async def _mirror_role(self, m: ModuleRuntime, role: str | None) -> None:
        assert m.replication is not None
        try:
            if role == "secondary":
                await m.replication.become_secondary()
            else:
                await m.replication.stop_mirror(stopped=True)
        except MirrorError as exc:
            if m.replication.problem != str(exc):
                m.event("mirror", f"mirror cannot start: {exc}; retrying every 10 s")
            m.replication.problem = str(exc)
            m.replication.retry_at = time.monotonic() + 10.0

    def resolve(self, module: str, keep: str) -> DataResult:
        """`tandemctl resolve MODULE --keep NODE`: end a split brain in NODE's favour."""
        m = self.modules[module]
        r = m.replication

        def result(accepted: bool, reason: str) -> DataResult:
            return DataResult(module=module, accepted=accepted, reason=reason)

        if r is None:
            return result(False, f"{module} has no replicated directories")
        if keep not in self.cfg.node_names:
            return result(False, f"no node named {keep!r}; one of {', '.join(self.cfg.node_names)}")
        if not r.split_reported:
            return result(False, f"{module} is not in split brain; nothing to resolve")
        primary = self.node.name if m.state.is_serving else self.peer_cfg.name
        peer = self.peer_module(module, time.monotonic())
        if keep != primary or (
            keep == self.peer_cfg.name and (peer is None or not peer.state.is_serving)
        ):
            return result(
                False,
                f"{keep} is not primary: make it primary first (`tandemctl stop {module}` on the "
                f"other node, then `tandemctl prim --force {module}` on {keep}), then resolve",
            )
        r.resolve(keep)
        self.wake_soon()
        other = self.peer_cfg.name if keep == self.node.name else self.node.name
        return result(
            True,
            f"resyncing {module} from {keep}; {other}'s differing files go to quarantine "
            f"in its state directory (see `tandemctl logs {module}` on {other})",
        )

    async def verify(self, module: str, timeout: float) -> DataResult:
        """`tandemctl verify MODULE`: compare both sides by block hashes, on the primary."""
        m = self.modules[module]
        r = m.replication
        if r is None:
            return DataResult(module=module, accepted=False, reason="no replicated directories")
        if r.role != "primary" or r.handle is None or not r.connected:
            where = "this node" if r.role == "primary" else f"{self.peer_cfg.name}"
            return DataResult(
                module=module,
                accepted=False,
                reason=f"verify runs on the primary while it mirrors (try {where})",
            )
        if r.verify_waiter is not None:
            return DataResult(
                module=module, accepted=False, reason="a verify of this module is already running"
            )
        loop = asyncio.get_running_loop()
        r.verify_waiter = loop.create_future()
        r.verify_id += 1
        r.handle.send({"cmd": "verify", "id": r.verify_id})
        try:
            done = await asyncio.wait_for(r.verify_waiter, timeout)
        except TimeoutError:
            return DataResult(module=module, accepted=False, reason=f"no result in {timeout:g} s")
        finally:
            r.verify_waiter = None
        if "error" in done:
            return DataResult(module=module, accepted=False, reason=str(done["error"]))
        differing = [str(p) for p in done.get("differing", [])]
        reason = (
            "both sides hold the same data" if not differing else f"{len(differing)} path(s) differ"
        )
        m.event("verify", f"verify: {reason}", differing=differing[:1000])
        return DataResult(
            module=module,
            accepted=True,
            reason=reason,
            differing=differing,
            compared=int(done.get("compared", 0)),
            seconds=float(done.get("seconds", 0.0)),
        )

    async def on_peer_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A replication stream from the peer: check its HELLO, hand it to the module's receiver."""
        sock = writer.get_extra_info("socket")
        try:
            header_raw = await asyncio.wait_for(reader.readexactly(mf.HEADER_BYTES), 5.0)
            header = mf.parse_header(header_raw)
            if header.kind is not mf.FrameKind.HELLO or header.length > 4096:
                raise mf.StreamError("stream does not open with a HELLO frame")
            rest = await asyncio.wait_for(reader.readexactly(header.length + mf.MAC_BYTES), 5.0)
            hello = parse_hello_frame(header_raw + rest, self.key)
        except (asyncio.IncompleteReadError, TimeoutError, OSError):
            writer.close()
            return
        except (mf.StreamError, KeyError, ValueError) as exc:
            self.store.add_event("replication", f"refused a replication stream: {exc}")
            writer.close()
            return
        m = self.modules.get(hello.module)
        reason: str | None
        if hello.cluster != self.cfg.cluster.name or hello.node != self.peer_cfg.name:
            reason = f"stream from {hello.node} of cluster {hello.cluster} is not from our peer"
        elif m is None or m.replication is None:
            reason = f"module {hello.module} has no replicated directories here"
        else:
            fd = os.dup(sock.fileno())
            try:
                reason = m.replication.hand_stream(hello.raw, fd)
            finally:
                os.close(fd)
        if reason is not None:
            with contextlib.suppress(OSError):
                writer.write(
                    mf.encode(
                        mf.base_key(self.key),
                        mf.FrameKind.ERROR,
                        0,
                        mf.encode_json({"reason": reason}),
                    )
                )
                await writer.drain()
        writer.transport.abort()

    def check_vip_conflicts(self, now: float) -> None:
        """Probe each VIP once at start (and again while in conflict): another host answering
        for it is a configuration error the operator must hear about, not a reason to fight."""
        for m in self.modules.values():
            if m.vip is None or m.holds_resources or m.state.is_serving:
                continue
            if m.conflict_task is not None and not m.conflict_task.done():
                continue
            if not (self.detector.peer_alive(now) or now - self.started_mono > self.peer_timeout):
                continue  # the peer may hold the VIP legitimately: hear it first
            due = m.conflict_checked_at == 0.0 or (
                m.vip_conflict is not None and now - m.conflict_checked_at > 5.0
            )
            if due:
                m.conflict_checked_at = now
                m.conflict_task = asyncio.create_task(self._check_conflict(m))

    async def _check_conflict(self, m: ModuleRuntime) -> None:
        assert m.vip is not None
        in_use = await address_in_use(m.vip, timeout=0.5)
        m.vip_checked = True
        peer = self.peer_module(m.cfg.name, time.monotonic())
        if in_use and not (peer is not None and peer.holds_resources):
            if m.vip_conflict is None:
                m.vip_conflict = (
                    f"VIP {m.vip.address} already answers on the LAN and {self.peer_cfg.name} "
                    "does not hold it: another host uses this address; free it or change "
                    "the module's vip.address"
                )
                m.event("vip", m.vip_conflict)
        elif m.vip_conflict is not None:
            m.vip_conflict = None
            m.event("vip", f"VIP {m.vip.address} is free again")
            self.wake.set()

    def wake_soon(self) -> None:
        self.wake.set()

    async def respawn_guard(self) -> None:
        self.guard = await GuardHandle.spawn(self.fence_after)

    def after_fence(self, now: float, stalled: bool) -> None:
        """The guard fenced this node (or the loop stalled past its limit): step down."""
        assert self.guard is not None
        if not self.guard.fenced and not stalled:
            return
        why = "fenced by the guard: the decision loop stalled"
        if stalled:
            why = f"decision loop stalled for more than {self.fence_after:.2f} s"
        self.guard.clear_fenced()
        for m in self.modules.values():
            if not m.state.is_serving and not m.holds_resources:
                continue
            m.vip_held = False  # the guard removed every VIP of its last feed
            m.app_started = not m.group.is_empty()
            m.gave_up = f"{why}: the peer may have taken over"
            m.hold = f"{why}: letting the peer decide first"
            m.hold_until = now + 2 * self.peer_timeout
            m.event("fence", m.gave_up)

    def apply_peer_stop_all(self) -> None:
        modules = self.peer_payload.get("modules", {})
        for name, m in self.modules.items():
            raw = modules.get(name)
            if not isinstance(raw, dict):
                continue
            at = raw.get("sa", 0.0)
            if isinstance(at, int | float) and at > m.intent_at and m.running:
                m.set_running(
                    False,
                    f"stopped on both nodes from {self.peer_cfg.name} (`stop --all`)",
                    at=float(at),
                )

    def ask_witness(self, items: list[LeaseItem], now: float) -> None:
        if self.witness_task is not None and not self.witness_task.done():
            return
        self.witness_asked = now
        self.witness_task = asyncio.create_task(self._ask_witness(items, now))

    async def _ask_witness(self, items: list[LeaseItem], sent_at: float) -> None:
        assert self.witness is not None
        verdicts = await self.witness.request(items, self.peer_timeout, self.interval)
        reachable = verdicts is not None
        if reachable != self.witness_reachable:
            self.store.add_event(
                "witness", "witness reachable" if reachable else "witness unreachable"
            )
        self.witness_reachable = reachable
        if verdicts is None:
            return
        for item in items:
            m = self.modules[item.module]
            verdict: Verdict | None = verdicts.get(item.module)
            if verdict is None:
                continue
            m.lease.reachable = True
            if item.action == "release":
                m.lease.valid_until = 0.0
                m.lease.holder = None
                self.wake.set()
            elif verdict.granted:
                m.lease.refusal = None
                r = m.replication
                if r is not None and r.witness_generation != verdict.generation:
                    r.witness_generation = verdict.generation
                    self.wake.set()  # writes held for this confirmation may go on now
                # Our lease ends `duration` after we sent the request; the witness counts
                # from when it received it, later. One interval of margin on top.
                if m.lease.valid_until <= time.monotonic():
                    self.wake.set()  # newly granted: promote now, not at the next tick
                m.lease.valid_until = sent_at + self.peer_timeout - self.interval
                m.lease.holder = None
            else:
                m.lease.valid_until = 0.0
                m.lease.holder = verdict.holder
                # Judged on the generation this request carried, not one read since.
                outdated = verdict.generation not in (0, item.generation)
                m.lease.refusal = verdict.reason if verdict.holder is None and outdated else None
                if item.action == "acquire":
                    # Ask again the moment the holder's lease runs out at the witness.
                    self.retry_witness_at = time.monotonic() + verdict.expires_in + 0.005

    # -- API port ------------------------------------------------------------------------------

    def module_names(self) -> list[str]:
        return list(self.modules)

    def status(self) -> Status:
        now = time.monotonic()
        links = [
            LinkStatus(
                index=link.index,
                local=str(self.node.heartbeat[link.index]),
                peer=str(self.peer_cfg.heartbeat[link.index]),
                up=link.up,
                silent_for=None if link.silent_for is None else round(link.silent_for, 3),
            )
            for link in self.detector.links(now)
        ]
        stats = self.links.stats if self.links is not None else None
        peer = PeerStatus(
            name=self.peer_cfg.name,
            address=str(self.peer_cfg.address),
            reachable=self.detector.peer_alive(now),
            links=links,
            problem=self.peer_problem,
            dropped_forged=stats.forged if stats else 0,
            dropped_replayed=stats.replayed if stats else 0,
        )
        modules = []
        for m in self.modules.values():
            p = self.peer_module(m.cfg.name, now)
            modules.append(
                ModuleStatus(
                    name=m.cfg.name,
                    state=m.state,
                    colour=colour(m.state),
                    data=m.data,
                    peer_state=p.state if p else None,
                    peer_data=p.data if p else None,
                    vip=str(m.cfg.vip.address) if m.cfg.vip else None,
                    vip_held=m.vip_held,
                    service=m.service_label(),
                    reason=m.reason,
                    since=m.since,
                    running=m.running,
                    maintenance=m.maintenance,
                    restarts=m.restarts.used(now),
                    checkers=[
                        CheckerStatus(
                            name=checker_name(c.config),
                            type=c.config.type,
                            on=c.config.on,
                            ok=c.result.ok if c.result else None,
                            detail=c.result.detail if c.result else "not run",
                        )
                        for c in m.checkers
                    ],
                    replication=replication_figures(m),
                )
            )
        witness = WitnessStatus(
            configured=self.cfg.witness is not None,
            address=f"{self.cfg.witness.address}:{self.cfg.witness.port}"
            if self.cfg.witness
            else None,
            reachable=bool(self.witness_reachable),
        )
        return Status(
            cluster=self.cfg.cluster.name,
            node=NodeStatus(
                name=self.node.name,
                address=str(self.node.address),
                version=__version__,
                config_hash=self.config_hash,
                started=self.started,
            ),
            peer=peer,
            witness=witness,
            modules=modules,
        )

    async def command(
        self, module: str, command: Command, timeout: float, wait: bool
    ) -> CommandResult:
        m = self.modules[module]
        now = time.monotonic()
        outcome = evaluate(command, self.view(m, now))

        def result(accepted: bool, done: bool, reason: str) -> CommandResult:
            p = self.peer_module(module, time.monotonic())
            return CommandResult(
                module=module,
                command=command.value,
                accepted=accepted,
                done=done,
                reason=reason,
                state=m.state,
                peer_state=p.state if p else None,
            )

        if not outcome.accepted:
            m.event("command", f"`{command.value}` refused: {outcome.reason}")
            return result(False, False, outcome.reason)
        m.event("command", f"`{command.value}` accepted: {outcome.reason}")
        if outcome.already:
            return result(True, True, outcome.reason)
        self.apply_intents(m, outcome.intents, now + timeout)
        if not wait:
            return result(True, False, outcome.reason)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await self.tick_done.wait()
            if Intent.RESTART_APP in outcome.intents:
                task = m.restart_task
                if task is not None and task.done():
                    return result(True, True, "application restarted")
                continue
            p = self.peer_module(module, time.monotonic())
            local_done = m.state in outcome.done_states and not (
                m.transition is not None and not m.transition.done()
            )
            peer_done = (
                outcome.peer_done_states is None or p is None or p.state in outcome.peer_done_states
            )
            if local_done and peer_done:
                return result(True, True, f"{outcome.reason}: done ({m.state})")
        return result(
            True,
            False,
            f"{outcome.reason}: not done after {timeout:g} s; now {m.state}: {m.reason}",
        )

    def apply_intents(self, m: ModuleRuntime, intents: frozenset[Intent], deadline: float) -> None:
        if Intent.RUN in intents:
            m.set_running(True, "")
            m.gave_up = None
            m.hold = None
            m.restarts.reset()
        if Intent.STOP in intents:
            m.set_running(False, "stopped by the administrator")
        if Intent.STOP_BOTH in intents:
            m.set_running(False, "stopped on both nodes by the administrator (`stop --all`)")
            m.mark_stop_all()
        if Intent.KILL in intents:
            m.kill_on_stop = True
        if Intent.RESTART_APP in intents:
            m.restart_app()
        if Intent.MAINTENANCE_ON in intents:
            m.set_maintenance(True)
        if Intent.MAINTENANCE_OFF in intents:
            m.set_maintenance(False)
        for intent in (Intent.HANDOVER, Intent.WANT_PRIMARY, Intent.FORCE_PRIMARY):
            if intent in intents:
                m.pending[intent.value] = deadline
        if Intent.FORCE_PRIMARY in intents:
            m.hold = None

    def events(self, module: str | None, after: int, limit: int) -> list[EventOut]:
        return [
            EventOut(
                id=e.id,
                ts=e.ts,
                node=e.node,
                module=e.module,
                kind=e.kind,
                state=e.state,
                reason=e.reason,
                detail=e.detail,
            )
            for e in self.store.events(module, after, limit)
        ]

    async def wait_event(self, after: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            recent = self.store.events(None, after, 1)
            if recent:
                return
            await asyncio.sleep(self.interval)
        raise TimeoutError


def state_dir_problem(cfg: ClusterConfig, state_dir: Path) -> str | None:
    """The state directory (journal, quarantine) must not be replicated itself."""
    where = Path(os.path.abspath(state_dir))
    for module in cfg.modules:
        for d in module.directories:
            if where == d.path or d.path in where.parents:
                return (
                    f"state directory {where} is inside {d.path}, replicated by module "
                    f"{module.name!r}; give --state-dir a path outside replicated directories"
                )
    return None


def replication_figures(m: ModuleRuntime) -> ReplicationFigures:
    if m.replication is None:
        return ReplicationFigures()
    st = m.replication.status()
    resync = st.get("resync")
    return ReplicationFigures(
        role=st["role"],
        connected=st["connected"],
        in_sync=st["in_sync"],
        generation=st["generation"],
        problem=st["problem"],
        lag_ms=float(st.get("lag_ms", 0.0)),
        ack_latency_ms=Latency(p50=st.get("ack_latency_ms_p50"), p99=st.get("ack_latency_ms_p99")),
        pending_bytes=int(st.get("pending_bytes", 0)),
        throughput_bps=float(st.get("throughput_bps", 0.0)),
        resync=ResyncStatus(**resync) if resync else None,
        quarantine_bytes=m.replication.quarantine_bytes(),
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tandem-agent", description="Tandem HA node agent (runs in the foreground)."
    )
    parser.add_argument("--config", required=True, help="the cluster YAML, identical on both nodes")
    parser.add_argument("--node", required=True, help="this node's name in the configuration")
    parser.add_argument("--state-dir", help="default /var/lib/tandem/NODE")
    parser.add_argument("--socket", help="API socket path (default /run/tandem/NODE.sock)")
    parser.add_argument("--debug", action="store_true", help="log at debug level")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("agent", args.node, logging.DEBUG if args.debug else logging.INFO)
    try:
        cfg = load_config(args.config)
        cfg.node(args.node)
    except ConfigError as exc:
        print(f"tandem-agent: configuration refused:\n{exc}", file=sys.stderr)
        return 1
    problems = node_checks(cfg, args.node)
    if problems:
        print(
            f"tandem-agent: {args.node} cannot run this configuration:\n" + "\n".join(problems),
            file=sys.stderr,
        )
        return 1
    state_dir = Path(args.state_dir or f"/var/lib/tandem/{args.node}")
    inside = state_dir_problem(cfg, state_dir)
    if inside:
        print(f"tandem-agent: cannot start: {inside}", file=sys.stderr)
        return 1
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        print(f"tandem-agent: cannot create state dir {state_dir}: {exc}", file=sys.stderr)
        return 1
    socket_path = Path(args.socket) if args.socket else default_socket_path(args.node)
    try:
        agent = Agent(cfg, args.node, state_dir, socket_path)
    except KeyFileError as exc:
        print(f"tandem-agent: {exc}", file=sys.stderr)
        return 1
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, -5)  # heartbeats must not starve under load
    try:
        return asyncio.run(agent.run())
    except OSError as exc:  # a port or socket path taken, an address gone: say which
        print(f"tandem-agent: cannot start: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
