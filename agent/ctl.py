"""tandemctl: the command line for operators and scripts (⚑ exit codes: 0 done, 1 refused,
2 usage error, 3 agent unreachable)."""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from rich.console import Console
from rich.table import Table

from agent.keys import KeyFileError, generate_key_file
from agent.paths import SocketNotFound, find_socket

if TYPE_CHECKING:  # pydantic models load in a quarter second: only where they are used
    from agent.api.schemas import EventOut, ReplicationFigures, Status

DONE, REFUSED, USAGE, UNREACHABLE = 0, 1, 2, 3

STATE_STYLE = {
    "STOP": "grey50",
    "WAIT": "bold red",
    "ALONE": "bold dark_orange",
    "PRIM": "bold green",
    "SECOND": "green",
}

MODULE_COMMANDS = ["start", "stop", "forcestop", "restart", "swap", "prim", "second"]


class Unreachable(Exception):
    pass


class Refused(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandemctl", description="Tandem HA command line.")
    parser.add_argument("--socket", help="the agent's API socket")
    parser.add_argument("--node", help="the local node's name ($TANDEM_NODE)")
    parser.add_argument("--agent", help="a remote agent's URL (HTTPS, coming with remote access)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (60)")
    parser.add_argument("--no-wait", action="store_true", help="return once accepted")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    status = sub.add_parser("status", help="nodes, links and modules")
    status.add_argument("--json", action="store_true", help="the API's status document")

    for name in MODULE_COMMANDS:
        p = sub.add_parser(name, help=f"{name} a module")
        p.add_argument("module")
        if name == "stop":
            p.add_argument("--all", action="store_true", help="stop on both nodes")
        if name == "prim":
            p.add_argument(
                "--force", action="store_true", help="override the data rule (may lose data)"
            )
        if name == "second":
            p.add_argument("--fullsync", action="store_true", help="resync everything")

    maint = sub.add_parser("maintenance", help="no failover, no checkers, for planned work")
    maint.add_argument("onoff", choices=["on", "off"])
    maint.add_argument("module")

    logs = sub.add_parser("logs", help="a module's event log")
    logs.add_argument("module")
    logs.add_argument("--follow", "-f", action="store_true")
    logs.add_argument("-n", type=int, default=50, help="how many past events (50)")

    for name in ("resolve", "verify"):
        p = sub.add_parser(name, help=f"{name} a module's replicated data")
        p.add_argument("module")
        if name == "resolve":
            p.add_argument("--keep", required=True, metavar="NODE")

    config = sub.add_parser("config", help="validate or apply a cluster configuration")
    config_sub = config.add_subparsers(dest="config_cmd", required=True)
    validate = config_sub.add_parser("validate", help="check a cluster YAML")
    validate.add_argument("file")
    apply = config_sub.add_parser("apply", help="apply a cluster YAML on both nodes")
    apply.add_argument("file")

    keygen = sub.add_parser("keygen", help="write a new cluster key")
    keygen.add_argument("file")
    return parser


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the agent's Unix socket (the stdlib's client: tandemctl starts fast)."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("agent", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    """The local agent's API over its Unix socket."""

    def __init__(self, socket_path: Path, timeout: float) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def call(
        self,
        method: str,
        path: str,
        json_body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        if params:
            query = {k: v for k, v in params.items() if v is not None}
            path = f"{path}?{urllib.parse.urlencode(query)}"
        body = json.dumps(json_body).encode() if json_body is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(
                f"cannot reach the agent at {self.socket_path}: {exc}; is tandem-agent running?"
            ) from None
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = raw.decode(errors="replace")
        if response.status >= 400:
            detail = data.get("detail", data) if isinstance(data, dict) else data
            raise Refused(str(detail))
        return data


def fail(code: int, message: str) -> NoReturn:
    print(f"tandemctl: {message}", file=sys.stderr)
    raise SystemExit(code)


def client_for(args: argparse.Namespace, timeout: float) -> Client:
    if args.agent:
        fail(
            USAGE,
            "--agent (remote HTTPS access) is not available yet; run tandemctl on the node itself",
        )
    try:
        path = find_socket(args.socket, args.node)
    except SocketNotFound as exc:
        fail(USAGE if exc.usage else UNREACHABLE, str(exc))
    return Client(path, timeout)


def print_status(status: Status, console: Console) -> None:
    peer = status.peer
    reach = "[green]reachable[/]" if peer.reachable else "[bold red]unreachable[/]"
    console.print(
        f"[bold]cluster[/] {status.cluster}   [bold]node[/] {status.node.name} "
        f"({status.node.address})   [bold]peer[/] {peer.name} ({peer.address}) {reach}"
    )
    for link in peer.links:
        state = "[green]up[/]" if link.up else "[red]down[/]"
        silent = "never heard" if link.silent_for is None else f"heard {link.silent_for:.2f} s ago"
        console.print(f"  link {link.index}: {link.local} ↔ {link.peer} {state} ({silent})")
    if peer.problem:
        console.print(f"  [bold red]problem:[/] {peer.problem}")
    w = status.witness
    if w.configured:
        wstate = "[green]reachable[/]" if w.reachable else "[bold red]unreachable[/]"
        console.print(f"  witness {w.address} {wstate}")
    else:
        console.print("  witness: none configured")
    table = Table(show_lines=False, header_style="bold")
    for column in (
        "MODULE",
        status.node.name.upper(),
        peer.name.upper(),
        "DATA",
        "VIP",
        "SERVICE",
        "REASON",
    ):
        table.add_column(column, overflow="fold")
    for m in status.modules:
        mine = f"[{STATE_STYLE[m.state]}]{m.state}[/]"
        theirs = f"[{STATE_STYLE[m.peer_state]}]{m.peer_state}[/]" if m.peer_state else "?"
        vip = (m.vip or "-") + (" (held)" if m.vip_held else "")
        flags = " [maintenance]" if m.maintenance else ""
        table.add_row(m.name, mine + flags, theirs, m.data, vip, m.service, m.reason)
    console.print(table)
    for m in status.modules:
        line = replication_line(m.replication)
        if line:
            console.print(f"  {m.name}: {line}")


def replication_line(r: ReplicationFigures) -> str:
    """One line of replication figures; empty for a module without replicated directories."""
    if r.role is None and r.generation is None:
        return ""
    if r.role == "primary":
        where = "mirroring to the peer" if r.connected else "[orange1]not mirroring (journal)[/]"
    elif r.role == "secondary":
        where = "receiving" if r.connected else "[orange1]not receiving[/]"
        where += ", in sync" if r.in_sync else ", [orange1]not in sync[/]"
    else:
        where = "not running"
    parts = [where]
    if r.resync is not None:
        done = r.resync
        pct = 100.0 * done.done_bytes / done.total_bytes if done.total_bytes else 100.0
        eta = "?" if done.eta_s is None else f"{done.eta_s:.0f} s"
        parts.append(
            f"resync {_size(done.done_bytes)}/{_size(done.total_bytes)} ({pct:.0f}%) "
            f"at {_size(done.rate_bps)}/s, ETA {eta}"
        )
    if r.role == "primary" and r.connected:
        parts.append(
            f"lag {r.lag_ms:.0f} ms, ack p50 {r.ack_latency_ms.p50 or 0:.2f} ms "
            f"p99 {r.ack_latency_ms.p99 or 0:.2f} ms, pending {_size(r.pending_bytes)}, "
            f"{_size(r.throughput_bps)}/s"
        )
    if r.problem:
        parts.append(f"[bold red]{r.problem}[/]")
    return "; ".join(parts)


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def print_event(event: EventOut, console: Console) -> None:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.ts))
    state = f" [{STATE_STYLE.get(event.state or '', '')}]{event.state}[/]" if event.state else ""
    console.print(
        f"{when} {event.node} {event.module or '-'} {event.kind}{state}: {event.reason}",
        highlight=False,
    )


def run_command(args: argparse.Namespace, client: Client) -> int:
    command = args.cmd
    if command == "stop" and args.all:
        command = "stop-all"
    if command == "prim" and args.force:
        command = "prim-force"
    if command == "maintenance":
        command = f"maintenance-{args.onoff}"
    if command == "second" and args.fullsync:
        fail(
            REFUSED,
            "--fullsync: stop and start the module on the secondary (`tandemctl stop "
            f"{args.module}`, then `tandemctl start {args.module}` there): a secondary that was "
            "stopped is always compared with the primary block by block",
        )
    body = {"command": command, "timeout": args.timeout, "wait": not args.no_wait}
    # A plain dict (API schema CommandResult): pydantic would cost this command its speed.
    result = client.call("POST", f"/api/v1/modules/{args.module}/commands", json_body=body)
    print(result["reason"])
    if not result["accepted"]:
        return REFUSED
    if not result["done"] and not args.no_wait:
        return REFUSED
    return DONE


def run_logs(args: argparse.Namespace, client: Client, console: Console) -> int:
    from agent.api.schemas import EventOut

    events = [
        EventOut.model_validate(e)
        for e in client.call(
            "GET", "/api/v1/events/log", params={"module": args.module, "limit": args.n}
        )
    ]
    for event in events:
        print_event(event, console)
    last = events[-1].id if events else 0
    while args.follow:
        time.sleep(0.5)
        for raw in client.call(
            "GET", "/api/v1/events/log", params={"module": args.module, "after": last}
        ):
            event = EventOut.model_validate(raw)
            print_event(event, console)
            last = event.id
    return DONE


def run_data_command(args: argparse.Namespace, client: Client) -> int:
    """resolve and verify: both answer with a DataResult."""
    if args.cmd == "resolve":
        raw = client.call(
            "POST", f"/api/v1/modules/{args.module}/resolve", json_body={"keep": args.keep}
        )
    else:
        raw = client.call(
            "POST", f"/api/v1/modules/{args.module}/verify", params={"timeout": args.timeout}
        )
    if not raw.get("accepted"):
        fail(REFUSED, f"{args.cmd} {args.module}: {raw.get('reason')}")
    print(f"{args.module}: {raw.get('reason')}")
    if args.cmd == "verify":
        for path in raw.get("differing", []):
            print(f"  differs: {path}")
        print(f"  ({raw.get('compared', 0)} entries compared in {raw.get('seconds', 0):.1f} s)")
        return DONE if not raw.get("differing") else REFUSED
    return DONE


def run_config(args: argparse.Namespace) -> int:
    from agent.config import ConfigError, load_config  # pydantic models: only when needed

    if args.config_cmd == "apply":
        fail(
            REFUSED,
            "config apply comes with remote access between agents; for now copy the "
            "file to both nodes and restart the agents",
        )
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        print(f"{args.file}: {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return REFUSED
    print(f"{args.file}: valid ({len(cfg.modules)} module(s), nodes {', '.join(cfg.node_names)})")
    return DONE


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(highlight=False)
    try:
        if args.cmd == "keygen":
            generate_key_file(args.file)
            print(
                f"wrote a new cluster key to {args.file} (mode 0600); copy it to both nodes "
                "and the witness"
            )
            return DONE
        if args.cmd == "config":
            return run_config(args)
        client = client_for(args, timeout=args.timeout + 10)
        if args.cmd in ("resolve", "verify"):
            return run_data_command(args, client)
        if args.cmd == "status":
            raw = client.call("GET", "/api/v1/status")
            if args.json:
                print(json.dumps(raw, indent=2))
            else:
                from agent.api.schemas import Status

                print_status(Status.model_validate(raw), console)
            return DONE
        if args.cmd == "logs":
            return run_logs(args, client, console)
        return run_command(args, client)
    except KeyFileError as exc:
        fail(REFUSED, str(exc))
    except Unreachable as exc:
        fail(UNREACHABLE, str(exc))
    except Refused as exc:
        fail(REFUSED, str(exc))
    except KeyboardInterrupt:
        return DONE


if __name__ == "__main__":
    raise SystemExit(main())
