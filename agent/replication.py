"""One module's replication on this node: its mirror process, data generations and sync status.

The agent's decision loop calls `tick()` after each decision; this object then
starts, commands or stops the mirror process so the replicated directories
match the node's role (DESIGN.md's state table: mirrored while PRIM, journalled
while ALONE, read-only and receiving while SECOND or WAIT, plain while STOP).

Data generations (agent.core.generations) are persisted here and advertised in
heartbeats; the comparison of both sides decides whether a connected secondary
is in sync, which direction a resync goes, or that the nodes are split.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import ClusterConfig, ModuleConfig
from agent.core.generations import (
    Generations,
    SplitSide,
    SyncVerdict,
    compare,
    plan_connect,
    policy_keeps,
)
from agent.core.states import State
from agent.logs import log_event
from agent.mirror import quarantine
from agent.mirror.handle import MirrorError, MirrorHandle
from agent.mirror.journal import ActivityLog, Journal
from agent.store import Store

log = logging.getLogger("tandem.replication")
RECONNECT_EVERY = 1.0


def _new_id() -> int:
    return secrets.randbits(63) or 1


@dataclass
class ReplicationRuntime:
    """The replication side of one module (only for modules with directories)."""

    cluster: ClusterConfig
    cfg: ModuleConfig
    node: str
    store: Store
    state_dir: Path
    wake: Callable[[], None]
    generations: Generations = field(default_factory=Generations)
    handle: MirrorHandle | None = None
    role: str | None = None
    connected: bool = False  # primary: stream attached; secondary: receiving
    in_sync: bool = False  # secondary: a resync from the current primary completed
    resyncing: bool = False
    resync: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # split brain, refused stream, failed apply...
    link_lost: str | None = None
    connect_at: float = 0.0
    retry_at: float = 0.0  # a mirror that failed to start is retried after a pause
    resolve_keep: tuple[str, float] | None = None  # (node to keep, wall time of the word)
    split_reported: bool = False
    _split_epoch: int = 0  # which split a change count running off the loop belongs to
    _split_count: asyncio.Task[None] | None = None
    verify_waiter: asyncio.Future[dict[str, Any]] | None = None
    verify_id: int = 0
    peer_name: str = ""
    primary_since: float = 0.0  # wall time this node last became primary (persisted)
    changes: list[str] | None = None  # changed here since the split (None: journal incomplete)
    _promoted: asyncio.Future[dict[str, Any]] | None = None
    stepped_down: bool = False
    shutting_down: bool = False
    _progress_logged: float = 0.0
    failed_connects: int = 0
    has_witness: bool = False
    witness_generation: int = 0  # what the witness last confirmed for this module
    journalling: bool = False  # the mirror was told to journal (no peer attached)
    suspecting: bool = False  # heartbeats lost: the stream must prove itself quickly
    suspect_after: float = 0.5
    _quarantine_size: int = 0
    _quarantine_measured: float = -1e9
    connecting: bool = False
    task: asyncio.Task[None] | None = None
    changed_files: list[str] = field(default_factory=list)

    pristine: bool = False  # the directories changed only through the mirror since the last sync
    # Not pristine only because this node crashed while primary: its activity log names every
    # place its copy may differ, so the new primary's resync can stay incremental.
    covered: bool = False

    def __post_init__(self) -> None:
        raw = self.store.get(self._key("generations"))
        if raw:
            data = json.loads(raw)
            self.generations = Generations(data["c"], data["b"], tuple(data["h"]))
        self.pristine = self.store.get(self._key("pristine")) == "1"
        self.covered = self.store.get(self._key("covered")) == "1"
        self.primary_since = float(self.store.get(self._key("primary_since")) or 0.0)
        self.peer_name = self.cluster.peer_of(self.node).name
        self.has_witness = self.cluster.witness is not None
        self.suspect_after = max(0.3, 2 * self.cluster.timing.heartbeat_interval)
        raw_keep = self.store.get(self._key("resolve"))
        if raw_keep:
            node, at = json.loads(raw_keep)
            self.resolve_keep = (str(node), float(at))
        if self.store.get(self._key("mounted")) == "1":
            # This node crashed while primary: writes in flight may be here and not on the
            # peer. Its activity log names where; without one, hashes compare everything.
            covered, why = self._activity_covers()
            if not self.pristine:
                # Stepped down, or stopped with changes outside the mirror, before the crash:
                # the log does not name those.
                covered, why = False, "its copy was not in sync before: a full resync follows"
            self._set_pristine(False, f"the agent stopped while primary: {why}")
            self._set_covered(covered)
            self.store.put(self._key("mounted"), "0")

    @property
    def activity_path(self) -> Path:
        return self.state_dir / "mirror" / f"{self.cfg.name}.activity"

    def _activity_covers(self) -> tuple[bool, str]:
        path = self.activity_path
        if not path.exists():
            return False, "no activity log, a full resync follows"
        try:
            log = ActivityLog.load(path)
        except OSError as exc:
            return False, f"its activity log cannot be read ({exc}), a full resync follows"
        try:
            if not log.usable:
                reason = log.reason or "writes were made alone"
                return False, (
                    f"its activity log does not cover it ({reason}): a full resync follows"
                )
            return True, (
                f"its activity log names {len(log.hot())} place(s) the peer may lack: the next "
                "resync sends those back"
            )
        finally:
            log.close()

    def _set_covered(self, covered: bool) -> None:
        if covered != self.covered:
            self.covered = covered
            self.store.put(self._key("covered"), "1" if covered else "0")

    def _set_pristine(self, pristine: bool, why: str) -> None:
        self._set_covered(False)  # only a crash while primary is covered, and only until a sync
        if pristine != self.pristine:
            self.pristine = pristine
            self.store.put(self._key("pristine"), "1" if pristine else "0")
            if not pristine:
                self.event("replication", why)

    @property
    def quarantine_dir(self) -> Path:
        return self.state_dir / "quarantine"

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "mirror" / f"{self.cfg.name}.journal"

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.directories)

    def _key(self, name: str) -> str:
        return f"module.{self.cfg.name}.{name}"

    def _save(self, generations: Generations, why: str) -> None:
        self.generations = generations
        data = {"c": generations.current, "b": generations.bitmap, "h": list(generations.history)}
        self.store.put(self._key("generations"), json.dumps(data))
        self.event("generation", f"data generation {generations.current:016x}: {why}")

    def event(self, kind: str, reason: str, **detail: object) -> None:
        self.store.add_event(kind, reason, module=self.cfg.name, detail=dict(detail) or None)
        log_event(log, reason, node=self.node, module=self.cfg.name, event=kind)

    def advertised(self) -> dict[str, Any]:
        """What the peer needs in our heartbeat, compact: 32 modules must fit in one datagram.

        g: generations (current, bitmap, newest history id); rx: receiving; p: pristine;
        al: not pristine, but its activity log names where (a crash while primary);
        ps: when this node last became primary; sb/jc: split seen, changes counted; rk: resolve.
        """
        g = self.generations
        out: dict[str, Any] = {"g": [g.current, g.bitmap, list(g.history[:1])]}
        if self.role == "secondary" and self.handle is not None:
            out["rx"] = 1
        if self.pristine:
            out["p"] = 1
        elif self.covered:
            out["al"] = 1
        if self.primary_since:
            out["ps"] = round(self.primary_since, 1)
        if self.split_reported:
            out["sb"] = 1
            out["jc"] = self.change_count()
        if self.resolve_keep:
            out["rk"] = [self.resolve_keep[0], round(self.resolve_keep[1], 3)]
        return out

    @staticmethod
    def peer_generations(raw: Any) -> Generations | None:
        try:
            current, bitmap, history = raw["g"]
            return Generations(int(current), int(bitmap), tuple(int(h) for h in history))
        except (KeyError, TypeError, ValueError):
            return None

    def verdict(self, peer: Generations | None) -> SyncVerdict | None:
        return None if peer is None else compare(self.generations, peer)

    def secondary_in_sync(self, peer: Generations | None) -> bool:
        """The state machine's `in_sync`: this copy holds exactly the primary's data.

        Same generation on both sides, and nothing changed here outside the mirror since. A
        stream that ends does not change that (the primary dying ends it first); a primary
        that carries on without us opens a new generation, which does.
        """
        self.in_sync = (
            peer is not None and self.pristine and self.verdict(peer) is SyncVerdict.IN_SYNC
        )
        return self.in_sync

    # --- the mirror process -------------------------------------------------------------------

    def spec(self, role: str) -> dict[str, Any]:
        return {
            "module": self.cfg.name,
            "node": self.node,
            "cluster": self.cluster.cluster.name,
            "role": role,
            "dirs": [
                {"path": str(d.path), "exclude": list(d.exclude)} for d in self.cfg.directories
            ],
            "mode": self.cfg.replication.mode,
            "async_max_bytes": self.cfg.replication.max_lag_bytes,
            "async_max_age": self.cfg.replication.max_lag_seconds,
            "resync_rate_bps": self.cfg.replication.resync_rate,
            "ack_timeout": self.cluster.timing.ack_timeout,
            "state_dir": str(self.state_dir / "mirror"),
            "quarantine_dir": str(self.quarantine_dir),
            "key_file": str(self.cluster.cluster.secret_file),
        }

    async def become_primary(self) -> None:
        """Before the application starts: the directories go through the mirror file system."""
        if self.role == "primary" and self.handle is not None and self.handle.alive:
            return
        # Writes land in the journal until the stream to the peer is attached, so the data
        # moves on from what the peer holds: a new generation, always (a swap included).
        self._save(self.generations.serving_alone(_new_id()), "primary: a new data generation")
        self.in_sync = False
        # Crashed while primary and serving again: the mirror carries its activity log's
        # places into the next resync, which then stays incremental (see _took_over).
        adopt = self.covered
        self.store.put(self._key("mounted"), "1")
        alive = self.role == "secondary" and self.handle is not None and self.handle.alive
        if alive and self.handle is not None:
            promoted = await self._promote(self.handle, adopt)
            if promoted is not None:
                self.primary_since = time.time()
                self.store.put(self._key("primary_since"), repr(self.primary_since))
                self._took_over(promoted, adopt)
                self.event("mirror", "replicated directories mounted through the mirror")
                return
        await self.stop_mirror()
        self.primary_since = time.time()
        self.store.put(self._key("primary_since"), repr(self.primary_since))
        handle = MirrorHandle(
            {**self.spec("primary"), "adopt_activity": adopt}, self.on_mirror_event
        )
        try:
            ready = await handle.start()
        except MirrorError:
            self.store.put(self._key("mounted"), "0")
            raise
        self._took_over(ready, adopt)
        self.handle, self.role = handle, "primary"
        self.connected = self.journalling = self.suspecting = False
        self.event("mirror", "replicated directories mounted through the mirror")

    def _took_over(self, answer: dict[str, Any], adopt: bool) -> None:
        """The mirror serves as primary; `answer` says whether it carries the activity log."""
        if "adopted" in answer:
            self._set_pristine(True, "")
            self.event(
                "replication",
                f"the {answer['adopted']} place(s) this node's activity log named go into its "
                "next resync: it stays incremental",
            )
        elif adopt:
            self.event("replication", f"activity log not used: {answer.get('adopt_refused')}")
        self._set_covered(False)  # this copy is the reference now, not one to mend

    async def _promote(self, handle: MirrorHandle, adopt: bool) -> dict[str, Any] | None:
        """Ask the running secondary to become primary in place (a failover's fast path); its
        `promoted` answer, or None."""
        loop = asyncio.get_running_loop()
        self._promoted = loop.create_future()
        if not handle.send({"cmd": "promote", "adopt_activity": adopt}):
            return None
        try:
            outcome = await asyncio.wait_for(self._promoted, 20.0)
        except TimeoutError:
            outcome = {"event": "promote_failed", "reason": "no answer in 20 s"}
        if outcome.get("event") != "promoted":
            self.event("mirror", f"in-place promotion failed: {outcome.get('reason')}; restarting")
            return None
        self.role = handle.role = "primary"
        self.connected = self.journalling = self.suspecting = False
        return outcome

    async def become_secondary(self) -> None:
        if self.role == "secondary" and self.handle is not None and self.handle.alive:
            return
        await self.stop_mirror()
        handle = MirrorHandle(self.spec("secondary"), self.on_mirror_event)
        await handle.start()
        self.handle, self.role = handle, "secondary"
        self.connected = False
        self.in_sync = False

    async def stop_mirror(self, stopped: bool = False) -> None:
        """Stop the mirror process; `stopped`: the module is stopped here (directories plain)."""
        if self.handle is not None:
            handle, self.handle = self.handle, None
            await handle.stop()
            if self.role == "primary":
                self.store.put(self._key("mounted"), "0")
        if stopped:
            self._set_pristine(
                False, "module stopped: changes to its directories are found by hashes"
            )
        self.role = None
        self.connected = False
        self.connecting = False
        self.resyncing = False

    def on_mirror_event(self, message: dict[str, Any]) -> None:
        kind = message.get("event")
        if kind == "figures":
            self.figures = {k: v for k, v in message.items() if k not in ("event", "resync")}
            if "resync" in message:
                self.resync = message["resync"]
                self._progress_event(self.resync)
            return
        if kind == "connected":
            self.connected, self.connecting, self.resyncing = True, False, True
            self.journalling = False
            given_back = int(message.get("given_back") or 0)
            self.event(
                "replication",
                f"mirroring to {message.get('peer')}: {message.get('resync')} resync"
                + (
                    f", with {given_back} place(s) the peer's activity log named"
                    if given_back
                    else ""
                ),
            )
        elif kind == "activity_refused":
            self.event("replication", f"{message.get('reason')}: comparing everything by hashes")
        elif kind == "connect_failed":
            self.connecting = False
            self.problem = str(message.get("reason"))
        elif kind == "link_lost":
            self.link_lost = str(message.get("reason"))
            self.connected = False
            self.event("replication", f"replication link lost: {self.link_lost}")
            if self.shutting_down:
                self.step_down("the agent is stopping and the peer is gone")
        elif kind == "resync_done":
            self.resyncing = False
            self.resync = {}
            self._save(
                self.generations.after_resync_as_source(), "resync done, the peer is in sync"
            )
            self._set_pristine(True, "")
            self.failed_connects = 0
            changed = message.get("changed") or []
            self.event(
                "resync", f"resync done ({message.get('kind')}): {len(changed)} paths differed"
            )
        elif kind == "resync_interrupted":
            self.resyncing = False
            self.event("resync", f"resync interrupted: {message.get('reason')}")
        elif kind == "receiving":
            self.connected = True
            self.event("replication", f"receiving from {message.get('peer')}")
        elif kind == "control" and message.get("type") == "resync_done":
            source = self.peer_generations(message)
            if source is not None:
                self._save(
                    self.generations.after_resync_as_target(source), "resynced from the primary"
                )
            # This copy is now the primary's: a journal of its own earlier changes means nothing.
            self.journal_path.unlink(missing_ok=True)
            self._set_pristine(True, "")
        elif kind == "stream_ended":
            self.connected = False
            self.event("replication", f"replication stream ended: {message.get('reason')}")
        elif kind in ("apply_failed", "bad_frame"):
            self.problem = str(message.get("reason"))
            self.event("replication", f"{kind.replace('_', ' ')}: {self.problem}")
        elif kind == "quarantined":
            self._quarantine_measured = -1e9
            self.event(
                "quarantine",
                f"kept {message.get('entries')} of this node's files ({message.get('bytes')} "
                f"bytes) from {message.get('root')} in {message.get('directory')}; remove them "
                "when you are done with them",
            )
        elif kind in ("promoted", "promote_failed"):
            if self._promoted is not None and not self._promoted.done():
                self._promoted.set_result(message)
        elif kind == "verify_done":
            waiter = self.verify_waiter
            # A late answer to a verify that timed out is not the answer to this one.
            if waiter is not None and not waiter.done() and message.get("id") == self.verify_id:
                waiter.set_result(message)
        elif kind == "exited":
            self.connected = False
        self.wake()

    # --- after each decision -------------------------------------------------------------------

    def tick(
        self, state: State, peer_raw: Any, peer_address: str, peer_port: int, now: float
    ) -> None:
        if not self.enabled or self.handle is None or self.role != "primary":
            return
        if not state.is_serving:
            # A planned handover keeps mirroring (or journalling) while the application shuts
            # down cleanly. Only writes held with nowhere to go (no peer, no journal yet) fail:
            # they are never acknowledged when this node may not serve.
            if not (self.connected or self.journalling or self.stepped_down):
                self.step_down(f"this node is {state} now")
            return
        self.stepped_down = False
        peer = self.peer_generations(peer_raw) if isinstance(peer_raw, dict) else None
        if self.link_lost is not None:
            reason, self.link_lost = self.link_lost, None
            self._save(self.generations.serving_alone(_new_id()), f"serving alone: {reason}")
            self.connected = self.connecting = self.journalling = False
        # Heartbeats lost but the stream alive (a heartbeat-only cut): mirroring goes on,
        # so the peer stays in sync; a stream that stalls now is given up quickly.
        suspect = state is State.ALONE and self.connected
        if suspect != self.suspecting:
            self.suspecting = suspect
            self.handle.send(
                {"cmd": "suspect" if suspect else "trust", "within": self.suspect_after}
            )
        if (
            not (self.connected or self.connecting or self.journalling)
            and self.generation_confirmed()
        ):
            # Writes were held until now: the witness records this generation first, so a
            # peer that never gets them can never be let in as primary on older data.
            self.journalling = True
            self.handle.send({"cmd": "alone", "reason": "journalling until the peer is back"})
        if state is not State.PRIM or self.connected or self.connecting or peer is None:
            return
        if not peer_raw.get("rx") or now < self.connect_at:
            return
        if not self.generation_confirmed():
            # Connecting releases the writes held since the new generation began (they go
            # into the journal the resync sends): not before the witness knows of it, or a
            # peer that missed them could still be let in as primary.
            return
        verdict = compare(self.generations, peer)
        split = verdict in (SyncVerdict.SPLIT_BRAIN, SyncVerdict.UNRELATED)
        plan = plan_connect(
            verdict,
            peer_empty=peer.is_empty,
            here_pristine=self.pristine,
            peer_pristine=bool(peer_raw.get("p")),
            kept_here=split and self.keep_resolved(peer_raw) == self.node,
            peer_covered=bool(peer_raw.get("al")),
        )
        if plan.problem is not None:
            self.problem = plan.problem
        if plan.resync is None:
            return
        # A stream that keeps failing (a full disk on the peer) is retried ever less often.
        self.connect_at = now + min(30.0, RECONNECT_EVERY * 2 ** min(self.failed_connects, 8))
        self.failed_connects += 1
        self.connecting = True
        g = self.generations.after_resync_as_source()
        done = {"g": [g.current, g.bitmap, list(g.history)]}
        self.handle.send(
            {
                "cmd": "connect",
                "peer": {"address": peer_address, "port": peer_port},
                "resync": plan.resync,
                "done": done,
                "quarantine": plan.quarantine,
                "activity": plan.activity,
            }
        )

    # --- split brain -----------------------------------------------------------------------------

    def keep_resolved(self, peer_raw: Any) -> str | None:
        """The node an administrator chose to keep (here or on the peer: the later word wins)."""
        mine = self.resolve_keep
        theirs = peer_raw.get("rk") if isinstance(peer_raw, dict) else None
        if isinstance(theirs, list) and len(theirs) == 2:
            node, at = theirs[0], _number(theirs[1])
            if mine is None or at > mine[1]:
                return str(node)
        if mine is not None:
            return mine[0]
        return self.policy_choice(peer_raw)

    def policy_choice(self, peer_raw: Any) -> str | None:
        """The node an automatic split-brain policy keeps, or None (manual, or a tie)."""
        policy = self.cfg.replication.split_brain
        if (
            policy == "manual"
            or not self.split_reported
            or not isinstance(peer_raw, dict)
            or not peer_raw.get("sb")
        ):
            return None  # also until both sides have seen the split and counted their changes
        here = SplitSide(self.node, self.primary_since, self.change_count())
        peer = SplitSide(
            self.peer_name, _number(peer_raw.get("ps")), int(_number(peer_raw.get("jc"), -1))
        )
        return policy_keeps(policy, here, peer)

    def observe(self, peer_raw: Any, serving: bool) -> None:
        """Every tick, on both sides: report a split brain (once), clear it when it is over."""
        peer = self.peer_generations(peer_raw) if isinstance(peer_raw, dict) else None
        if peer is None:
            return  # the peer unheard: a split brain reported (and its resolve) stands
        verdict = compare(self.generations, peer)
        split = verdict in (SyncVerdict.SPLIT_BRAIN, SyncVerdict.UNRELATED)
        if not split:
            if self.split_reported:
                self.split_reported = False
                self._split_epoch += 1  # a count still running is for a split that is over
                self.changes = None
                self.problem = None
                self.resolve_keep = None
                self.store.put(self._key("resolve"), "")
            return
        keep = self.keep_resolved(peer_raw)
        by_policy = self.resolve_keep is None and not (peer_raw or {}).get("rk")
        if keep is not None and by_policy:
            primary = self.node if serving else self.peer_name
            self.problem = (
                f"split brain: policy {self.cfg.replication.split_brain} keeps {keep}'s data"
            )
            if keep != primary:
                self.problem += (
                    f"; {keep} is not primary: make it primary (`tandemctl prim --force`) "
                    "or resolve by hand"
                )
        elif keep is not None:
            self.problem = f"split brain: resolving, keeping {keep}'s data"
        else:
            self.problem = (
                "split brain: both nodes changed the data since they last met; keep one side "
                "with `tandemctl resolve MODULE --keep NODE` (the other side's files go to "
                "quarantine)"
            )
        if not self.split_reported:
            self.split_reported = True
            self._split_epoch += 1
            self.changes = None  # unknown until counted: no policy decides on it meanwhile
            task = asyncio.get_running_loop().create_task(
                self._report_split(verdict, self._split_epoch)
            )
            task.add_done_callback(self._split_counted)
            self._split_count = task

    def _split_counted(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log_event(
                log, f"counting this node's changes failed: {exc!r}", node=self.node,
                module=self.cfg.name,
            )  # fmt: skip

    async def _report_split(self, verdict: SyncVerdict, epoch: int) -> None:
        """Count and report what changed here, reading the journal (tens of MiB at worst) off
        the decision loop, which must keep its heartbeats going meanwhile."""
        try:
            changed = await asyncio.to_thread(self.changed_here)
        except OSError as exc:
            log_event(log, f"cannot read the journal: {exc}", node=self.node, module=self.cfg.name)
            changed = None
        if epoch != self._split_epoch:
            return
        self.changes = changed
        if changed is None:
            what = "unknown (journal incomplete: compare with `tandemctl verify`)"
            changed = []
        else:
            listed = ", ".join(changed[:50]) + (" ..." if len(changed) > 50 else "")
            what = f"{len(changed)} path(s){': ' + listed if changed else ''}"
        self.event(
            "split_brain",
            f"split brain with the peer ({verdict}): changed here since the split: {what}",
            changed=changed[:1000],
        )
        self.wake()

    def change_count(self) -> int:
        """Paths this node changed since the split (discard-least-changes); -1: unknown."""
        return -1 if self.changes is None else len(self.changes)

    def changed_here(self) -> list[str] | None:
        """What this node changed since the last sync, from its journal (names, not data);
        None when the journal is incomplete (overflowed or damaged)."""
        if not self.journal_path.exists():
            return []
        with tempfile.TemporaryDirectory() as tmp:
            # A copy: the mirror process may be appending to the journal right now.
            copy = Path(tmp) / "journal"
            shutil.copyfile(self.journal_path, copy)
            journal = Journal(copy)
            try:
                # Not the names a returning peer's activity log added: those are its changes.
                names = journal.names() - journal.state.differs
                trusted = journal.usable
            finally:
                journal.close()
        if not trusted:
            return None
        dirs = self.cfg.directories
        return sorted(f"{dirs[root].path}/{path}" for root, path in names if root < len(dirs))

    def resolve(self, keep: str) -> None:
        """Remember the administrator's choice; the kept node's next connect resyncs from it."""
        self.resolve_keep = (keep, time.time())
        self.store.put(self._key("resolve"), json.dumps(list(self.resolve_keep)))
        self.event(
            "resolve",
            f"split brain: keeping {keep}'s data; the other side's differing files go to "
            "quarantine",
        )

    def step_down(self, reason: str) -> None:
        """Fail held writes with EIO; what they left here is found by hashes at the next sync."""
        if self.handle is None or self.stepped_down:
            return
        self.stepped_down = True
        self.handle.send({"cmd": "step_down", "reason": reason})
        self._set_pristine(
            False, "stepped down with writes never mirrored: the next resync compares by hashes"
        )

    def _progress_event(self, resync: dict[str, Any]) -> None:
        """Resync progress in the event log (and so the event stream), every 5 s."""
        now = time.monotonic()
        if now - self._progress_logged < 5.0 or not resync.get("total_bytes"):
            return
        self._progress_logged = now
        done, total = int(resync["done_bytes"]), int(resync["total_bytes"])
        eta = resync.get("eta_s")
        self.event(
            "resync",
            f"resync {done >> 20}/{total >> 20} MiB ({100 * done // max(total, 1)}%) at "
            f"{int(resync.get('rate_bps') or 0) >> 20} MiB/s, ETA "
            f"{'?' if eta is None else f'{eta:.0f} s'}",
            **resync,
        )

    def generation_confirmed(self) -> bool:
        """The witness (if any) has recorded this node's current data generation."""
        return not self.has_witness or self.witness_generation == self.generations.current

    def hand_stream(self, hello_raw: bytes, fd: int) -> str | None:
        """A checked incoming stream for this module: give it to the receiver (None) or refuse."""
        if self.handle is None or self.role != "secondary":
            return "this node is not a secondary for the module"
        if not self.handle.send({"cmd": "accept", "hello": hello_raw.hex()}, (fd,)):
            return "the receiver is not running"
        return None

    def quarantine_bytes(self) -> int:
        """Size of this module's quarantine, re-measured at most every 10 s."""
        now = time.monotonic()
        if now - self._quarantine_measured > 10.0:
            self._quarantine_size = quarantine.size_of(self.quarantine_dir, self.cfg.name)
            self._quarantine_measured = now
        return self._quarantine_size

    def status(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "connected": self.connected,
            "in_sync": self.in_sync,
            "resync": self.resync if self.resyncing else None,
            "generation": f"{self.generations.current:016x}",
            "problem": self.problem,
            **self.figures,
        }

    async def shutdown(self) -> None:
        if self._split_count is not None:
            self._split_count.cancel()
        with contextlib.suppress(Exception):
            await self.stop_mirror()


__all__ = ["MirrorError", "ReplicationRuntime"]


def _number(value: Any, default: float = 0.0) -> float:
    """A number from the peer's heartbeat; `default` for anything else (missing, another
    release, damage)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return float(value)
