"""tandem-witness: the arbitrator on a third host that grants each module's primary lease.

One witness serves several clusters: each cluster's key authenticates its
requests and signs the replies, and leases are kept per (key, cluster name,
module), so a node of one cluster can never touch another cluster's leases.
Every change of holder is written to disk (tmp + fsync + rename) before the
reply leaves, so a restarted witness never grants a lease twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from agent.core.arbiter import Arbiter
from agent.core.frames import (
    FrameError,
    LeaseReply,
    LeaseRequest,
    ReplayGuard,
    decode_any,
    encode,
)
from agent.keys import KeyFileError, load_key
from agent.logs import log_event, setup_logging

DEFAULT_STATE_DIR = "/var/lib/tandem-witness"
STATE_FILE = "leases.json"
STATE_FORMAT = 1
_DROP_LOG_EVERY = 10.0  # seconds between two warnings about the same kind of dropped datagram

log = logging.getLogger("agent.witness")
Snapshot = dict[tuple[str, str], tuple[str, float]]
Generations = dict[tuple[str, str], tuple[str, int]]


class UsageError(Exception):
    """A problem with the command line, the keys or the state: exit 2 with this message."""


def key_id(key: bytes) -> str:
    """A short public fingerprint of a cluster key, naming its leases in the state file."""
    return hashlib.sha256(b"tandem-witness key id\0" + key).hexdigest()[:16]


@dataclass
class WitnessStats:
    """What the witness answered and what it dropped."""

    requests: int = 0
    forged: int = 0
    malformed: int = 0
    version_mismatch: int = 0
    replayed: int = 0
    unanswered: int = 0  # granted in memory but not persisted: no reply sent


class StateStore:
    """The persisted lease holders: JSON written atomically and durably."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / STATE_FILE
        self.generations: Generations = {}  # filled by load()

    def load(self) -> Snapshot | None:
        """The persisted leases, or None if there is no state file yet."""
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UsageError(f"{self.path}: cannot read ({exc.strerror})") from None
        try:
            data = json.loads(raw)
            if data["format"] != STATE_FORMAT:
                raise ValueError(f"format {data['format']} is not {STATE_FORMAT}")
            leases: Snapshot = {}
            for entry in data["leases"]:
                cluster = f"{entry['key_id']}/{entry['cluster']}"
                duration = float(entry["duration"])
                if not isinstance(entry["holder"], str) or not duration > 0:
                    raise ValueError(f"bad lease entry {entry!r}")
                leases[(cluster, str(entry["module"]))] = (entry["holder"], duration)
            self.generations = {}
            for entry in data.get("generations", []):
                cluster = f"{entry['key_id']}/{entry['cluster']}"
                generation = int(entry["generation"])
                if not isinstance(entry["node"], str) or generation < 0:
                    raise ValueError(f"bad generation entry {entry!r}")
                self.generations[(cluster, str(entry["module"]))] = (entry["node"], generation)
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(
                f"{self.path}: corrupt lease records ({exc}); it holds which node is primary: "
                "restore it from a backup, or remove it only while no cluster node is primary"
            ) from None
        return leases

    def save(self, leases: Snapshot, generations: Generations | None = None) -> None:
        """Replace the state file with `leases` durably; raises OSError on failure."""
        entries: list[dict[str, Any]] = []
        for (cluster, module), (holder, duration) in sorted(leases.items()):
            kid, _, name = cluster.partition("/")
            entries.append(
                {
                    "key_id": kid,
                    "cluster": name,
                    "module": module,
                    "holder": holder,
                    "duration": duration,
                }
            )
        recorded: list[dict[str, Any]] = []
        for (cluster, module), (node, generation) in sorted((generations or {}).items()):
            kid, _, name = cluster.partition("/")
            recorded.append(
                {"key_id": kid, "cluster": name, "module": module, "node": node,
                 "generation": generation}
            )  # fmt: skip
        document = {"format": STATE_FORMAT, "leases": entries, "generations": recorded}
        text = json.dumps(document, indent=1) + "\n"
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a power loss
        finally:
            os.close(dir_fd)


class Witness:
    """Answers lease requests; the I/O-free part of the server, fed datagrams by the protocol."""

    def __init__(
        self, keys: Sequence[bytes], store: StateStore, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.keys = list(dict.fromkeys(keys))
        self._ids = {key: key_id(key) for key in self.keys}
        self.store = store
        self.clock = clock
        self.stats = WitnessStats()
        self._guard = ReplayGuard()
        self._dropped_logged: dict[str, float] = {}
        now = clock()
        restored = store.load()
        # Without a state file the witness cannot know who held a lease before: it waits a
        # lease period before granting a new holder (a holder's renewal is still granted).
        self.arbiter = Arbiter(started=now if restored is None else None)
        for key, (holder, duration) in (restored or {}).items():
            self.arbiter.restore({key: holder}, now, duration)
        self.arbiter.restore_generations(store.generations)
        self._persisted: Snapshot = dict(restored or {})
        self._persisted_generations: Generations = dict(store.generations)
        if restored is None:
            # From now on a restart finds a record and need not wait a lease period.
            self._save_or_exit({})
        if restored:
            log_event(log, "restored lease holders", event="restore", leases=len(restored))

    def _save_or_exit(self, leases: Snapshot) -> None:
        try:
            self.store.save(leases, self.arbiter.generations())
        except OSError as exc:
            raise UsageError(f"{self.store.path}: cannot write ({exc.strerror})") from None

    def _snapshot(self) -> Snapshot:
        return {k: (lease.holder, lease.duration) for k, lease in self.arbiter.leases().items()}

    def handle(self, data: bytes) -> bytes | None:
        """The signed reply to one datagram, or None if it is dropped."""
        try:
            key, frame = decode_any(self.keys, data)
        except FrameError as exc:
            if exc.kind == "forged":
                self.stats.forged += 1
            elif exc.kind == "version":
                self.stats.version_mismatch += 1
            else:
                self.stats.malformed += 1
            self._dropped(exc.kind, exc.reason)
            return None
        if not isinstance(frame, LeaseRequest):
            self.stats.malformed += 1
            self._dropped("malformed", f"unexpected {type(frame).__name__} frame")
            return None
        sender = f"{self._ids[key]}\0{frame.cluster}\0{frame.node}"
        if not self._guard.check(sender, 0, frame.incarnation, frame.seq):
            self.stats.replayed += 1
            self._dropped("replayed", f"replayed request from {frame.node}")
            return None
        self.stats.requests += 1
        cluster = f"{self._ids[key]}/{frame.cluster}"
        now = self.clock()
        verdicts = tuple(
            self.arbiter.decide(cluster, frame.node, item, frame.duration, now)
            for item in frame.items
        )
        if not self._persist():
            self.stats.unanswered += 1
            return None
        reply = LeaseReply(frame.cluster, frame.node, frame.incarnation, frame.seq, verdicts)
        return encode(key, reply)

    def _persist(self) -> bool:
        current = self._snapshot()
        generations = self.arbiter.generations()
        if current == self._persisted and generations == self._persisted_generations:
            return True
        try:
            # A generation is on disk before the reply that confirms it: the holder releases
            # writes made alone only once the witness can never forget they exist.
            self.store.save(current, generations)
        except OSError as exc:
            # No reply without the record: a grant the witness could forget is never given.
            log_event(
                log,
                "cannot persist lease holders; not answering",
                level=logging.ERROR,
                event="persist_failed",
                path=str(self.store.path),
                error=exc.strerror or str(exc),
            )
            return False
        for key in current.keys() | self._persisted.keys():
            before = self._persisted.get(key, (None, 0.0))[0]
            after = current.get(key, (None, 0.0))[0]
            if before != after:
                log_event(
                    log,
                    f"lease holder changed from {before or 'nobody'} to {after or 'nobody'}",
                    event="holder",
                    cluster=key[0].partition("/")[2],
                    key_id=key[0].partition("/")[0],
                    module=key[1],
                    holder=after,
                )
        self._persisted = current
        self._persisted_generations = generations
        return True

    def _dropped(self, kind: str, reason: str) -> None:
        now = self.clock()
        last = self._dropped_logged.get(kind)
        if last is not None and now - last < _DROP_LOG_EVERY:
            return
        self._dropped_logged[kind] = now
        log_event(
            log,
            f"dropped a {kind} datagram: {reason}",
            level=logging.WARNING,
            event="dropped",
            kind=kind,
            forged=self.stats.forged,
            malformed=self.stats.malformed,
            replayed=self.stats.replayed,
            version_mismatch=self.stats.version_mismatch,
        )


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, witness: Witness) -> None:
        self.witness = witness
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = self.witness.handle(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors about a reply: the requester is gone; it will ask again


def parse_listen(value: str) -> tuple[str, int]:
    """Split ADDR:PORT (IPv6 as [ADDR]:PORT); port 0 picks a free port."""
    host, sep, port_text = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected ADDR:PORT with an IP address, e.g. 198.18.0.254:7710"
        ) from None
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(
            f"{value!r}: the port must be a number from 1 to 65535 (0 picks a free one)"
        )
    return host, int(port_text)


def _sd_notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    target = "\0" + address[1:] if address.startswith("@") else address
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        sock.sendto(message.encode(), target)


async def serve(witness: Witness, host: str, port: int) -> None:
    """Answer lease requests on host:port until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(witness), local_addr=(host, port)
        )
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        bound = transport.get_extra_info("sockname")
        log_event(
            log,
            f"listening on {host}:{bound[1]}",
            event="listening",
            address=host,
            port=bound[1],
            clusters=len(witness.keys),
            state=str(witness.store.path),
        )
        _sd_notify("READY=1")
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        transport.close()
    s = witness.stats
    log_event(
        log,
        "stopped",
        event="stopped",
        requests=s.requests,
        forged=s.forged,
        malformed=s.malformed,
        replayed=s.replayed,
        version_mismatch=s.version_mismatch,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem-witness",
        description="Arbitrator for Tandem HA clusters: grants each module's primary lease.",
    )
    parser.add_argument(
        "--listen", required=True, type=parse_listen, metavar="ADDR:PORT", help="UDP address"
    )
    parser.add_argument(
        "--secret-file",
        required=True,
        action="append",
        metavar="FILE",
        help="a cluster key (repeat for each cluster this witness serves)",
    )
    parser.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"where lease holders are kept (default {DEFAULT_STATE_DIR})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the witness in the foreground; 0 after SIGTERM, 2 on a usage or setup problem."""
    args = _parser().parse_args(argv)
    host, port = args.listen
    setup_logging("witness", None)
    try:
        keys = [load_key(path) for path in args.secret_file]
        state_dir = Path(args.state_dir)
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--state-dir {state_dir}: cannot create ({exc.strerror})") from None
        if not os.access(state_dir, os.W_OK):
            raise UsageError(f"--state-dir {state_dir}: not writable; run as root or fix it")
        witness = Witness(keys, StateStore(state_dir))
        asyncio.run(serve(witness, host, port))
    except (KeyFileError, UsageError) as exc:
        print(f"tandem-witness: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
