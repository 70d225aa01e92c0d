"""One module's mirror process on one node: `python -m agent.mirror.process SPEC CONTROL_FD`.

A process of its own, not threads of the agent: FUSE handlers move data at
GB/s and the agent's decision loop and heartbeats must never wait behind them
for the interpreter lock. It dies with the agent (PR_SET_PDEATHSIG), so an
agent killed -9 never leaves a mirror serving writes no one supervises; the
guard kills the application, and the next agent clears the dead mount.

Roles:
- primary: each replicated directory is mounted over itself through MirrorFS;
  writes stream to the peer (or are journalled while ALONE).
- secondary: each directory is bind-mounted read-only over itself; the receiver
  writes underneath through descriptors opened before the bind.

Control: JSON lines over a Unix socket with the agent (commands in, events
out); the agent passes accepted replication sockets with SCM_RIGHTS.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.core import mirror_frames as mf
from agent.core.activity import Kind, given_back_entries, journal_entries, moved_ranges
from agent.core.journal_state import Entry
from agent.keys import load_key
from agent.mirror import link, quarantine
from agent.mirror.apply import Applier
from agent.mirror.excludes import Excludes
from agent.mirror.fs import MirrorMount, clear_stale_mount
from agent.mirror.journal import ActivityLog, Journal, JournalError
from agent.mirror.receiver import Receiver
from agent.mirror.resync_source import Progress, RateLimit, SourceResync, verify_root
from agent.mirror.sender import LinkState, MirrorReplicator

PR_SET_PDEATHSIG = 1
FIGURES_EVERY = 1.0


class Control:
    """The JSON-lines channel to the agent (thread-safe sends)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self._buffer = b""

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        with self._lock, contextlib.suppress(OSError):
            self.sock.sendall(data)

    def receive(self) -> tuple[dict[str, Any], list[int]] | None:
        """The next command and any descriptors sent with it; None when the agent is gone."""
        while b"\n" not in self._buffer:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 4)
            except OSError:
                return None
            if not data:
                return None
            self._buffer += data
            if fds:
                line, _, self._buffer = self._buffer.partition(b"\n")
                return json.loads(line), list(fds)
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line), []


def _excluded(patterns: list[str]) -> Callable[[str, bool], bool] | None:
    if not patterns:
        return None
    excluded: Callable[[str, bool], bool] = Excludes(patterns).excluded
    return excluded


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(1)


class MirrorProcess:
    """One module's mirror on this node; `run()` serves control commands until `stop`."""

    def __init__(self, spec: dict[str, Any], control: Control) -> None:
        self.spec = spec
        self.control = control
        self.module = str(spec["module"])
        self.node = str(spec["node"])
        self.dirs = [Path(d["path"]) for d in spec["dirs"]]
        self.excluded = [_excluded(list(d.get("exclude", []))) for d in spec["dirs"]]
        self.key = load_key(spec["key_file"])
        self.state_dir = Path(spec["state_dir"])
        self.mounts: list[MirrorMount] = []
        self.bound: list[Path] = []
        self.root_fds: list[int] = []
        self.replicator: MirrorReplicator | None = None
        self.progress: Progress | None = None
        self.receiver_thread: threading.Thread | None = None
        self.receiver: Receiver | None = None
        self._quarantine_dir: Path | None = None
        self.activity: ActivityLog | None = None
        self._verifier: threading.Thread | None = None
        self.adoption: dict[str, Any] = {}  # said in `ready`: the crash's keys were adopted
        self.carried: list[Entry] = []  # this node's own keys from a crash, for the next resync
        # Secondary: what this node's activity log says it may hold that the primary lacks
        # (left by a crash while it was primary), until a resync has made it the primary's.
        self.leftover: dict[str, Any] | None = None
        self._stopping = threading.Event()

    @property
    def activity_path(self) -> Path:
        return self.state_dir / f"{self.module}.activity"

    def event(self, message: dict[str, Any]) -> None:
        if message.get("event") == "control" and message.get("type") == "resync_done":
            # This copy is now exactly the primary's: nothing of its own is left to give back.
            self.leftover = None
            self.activity_path.unlink(missing_ok=True)
        self.control.send(message)

    # --- roles -------------------------------------------------------------------------------

    def start_primary(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        journal = Journal(self.state_dir / f"{self.module}.journal")
        for path in self.dirs:
            clear_stale_mount(path)
            _ensure_dir(path)
        if self.spec.get("adopt_activity"):
            self.adoption = self._adopt_leftover(journal)
        self.activity = ActivityLog(self.activity_path, keep_leftover=bool(self.carried))
        self.replicator = MirrorReplicator(
            self.spec.get("mode", "sync"),
            journal,
            ack_timeout=float(self.spec.get("ack_timeout", 5.0)),
            on_event=self.event,
            async_max_bytes=int(self.spec.get("async_max_bytes", 64 << 20)),
            async_max_age=float(self.spec.get("async_max_age", 5.0)),
            activity=self.activity,
        )
        for index, path in enumerate(self.dirs):
            excludes = Excludes(list(self.spec["dirs"][index].get("exclude", [])))
            mount = MirrorMount(path, index, self.replicator, excludes)
            mount.start()
            self.mounts.append(mount)
            self.root_fds.append(mount.dir_fd)
        threading.Thread(target=self._figures_loop, daemon=True).start()

    def promote(self, adopt_activity: bool = False) -> None:
        """Secondary → primary in place: no new process to start during a failover."""
        if self.receiver_thread is not None and self.receiver is not None:
            self.receiver.stop()  # a primary still sending must not write under us
            self.receiver_thread.join(10)
            if self.receiver_thread.is_alive():
                # Still applying (a stuck disk): its descriptors must not be closed and reused
                # under it. The agent reports this and does not serve here.
                self.event({"event": "promote_failed", "reason": "the receiver is still applying"})
                return
        for path in self.bound:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
        self.bound = []
        for fd in self.root_fds:
            os.close(fd)
        self.root_fds = []
        self.spec["role"] = "primary"
        self.spec["adopt_activity"] = adopt_activity
        try:
            self.start_primary()
        except Exception as exc:  # reported in words; the agent decides
            self.event({"event": "promote_failed", "reason": str(exc)})
            return
        self.event({"event": "promoted", **self.adoption})

    def start_secondary(self) -> None:
        for path in self.dirs:
            clear_stale_mount(path)
            _ensure_dir(path)
            self.root_fds.append(os.open(path, os.O_RDONLY | os.O_DIRECTORY))
        if self.activity_path.exists():
            self.leftover = self._leftover(self.root_fds)
            _run(["mount", "--bind", str(path), str(path)])
            self.bound.append(path)
            _run(["mount", "-o", "remount,bind,ro,nodev,nosuid", str(path)])

    # --- commands ----------------------------------------------------------------------------

    def connect(self, command: dict[str, Any]) -> None:
        """Primary: open the stream to the peer and resync as the agent decided."""
        assert self.replicator is not None
        peer = command["peer"]
        try:
            stream = link.connect(
                peer["address"],
                int(peer["port"]),
                self.key,
                cluster=str(self.spec["cluster"]),
                module=self.module,
                node=self.node,
            )
        except (link.LinkClosed, OSError, ValueError) as exc:
            self.event({"event": "connect_failed", "reason": str(exc)})
            return
        resync = str(command.get("resync", "none"))
        given_back: list[Entry] = list(self.carried)
        if command.get("activity"):
            # The peer crashed while primary: what its activity log names may differ here.
            try:
                answer = stream.request({"type": "activity"})
            except (link.LinkClosed, mf.StreamError) as exc:
                stream.close()
                self.event({"event": "connect_failed", "reason": str(exc)})
                return
            try:
                given_back += given_back_entries(answer, len(self.dirs))
            except ValueError as exc:
                self.event({"event": "activity_refused", "reason": str(exc)})
                resync = "full"
        journal = self.replicator.journal
        if resync == "none" and (
            not journal.state.empty or self.replicator.holds_ops() or self.carried
        ):
            resync = "incremental"  # written here after the peer last had our data
        if resync == "incremental" and not journal.usable:
            resync = "full"
        with self.replicator.ordered():
            self.replicator.absorb_held()
            own = journal.plan()
            if resync == "incremental":
                with contextlib.suppress(JournalError):  # then not usable: checked next
                    journal.adopt(given_back)
                if not journal.usable:
                    resync = "full"  # overflowed or failed while adopting the peer's keys
            if resync == "incremental" and journal.resyncing:
                # An earlier resync from this journal was cut short: the peer holds part of
                # it. Comparing the journal's names by hashes sends only what still differs.
                resync = "resume"
            plan = journal.plan()
            names = sorted(journal.names())
            compare = sorted(journal.compare_names())
            if resync != "none":
                try:
                    journal.begin_resync()
                except JournalError:
                    resync = "full"  # the journal is untrusted now: compare everything
            self.replicator.attach(stream)
            if resync in ("incremental", "resume"):
                if resync == "incremental":
                    # Names first, in the same locked section that attaches the stream: every
                    # live operation from now on comes after them.
                    for op in plan.namespace:
                        self.replicator.enqueue(op, live=False)
                self.replicator.resync_active = True
                self.replicator.renamed_during_resync = False
        self.event(
            {
                "event": "connected",
                "peer": stream.peer,
                "resync": resync,
                "given_back": len(given_back),
            }
        )
        quarantine_first = bool(command.get("quarantine"))
        # What this node's journal says changed is sent exactly; what the peer's activity log
        # named is compared by digests first (mostly the same bytes on both sides).
        ranges = {key: list(own.ranges.get(key, ())) for key in plan.ranges}
        hashed = moved_ranges(given_back, own.namespace) if given_back else {}
        threading.Thread(
            target=self._resync,
            args=(resync, ranges, list(plan.metadata), command.get("done", {}), quarantine_first),
            kwargs={"names": names, "compare": compare, "hashed": hashed},
            daemon=True,
        ).start()

    def _resync(
        self,
        kind: str,
        ranges: dict[tuple[int, str], list[tuple[int, int]]],
        meta: list[tuple[int, str]],
        done: dict[str, Any],
        quarantine_first: bool = False,
        names: list[tuple[int, str]] | None = None,
        compare: list[tuple[int, str]] | None = None,
        hashed: dict[tuple[int, str], list[tuple[int, int]]] | None = None,
    ) -> None:
        assert self.replicator is not None
        self.progress = Progress(started=time.monotonic())
        job = SourceResync(
            self.replicator,
            self.root_fds,
            self.excluded,
            self.progress,
            RateLimit(self.spec.get("resync_rate_bps")),
            quarantine=quarantine_first,
        )
        try:
            if kind != "none":
                self.replicator.resync_active = True
                self.replicator.enqueue_control({"type": "resync_begin"})
            if kind == "incremental":
                job.incremental(ranges, hashed or {})
                job.metadata_only(meta)
                if compare:
                    job.compare_names(compare)  # names the returning peer changed in flight
                if self.replicator.renamed_during_resync:
                    job.full()
            elif kind == "resume":
                job.compare_names(names or [])
                if self.replicator.renamed_during_resync:
                    job.full()
            elif kind == "full":
                job.full()
            if kind != "none":
                # From this marker on the secondary applies strictly again: every live op
                # it may have skipped came before it, and all of those are in `touched`.
                self.replicator.enqueue_control({"type": "resync_strict"})
                job.touched_pass(self.replicator.take_touched())
            ticket = self.replicator.enqueue_control({"type": "resync_done", **done})
            self.replicator.wait_acked(ticket)
        except link.LinkClosed as exc:
            self.replicator.abandon(str(exc))  # a stream left attached would never resync
            self.event({"event": "resync_interrupted", "reason": str(exc)})
            self.progress = None
            return
        finally:
            self.replicator.resync_active = False
        with self.replicator.ordered():
            # Once the link is lost and the node journals again (ALONE), the journal also holds
            # the writes the peer never acknowledged: it stays, and the next resync resumes.
            state = self.replicator.state
            if state is not LinkState.ALONE:
                self.replicator.journal.clear()
                self.carried = []
            if state is LinkState.CONNECTED and self.activity is not None:
                self.activity.settled(ticket)
        changed = [f"{self.dirs[r]}/{p}" for r, p in job.changed[:200]]
        sent = self.progress.sent_bytes
        self.event(
            {
                "event": "resync_done",
                "kind": kind,
                "changed": changed,
                "sent_bytes": sent,
                **self._progress(),
            }
        )
        self.progress = None

    def accept(self, command: dict[str, Any], fds: list[int]) -> None:
        """Secondary: take over an accepted stream the agent hands us and receive on it."""
        sock = socket.socket(fileno=fds[0])
        if self.receiver is not None and self.receiver_thread is not None:
            # The previous session first: frames of a stream thought dead (a cut link) can
            # still arrive late, and must never be applied after the new session's resync.
            self.receiver.stop()
            self.receiver_thread.join(10)
            if self.receiver_thread.is_alive():
                sock.close()
                self.event(
                    {"event": "bad_frame", "reason": "the previous stream is still applying"}
                )
                return
        try:
            hello = link.parse_hello_frame(bytes.fromhex(command["hello"]), self.key)
            stream = link.accept(sock, hello, self.key, self.node)
        except Exception as exc:
            sock.close()
            self.event({"event": "bad_frame", "reason": f"handshake failed: {exc}"})
            return
        applier = Applier(self.root_fds, [str(d) for d in self.dirs], self.excluded)
        receiver = Receiver(
            stream,
            applier,
            self.root_fds,
            self.event,
            self.excluded,
            self._quarantine,
            self._activity_answer,
        )

        def serve() -> None:
            self.event({"event": "receiving", "peer": hello.node})
            reason = receiver.run()
            applier.close()
            self.event({"event": "stream_ended", "reason": reason})

        self.receiver = receiver
        self.receiver_thread = threading.Thread(target=serve, daemon=True)
        self.receiver_thread.start()

    def _adopt_leftover(self, journal: Journal) -> dict[str, Any]:
        """This node crashed while primary and serves again: what its activity log names may
        differ on the peer, so the next resync carries it (read before anything is mounted)."""
        if not self.activity_path.exists():
            return {"adopt_refused": "no activity log"}
        fds = [os.open(path, os.O_RDONLY | os.O_DIRECTORY) for path in self.dirs]
        try:
            leftover = self._leftover(fds)
        finally:
            for fd in fds:
                os.close(fd)
        if not leftover["usable"]:
            return {"adopt_refused": leftover["reason"]}
        if not journal.usable:
            return {"adopt_refused": f"the journal cannot take them: {journal.reason}"}
        keys = [(int(k[0]), int(k[1]), str(k[2]), int(k[3])) for k in leftover["keys"]]
        # Given back at the next connect, as a returning peer's are: compared by digests.
        self.carried = journal_entries(keys, leftover["extent"])
        return {"adopted": len(keys)}

    def _leftover(self, root_fds: list[int]) -> dict[str, Any]:
        """What this node's activity log (left by a crash while primary) tells the new one."""
        log = ActivityLog.load(self.activity_path)
        try:
            keys = log.hot()
            usable, reason = log.usable, log.reason or ("written alone" if log.alone else "")
        finally:
            log.close()
        for kind, root, path, _index in keys:
            if usable and root >= len(root_fds):
                usable, reason = False, "it names a replicated directory no longer configured"
            elif usable and kind != Kind.NAME and _linked(root_fds[root], path):
                # Its other names are not in any journal: only hashes of everything find them.
                usable, reason = False, f"{self.dirs[root]}/{path} has several hard links"
        extent = log.extent_size
        return {
            "usable": usable,
            "reason": reason,
            "extent": extent,
            "keys": [list(k) for k in keys],
        }

    def _activity_answer(self) -> dict[str, Any]:
        if self.leftover is None:
            return {"type": "activity", "usable": False, "reason": "no activity log left here"}
        return {"type": "activity", **self.leftover}

    def _quarantine(self, root: int, paths: list[str]) -> None:
        """Keep this node's versions of `paths` before the resync replaces them."""
        if self._quarantine_dir is None:
            self._quarantine_dir = quarantine.new_directory(
                Path(self.spec["quarantine_dir"]), self.module
            )
        dest = self._quarantine_dir / str(root)
        count, size = quarantine.save(self.root_fds[root], paths, dest)
        self.event(
            {
                "event": "quarantined",
                "directory": str(self._quarantine_dir),
                "root": str(self.dirs[root]),
                "entries": count,
                "bytes": size,
            }
        )

    def verify(self, ident: object) -> None:
        """Primary: compare both sides by block hashes while the application runs."""
        assert self.replicator is not None
        started = time.monotonic()
        differing: list[str] = []
        compared = 0
        try:
            for root in range(len(self.root_fds)):
                found, count = verify_root(
                    self.replicator, self.root_fds[root], self.excluded[root], root
                )
                compared += count
                differing += [
                    f"{self.dirs[root]}/{p}" if p else str(self.dirs[root]) for p in found
                ]
        except link.LinkClosed as exc:
            self.event({"event": "verify_done", "id": ident, "error": f"verify stopped: {exc}"})
            return
        self.event(
            {
                "event": "verify_done",
                "id": ident,
                "differing": differing,
                "compared": compared,
                "seconds": round(time.monotonic() - started, 3),
            }
        )

    def _figures_loop(self) -> None:
        while not self._stopping.wait(FIGURES_EVERY):
            if self.replicator is None:
                continue
            figures = self.replicator.figures()
            message: dict[str, Any] = {"event": "figures", **figures.__dict__}
            if self.progress is not None:
                message["resync"] = self._progress()
            self.event(message)

    def _progress(self) -> dict[str, Any]:
        if self.progress is None:
            return {}
        return self.progress.as_dict(time.monotonic())

    def stop(self) -> None:
        self._stopping.set()
        for mount in self.mounts:
            mount.stop()
        for path in self.bound:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
        if self.replicator is not None:
            self.replicator.step_down("mirror stopped")
            self.replicator.journal.close()
        if self.activity is not None:
            self.activity.close()

    def run(self) -> None:
        while True:
            received = self.control.receive()
            if received is None:
                # The agent is gone without a `stop` (killed, crashed): die now, mounts left
                # in place. Unmounting here would let an application still running until the
                # guard kills it open the bare directory beneath and write unmirrored data that
                # it is told is safe; a dead mount fails those writes instead.
                os._exit(1)
            command, fds = received
            name = command.get("cmd")
            if name == "connect":
                self.connect(command)
            elif name == "accept":
                self.accept(command, fds)
            elif name == "alone" and self.replicator is not None:
                self.replicator.go_alone(str(command.get("reason", "peer lost")))
                self.event({"event": "alone"})
            elif name in ("suspect", "trust") and self.replicator is not None:
                within = float(command.get("within", 0.5)) if name == "suspect" else None
                self.replicator.suspect(within)
            elif name == "step_down" and self.replicator is not None:
                self.replicator.step_down(str(command.get("reason", "stepping down")))
            elif name == "promote" and self.replicator is None:
                self.promote(bool(command.get("adopt_activity")))
            elif name == "verify" and self.replicator is not None:
                ident = command.get("id")
                if self._verifier is not None and self._verifier.is_alive():
                    # One at a time: two would take each other's manifests off the stream.
                    reason = "the previous verify of this module is still running"
                    self.event({"event": "verify_done", "id": ident, "error": reason})
                elif self.progress is not None:
                    reason = "a resync is running: verify once it is done"
                    self.event({"event": "verify_done", "id": ident, "error": reason})
                else:
                    self._verifier = threading.Thread(
                        target=self.verify, args=(ident,), daemon=True
                    )
                    self._verifier.start()
            elif name == "stop":
                break
        self.stop()
        self.event({"event": "stopped"})


def _linked(root_fd: int, path: str) -> bool:
    """Whether the file at `path` under `root_fd` has more than one name."""
    try:
        st = os.stat(path, dir_fd=root_fd, follow_symlinks=False)
    except (OSError, ValueError):
        return False
    return st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode)


def _ensure_dir(path: Path) -> None:
    """A missing replicated directory is made when its parent exists (a fresh node);
    a missing parent more likely means a data disk not mounted, which must not be papered over.
    """
    if path.is_dir():
        return
    if path.exists():
        raise OSError(f"{path} is not a directory; replicated directories must be directories")
    if not path.parent.is_dir():
        raise OSError(
            f"{path} does not exist, nor does {path.parent}; create it (or mount its disk) "
            "on both nodes"
        )
    path.mkdir(mode=0o755)


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OSError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def main() -> int:
    spec = json.loads(sys.argv[1])
    control = Control(socket.socket(fileno=int(sys.argv[2])))
    _die_with_parent()
    signal.signal(
        signal.SIGTERM, lambda *_: None
    )  # the agent says `stop`; a TERM alone changes nothing
    process = MirrorProcess(spec, control)
    try:
        if spec["role"] == "primary":
            process.start_primary()
        else:
            process.start_secondary()
    except Exception as exc:
        process.stop()
        reason = str(exc) if isinstance(exc, OSError) and exc.errno is None else repr(exc)
        control.send({"event": "failed", "reason": reason})
        return 1
    control.send({"event": "ready", "role": spec["role"], **process.adoption})
    process.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
