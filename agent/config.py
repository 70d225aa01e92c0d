"""Cluster YAML -> typed, frozen models; every problem reported as "key.path: why; fix".

The contract is the "Cluster configuration" section of DESIGN.md. A wrong config is refused
whole: `parse_config`/`load_config` collect every problem of a file at once and raise one
`ConfigError`, never a pydantic, YAML or OS exception. `node_checks` adds what only the node
itself can see (interfaces, addresses, scripts, the key file).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shlex
import socket
import stat
import subprocess
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

MAX_MODULES = 32
CHECKER_TYPES = ("tcp", "process", "interface", "command")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
KEY_RE = re.compile(r"[0-9a-fA-F]{64}")
# Linux dev_valid_name(): at most 15 bytes, no '/', ':' or whitespace, not "." or "..".
IFNAME_RE = re.compile(r"[^\s/:]{1,15}")
UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\@-]{1,255}")

Loc = tuple[str | int, ...]


class ConfigError(Exception):
    """A configuration that is refused; `problems` holds one "key.path: why; fix" line each."""

    def __init__(self, problems: Sequence[str] | str, source: str = "<config>") -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


# --- field types: each refuses bad input with a message that says how to fix it -------------


def _check_name(value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid name; use 1-32 characters among lowercase letters, "
            "digits, '-' and '_', starting with a letter or digit (names become file, "
            "socket and cgroup names), e.g. 'web'"
        )
    return value


def _require_text(value: object) -> object:
    # pydantic would turn an integer into an IP address (10 -> 0.0.0.10): only text is meant.
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {_show(value)}; write the address, e.g. 198.18.0.1")
    return value


def _check_host_ip(value: IPv4Address) -> IPv4Address:
    if value.is_unspecified or value.is_multicast or value == IPv4Address("255.255.255.255"):
        raise ValueError(f"{value} is not a host address; give the address of one machine")
    return value


def _check_vip_text(value: object) -> object:
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {_show(value)}; write it as 198.18.0.100/24")
    if "/" not in value:
        raise ValueError(
            f"{value!r} has no prefix length; write address/prefix, e.g. {value}/24, "
            "as the subnet of the interface"
        )
    return value


def _check_vip(value: IPv4Interface) -> IPv4Interface:
    net = value.network
    if value.ip.is_unspecified or value.ip.is_multicast:
        raise ValueError(f"{value} is not a host address; choose a free address in the subnet")
    if net.prefixlen == 0:
        raise ValueError(f"{value} has prefix length 0; give the subnet's, e.g. /24")
    # /31 and /32 have no network or broadcast address (RFC 3021).
    if net.prefixlen <= 30 and value.ip in (net.network_address, net.broadcast_address):
        kind = "network" if value.ip == net.network_address else "broadcast"
        raise ValueError(
            f"{value.ip} is the {kind} address of {net}; choose a host address inside it"
        )
    return value


def _check_abs_path(value: object) -> object:
    if not isinstance(value, str):
        raise ValueError(f"expected a path, got {_show(value)}; write an absolute path")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError(f"{value!r} contains a control character; write a plain absolute path")
    if not value.startswith("/"):
        raise ValueError(
            f"{value!r} is a relative path; write it from the root, e.g. /{value.lstrip('./')}"
        )
    if ".." in PurePosixPath(value).parts:
        raise ValueError(f"{value!r} contains '..'; write the path without it")
    return value


def _check_ifname(value: str) -> str:
    if not IFNAME_RE.fullmatch(value) or value in (".", ".."):
        raise ValueError(
            f"{value!r} is not a network interface name; give a name such as eth0 "
            "(at most 15 characters, no '/', ':' or spaces)"
        )
    return value


def _check_unit(value: str) -> str:
    if not UNIT_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a systemd unit name; give one such as nginx.service")
    return value


def _check_interface_shape(value: object) -> object:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value:
        bad = [k for k, v in value.items() if not isinstance(k, str) or not isinstance(v, str)]
        if not bad:
            return value
    raise ValueError(
        f"expected an interface name or a mapping of node to interface, got {_show(value)}; "
        "write e.g. eth0 or {node1: eth0, node2: ens18}"
    )


def _check_command(value: object) -> object:
    if isinstance(value, str):
        try:
            words = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot split {value!r}: {exc}; fix the quoting") from None
    elif isinstance(value, list) and all(isinstance(w, str) for w in value):
        words = list(value)
    else:
        raise ValueError(
            f"expected a command line or a list of words, got {_show(value)}; "
            "write e.g. /usr/local/bin/check-web --quick"
        )
    if not words:
        raise ValueError("the command is empty; give the program's full path and its arguments")
    if not words[0].startswith("/"):
        raise ValueError(
            f"{value!r} does not start with an absolute path; give the program's full path, "
            "e.g. /usr/local/bin/check-web"
        )
    return value


Name = Annotated[str, AfterValidator(_check_name)]
Text = Annotated[str, Field(min_length=1)]
IPv4 = Annotated[IPv4Address, BeforeValidator(_require_text), AfterValidator(_check_host_ip)]
Vip = Annotated[IPv4Interface, BeforeValidator(_check_vip_text), AfterValidator(_check_vip)]
AbsPath = Annotated[Path, BeforeValidator(_check_abs_path)]
Port = Annotated[int, Field(ge=1, le=65535, strict=True)]
Seconds = Annotated[float, Field(gt=0, strict=True, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- the models -------------------------------------------------------------------------------


class ClusterSection(_Model):
    """The cluster's identity and the shared key that authenticates peer traffic."""

    name: Name
    secret_file: AbsPath


class NodeConfig(_Model):
    """One of the two servers: its API/replication address and one address per heartbeat net."""

    name: Name
    address: IPv4
    heartbeat: Annotated[list[IPv4], Field(min_length=1)]

    @model_validator(mode="before")
    @classmethod
    def _default_heartbeat(cls, data: Any) -> Any:
        if isinstance(data, dict) and "heartbeat" not in data and "address" in data:
            return {**data, "heartbeat": [data["address"]]}
        return data


class WitnessConfig(_Model):
    """The optional arbitrator on a third host."""

    address: IPv4
    port: Port = 7710


class Timing(_Model):
    """Failure detection timing, in seconds."""

    heartbeat_interval: Seconds = 0.25
    peer_timeout: Seconds = 1.5
    ack_timeout: Seconds = 5.0


class Ports(_Model):
    """The agent's ports; heartbeat is UDP, the others TCP."""

    api: Port = 7700
    heartbeat: Port = 7701
    peer: Port = 7702
    health: Port = 7703


class VipConfig(_Model):
    """A module's virtual IP and the interface that carries it (one name, or one per node)."""

    address: Vip
    interface: Annotated[str | dict[str, str], BeforeValidator(_check_interface_shape)]


class DirectoryConfig(_Model):
    """A replicated directory and the patterns left out of replication."""

    path: AbsPath
    exclude: list[Text] = Field(default_factory=list)


class ReplicationConfig(_Model):
    """How writes are mirrored: sync, flush or async (see DESIGN.md), and how resyncs behave.

    async: writes are acknowledged locally and wait only once the peer is behind by more than
    `max_lag_bytes` or `max_lag_seconds`. `resync_rate` caps what a resync sends (bytes per
    second; live writes are never held back by it). `split_brain`: `manual` (the default:
    an administrator runs `tandemctl resolve`) or an automatic policy that keeps one side
    and quarantines the other's files.
    """

    mode: Literal["sync", "flush", "async"] = "sync"
    max_lag_bytes: Annotated[int, Field(ge=1 << 20, strict=True)] = 64 << 20
    max_lag_seconds: Seconds = 5.0
    resync_rate: Annotated[int, Field(ge=1 << 20, strict=True)] | None = None
    split_brain: Literal["manual", "discard-younger-primary", "discard-least-changes"] = "manual"


class ServiceConfig(_Model):
    """How the application is started and stopped: start+stop scripts, or a systemd unit."""

    start: AbsPath | None = None
    stop: AbsPath | None = None
    systemd: Annotated[str, AfterValidator(_check_unit)] | None = None
    start_timeout: Seconds = 30.0
    stop_timeout: Seconds = 30.0


class CheckerConfig(_Model):
    """One health check; which of address/port/name/command it needs depends on its type.

    tcp: address and port (healthy while a connection succeeds); process: name (a process
    of that name runs); interface: name (that interface is up); command: command (exits 0;
    a string runs through the shell, a list does not).
    """

    type: Literal["tcp", "process", "interface", "command"]
    on: Literal["primary", "both"] = "primary"
    interval: Seconds = 2.0
    timeout: Seconds = 2.0
    address: IPv4 | None = None
    port: Port | None = None
    name: Text | None = None
    command: Annotated[str | list[str], BeforeValidator(_check_command)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _yaml11_on(cls, data: Any) -> Any:
        # YAML 1.1 loaders read the key `on` as the boolean True; accept that spelling too.
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data

    @property
    def program(self) -> str | None:
        """The command's executable (its first word), for a command checker."""
        if self.command is None:
            return None
        return shlex.split(self.command)[0] if isinstance(self.command, str) else self.command[0]


# The keys each checker type needs; the others of CHECKER_KEYS are refused for it.
CHECKER_NEEDS: dict[str, tuple[str, ...]] = {
    "tcp": ("address", "port"),
    "process": ("name",),
    "interface": ("name",),
    "command": ("command",),
}
CHECKER_KEYS = ("address", "port", "name", "command")


class RestartPolicy(_Model):
    """Local restarts allowed within a time window before the module fails over."""

    attempts: Annotated[int, Field(ge=0, strict=True)] = 2
    within: Seconds = 60.0


class ModuleConfig(_Model):
    """One application: its VIP, replicated directories, service, checkers."""

    name: Name
    default_primary: str | None = None
    vip: VipConfig | None = None
    directories: list[DirectoryConfig] = Field(default_factory=list)
    replication: ReplicationConfig = Field(default_factory=ReplicationConfig)
    service: ServiceConfig | None = None
    checkers: list[CheckerConfig] = Field(default_factory=list)
    restart: RestartPolicy = Field(default_factory=RestartPolicy)

    def vip_interface(self, node: str) -> str | None:
        """The interface that carries the VIP on `node`, or None without a VIP."""
        if self.vip is None:
            return None
        if isinstance(self.vip.interface, str):
            return self.vip.interface
        return self.vip.interface.get(node)

    def preferred_node(self, cfg: ClusterConfig) -> str:
        """The node that becomes primary first: default_primary, else the first node listed."""
        return self.default_primary or cfg.nodes[0].name


class ClusterConfig(_Model):
    """The whole cluster YAML, validated; identical on both nodes."""

    cluster: ClusterSection
    nodes: list[NodeConfig]
    witness: WitnessConfig | None = None
    timing: Timing = Field(default_factory=Timing)
    ports: Ports = Field(default_factory=Ports)
    modules: list[ModuleConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_checks(self) -> ClusterConfig:
        # parse_config runs these before; this keeps model_validate() callers honest too.
        problems = _cross_problems(_Parts.of(self))
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def node_names(self) -> list[str]:
        """The two node names, in the order listed."""
        return [n.name for n in self.nodes]

    def node(self, name: str) -> NodeConfig:
        """The node called `name`; ConfigError (not KeyError) when there is none."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(
            f"node: {name!r} is not a node of cluster {self.cluster.name!r}; "
            f"use one of {', '.join(self.node_names)}"
        )

    def peer_of(self, name: str) -> NodeConfig:
        """The other node of the pair."""
        me = self.node(name)
        return next(n for n in self.nodes if n is not me)

    def module(self, name: str) -> ModuleConfig | None:
        """The module called `name`, or None."""
        return next((m for m in self.modules if m.name == name), None)


# --- rules that span fields, sections or list items -------------------------------------------


@dataclass(frozen=True)
class _Parts:
    """The sections that validated on their own, so cross rules run even when others failed."""

    cluster: ClusterSection | None = None
    nodes: tuple[tuple[int, NodeConfig], ...] = ()
    node_count: int | None = None
    witness: WitnessConfig | None = None
    timing: Timing | None = None
    ports: Ports | None = None
    modules: tuple[tuple[int, ModuleConfig], ...] = ()
    module_count: int = 0
    # (module index, checker index, checker), also from modules refused for other reasons
    checkers: tuple[tuple[int, int, CheckerConfig], ...] = ()

    @classmethod
    def of(cls, cfg: ClusterConfig) -> _Parts:
        return cls(
            cluster=cfg.cluster,
            nodes=tuple(enumerate(cfg.nodes)),
            node_count=len(cfg.nodes),
            witness=cfg.witness,
            timing=cfg.timing,
            ports=cfg.ports,
            modules=tuple(enumerate(cfg.modules)),
            module_count=len(cfg.modules),
            checkers=tuple(
                (i, j, c) for i, m in enumerate(cfg.modules) for j, c in enumerate(m.checkers)
            ),
        )


def _cross_problems(parts: _Parts) -> list[str]:
    problems = _node_problems(parts)
    problems += _timing_problems(parts.timing)
    problems += _port_problems(parts.ports)
    problems += _module_problems(parts)
    problems += _directory_problems(parts.modules)
    problems += _checker_problems(parts.checkers)
    return problems


def _address_owners(parts: _Parts) -> dict[IPv4Address, str]:
    owners: dict[IPv4Address, str] = {}
    for _, node in parts.nodes:
        for hb in node.heartbeat:
            owners.setdefault(hb, f"{node.name}'s heartbeat address")
        owners[node.address] = f"{node.name}'s own address"
    return owners


def _node_problems(parts: _Parts) -> list[str]:
    problems: list[str] = []
    count = parts.node_count
    if count is not None and count != 2:
        problems.append(
            f"nodes: {count} node{'s' if count != 1 else ''} listed; a cluster has exactly "
            "two nodes; list both servers"
        )
    names: dict[str, int] = {}
    owner: dict[IPv4Address, tuple[int, str]] = {}
    for i, node in parts.nodes:
        if node.name in names:
            problems.append(
                f"nodes[{i}].name: duplicate node name {node.name!r} "
                f"(also nodes[{names[node.name]}]); give each node its own name"
            )
        names.setdefault(node.name, i)
        seen_here: dict[IPv4Address, int] = {}
        for j, hb in enumerate(node.heartbeat):
            if hb in seen_here:
                problems.append(
                    f"nodes[{i}].heartbeat[{j}]: {hb} is listed twice (also heartbeat"
                    f"[{seen_here[hb]}]); give one address per heartbeat network"
                )
            seen_here.setdefault(hb, j)
        own = [(f"nodes[{i}].address", node.address)]
        own += [(f"nodes[{i}].heartbeat[{j}]", hb) for j, hb in enumerate(node.heartbeat)]
        for path, ip in own:
            other = owner.get(ip)
            if other is not None and other[0] != i:
                problems.append(
                    f"{path}: {ip} is also an address of {other[1]}; each node needs "
                    "addresses of its own"
                )
        for _, ip in own:
            owner.setdefault(ip, (i, node.name))
    if len(parts.nodes) == 2:
        (_, first), (i, second) = parts.nodes
        if len(first.heartbeat) != len(second.heartbeat):
            problems.append(
                f"nodes[{i}].heartbeat: {len(second.heartbeat)} address(es) but {first.name} "
                f"has {len(first.heartbeat)}; list one address per heartbeat network on both "
                "nodes, in the same order"
            )
    if parts.witness is not None:
        what = _address_owners(parts).get(parts.witness.address)
        if what is not None:
            problems.append(
                f"witness.address: {parts.witness.address} is {what}; the witness must run "
                "on a third host"
            )
    return problems


def _timing_problems(timing: Timing | None) -> list[str]:
    if timing is None or timing.peer_timeout >= 3 * timing.heartbeat_interval:
        return []
    return [
        f"timing.peer_timeout: {timing.peer_timeout:g} s is less than 3 × heartbeat_interval "
        f"({3 * timing.heartbeat_interval:g} s); a peer is declared lost only after at least "
        "three heartbeats are missed, so raise peer_timeout or lower heartbeat_interval"
    ]


def _port_problems(ports: Ports | None) -> list[str]:
    if ports is None:
        return []
    problems: list[str] = []
    seen: dict[int, str] = {}
    for key, port in ports.model_dump().items():
        if port in seen:
            problems.append(
                f"ports.{key}: {port} is also the {seen[port]} port; give each port its own number"
            )
        seen.setdefault(port, key)
    return problems


def _module_problems(parts: _Parts) -> list[str]:
    problems: list[str] = []
    if parts.module_count > MAX_MODULES:
        problems.append(
            f"modules: {parts.module_count} modules listed; at most {MAX_MODULES} are "
            "supported; merge modules or split them across clusters"
        )
    # Node-dependent rules only when both nodes are known, to avoid follow-on noise.
    node_names = [n.name for _, n in parts.nodes] if len(parts.nodes) == parts.node_count else None
    owners = _address_owners(parts)
    if parts.witness is not None:
        owners.setdefault(parts.witness.address, "the witness's address")
    names: dict[str, int] = {}
    vips: dict[IPv4Address, tuple[int, str]] = {}
    for i, mod in parts.modules:
        at = f"modules[{i}]"
        if mod.name in names:
            problems.append(
                f"{at}.name: duplicate module name {mod.name!r} (also modules[{names[mod.name]}]);"
                " module names must be unique"
            )
        names.setdefault(mod.name, i)
        dp = mod.default_primary
        if node_names is not None and dp is not None and dp not in node_names:
            problems.append(
                f"{at}.default_primary: {dp!r} is not a node of this cluster; "
                f"use one of {', '.join(node_names)} or remove the key"
            )
        if mod.vip is not None:
            problems += _vip_problems(at, mod, node_names, owners, vips)
            vips.setdefault(mod.vip.address.ip, (i, mod.name))
        if mod.service is not None:
            problems += _service_problems(f"{at}.service", mod.service)
    return problems


def _vip_problems(
    at: str,
    mod: ModuleConfig,
    node_names: list[str] | None,
    owners: dict[IPv4Address, str],
    vips: dict[IPv4Address, tuple[int, str]],
) -> list[str]:
    assert mod.vip is not None
    problems: list[str] = []
    ip = mod.vip.address.ip
    if ip in owners:
        problems.append(
            f"{at}.vip.address: {ip} is {owners[ip]}; choose a free address in the subnet"
        )
    if ip in vips:
        j, other = vips[ip]
        problems.append(
            f"{at}.vip.address: {ip} is already the VIP of module {other!r} (modules[{j}]); "
            "give each module its own VIP"
        )
    iface = mod.vip.interface
    if isinstance(iface, str):
        problems += _ifname_problem(f"{at}.vip.interface", iface)
        return problems
    keyed = {node: f"{at}.vip.interface{_loc_part(node)}" for node in iface}
    for node, name in iface.items():
        problems += _ifname_problem(keyed[node], name)
    if node_names is not None:
        for node in iface:
            if node not in node_names:
                problems.append(
                    f"{keyed[node]}: {node!r} is not a node of this cluster; "
                    f"the keys must be the node names {', '.join(node_names)}"
                )
        missing = [n for n in node_names if n not in iface]
        if missing:
            problems.append(
                f"{at}.vip.interface: no interface given for {', '.join(missing)}; map every "
                f"node, e.g. {{{', '.join(f'{n}: eth0' for n in node_names)}}}"
            )
    return problems


def _ifname_problem(path: str, name: str) -> list[str]:
    try:
        _check_ifname(name)
    except ValueError as exc:
        return [f"{path}: {exc}"]
    return []


def _service_problems(at: str, svc: ServiceConfig) -> list[str]:
    scripts = svc.start is not None or svc.stop is not None
    if svc.systemd is not None and scripts:
        return [
            f"{at}.systemd: given together with start/stop scripts; use either start and stop "
            "scripts or a systemd unit, not both"
        ]
    if svc.systemd is None and not scripts:
        return [
            f"{at}: neither start/stop scripts nor a systemd unit; give start and stop, "
            "or systemd (e.g. systemd: nginx.service)"
        ]
    if svc.systemd is None and svc.start is None:
        return [f"{at}.start: required with stop; give the script that starts the application"]
    if svc.systemd is None and svc.stop is None:
        return [f"{at}.stop: required with start; give the script that stops the application"]
    return []


def _checker_problems(checkers: Sequence[tuple[int, int, CheckerConfig]]) -> list[str]:
    problems: list[str] = []
    for i, j, checker in checkers:
        at = f"modules[{i}].checkers[{j}]"
        needs = CHECKER_NEEDS[checker.type]
        allowed = sorted(
            k for k in CheckerConfig.model_fields if k in needs or k not in CHECKER_KEYS
        )
        for key in CHECKER_KEYS:
            given = key in checker.model_fields_set
            if key in needs and getattr(checker, key) is None:
                problems.append(f"{at}.{key}: required for a {checker.type} checker; add it")
            elif key not in needs and given:
                problems.append(
                    f"{at}.{key}: unknown key {key!r} for a {checker.type} checker; "
                    f"allowed keys here: {', '.join(allowed)}"
                )
        if checker.type == "interface" and checker.name is not None:
            problems += _ifname_problem(f"{at}.name", checker.name)
    return problems


def exclude_problem(pattern: str) -> str | None:
    """Why a gitignore pattern cannot be used, or None."""
    from agent.mirror.excludes import Excludes  # pathspec only: no FUSE, no I/O

    try:
        Excludes([pattern])
    except ValueError as exc:
        return str(exc)
    return None


def _directory_problems(modules: Sequence[tuple[int, ModuleConfig]]) -> list[str]:
    problems: list[str] = []
    seen: list[tuple[str, PurePosixPath, int, str]] = []
    for i, mod in modules:
        for j, d in enumerate(mod.directories):
            path = PurePosixPath(d.path)
            at = f"modules[{i}].directories[{j}]"
            for k, pattern in enumerate(d.exclude):
                problem = exclude_problem(pattern)
                if problem:
                    problems.append(f"{at}.exclude[{k}]: {problem}")
            if path == PurePosixPath("/"):
                problems.append(f"{at}.path: / cannot be replicated; give the application's own")
                continue
            for other_at, other, k, other_mod in seen:
                where = other_at if k == i else f"module {other_mod!r}, {other_at}"
                if path == other:
                    problems.append(
                        f"{at}.path: {path} is already replicated ({where}); "
                        "list each directory once, in one module"
                    )
                elif other in path.parents or path in other.parents:
                    rel = "inside" if other in path.parents else "the parent of"
                    problems.append(
                        f"{at}.path: {path} is {rel} {other} ({where}); "
                        "nested directories cannot be replicated separately, keep only the outer"
                    )
                else:
                    continue
                break
            seen.append((at, path, i, mod.name))
    return problems


# --- pydantic errors -> "key.path: why; fix" --------------------------------------------------


def _number(value: float) -> str:
    """A bound as people write it: 1048576, not 1.04858e+06."""
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:g}"


def _show(value: object) -> str:
    if value is None:
        return "nothing (an empty value)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _loc_part(part: object, first: bool = False) -> str:
    """One step of a key path: `.key`, `[3]`, or `['odd key']` for keys that need quoting."""
    if isinstance(part, int) and not isinstance(part, bool):
        return f"[{part}]"
    if isinstance(part, str) and re.fullmatch(r"[A-Za-z0-9_-]+", part):
        return part if first else f".{part}"
    return f"[{str(part)!r}]"


def _format_loc(loc: Sequence[object]) -> str:
    out = ""
    for part in loc:
        out += _loc_part(part, first=not out)
    return out or "(top level)"


def _unwrap(tp: Any) -> list[Any]:
    """The concrete types behind Annotated, Optional and unions."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(tp) for t in _unwrap(arg)]
    return [tp]


def _child(tp: Any, part: str | int) -> Any:
    for t in _unwrap(tp):
        if isinstance(t, type) and issubclass(t, BaseModel):
            field = t.model_fields.get(part) if isinstance(part, str) else None
            if field is not None:
                return field.annotation
        elif typing.get_origin(t) is list and isinstance(part, int):
            return typing.get_args(t)[0]
        elif typing.get_origin(t) is dict and isinstance(part, str):
            return typing.get_args(t)[1]
    return None


def _allowed_keys(loc: Loc) -> list[str]:
    tp: Any = ClusterConfig
    for part in loc:
        tp = _child(tp, part)
        if tp is None:
            return []
    models = [t for t in _unwrap(tp) if isinstance(t, type) and issubclass(t, BaseModel)]
    return sorted(models[0].model_fields) if len(models) == 1 else []


_TYPE_WORDS = {
    "string_type": "text",
    "int_type": "a whole number",
    "float_type": "a number",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping (key: value)",
    "model_type": "a mapping (key: value)",
    "model_attributes_type": "a mapping (key: value)",
    "path_type": "a path",
}


def _describe(err: Any, loc: Loc) -> str:
    """The "why; fix" of one pydantic error at `loc`."""
    kind: str = err["type"]
    ctx: dict[str, Any] = err.get("ctx") or {}
    value = err.get("input")
    if kind == "missing":
        if (
            len(loc) >= 3
            and loc[-3] == "checkers"
            and isinstance(loc[-2], int)
            and loc[-1] == "type"
        ):
            return f"required; say which checker this is: one of {', '.join(CHECKER_TYPES)}"
        return "required; add this key"
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        allowed = _allowed_keys(loc[:-1])
        hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        fix = f"did you mean {hint[0]!r}? " if hint else ""
        return f"unknown key {key!r}; {fix}allowed keys here: {', '.join(allowed)}"
    if kind == "literal_error":
        return f"{_show(value)} is not allowed; use one of {ctx.get('expected')}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", err["msg"]))
    if kind in _TYPE_WORDS:
        # YAML reads 2024-01-01, 1.10 or 0755 as something else than text: quoting fixes it.
        quote = kind == "string_type" and value is not None and not isinstance(value, list | dict)
        fix = "put it in quotes" if quote else "fix the value"
        return f"expected {_TYPE_WORDS[kind]}, got {_show(value)}; {fix}"
    if kind == "ip_v4_address":
        return f"{_show(value)} is not an IPv4 address; write it like 198.18.0.1"
    if kind == "ip_v4_interface":
        return f"{_show(value)} is not an IPv4 address/prefix; write it like 198.18.0.100/24"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        limit = ctx.get("gt", ctx.get("ge", ctx.get("lt", ctx.get("le"))))
        word = {
            "greater_than": "greater than",
            "greater_than_equal": "at least",
            "less_than": "less than",
            "less_than_equal": "at most",
        }[kind]
        bound = f"{word} {_number(limit)}" if isinstance(limit, int | float) else f"{word} {limit}"
        return f"{_show(value)} is out of range; it must be {bound}"
    if kind == "finite_number":
        return f"{_show(value)} is not a finite number; give a number of seconds"
    if kind in ("too_short", "string_too_short"):
        return "must not be empty; give at least one value"
    if kind == "invalid_key":
        return "keys must be text; quote the key or remove it"
    if kind == "recursion_loop":
        return "refers to itself (a YAML alias loop); write the value out"
    return f"{err['msg']}; fix the value"


def _translate(exc: ValidationError, prefix: Loc) -> list[str]:
    problems: list[str] = []
    for err in exc.errors():
        raw = (*prefix, *err["loc"])
        why = _describe(err, raw)
        if not raw and err["type"] in ("value_error", "assertion_error"):
            problems += why.splitlines()  # ClusterConfig's cross rules, one per line
            continue
        problems.append(f"{_format_loc(raw)}: {why}")
    return list(dict.fromkeys(problems))


# --- from data to a ClusterConfig ------------------------------------------------------------

_SECTIONS: dict[str, TypeAdapter[Any]] = {
    name: TypeAdapter(typing.cast(Any, field.annotation))
    for name, field in ClusterConfig.model_fields.items()
    if name not in ("nodes", "modules")
}
# Each field of a module on its own, so that one bad checker does not hide a duplicate VIP.
_MODULE_FIELDS: dict[str, TypeAdapter[Any]] = {
    name: TypeAdapter(typing.cast(Any, Annotated[field.annotation, field]))
    for name, field in ModuleConfig.model_fields.items()
}
_LIST_ADAPTER: TypeAdapter[list[Any]] = TypeAdapter(list[Any])


def _validate(check: Callable[[Any], Any], value: object, prefix: Loc) -> tuple[Any, list[str]]:
    try:
        return check(value), []
    except ValidationError as exc:
        return None, _translate(exc, prefix)
    except (ValueError, TypeError, RecursionError) as exc:  # belt and braces: never leak
        return None, [f"{_format_loc(prefix)}: cannot be read ({exc}); fix the value"]


def _partial_module(raw: object) -> ModuleConfig | None:
    """The fields of a refused module that are valid on their own, for the cross rules."""
    if not isinstance(raw, dict):
        return None
    good: dict[str, Any] = {}
    for name, adapter in _MODULE_FIELDS.items():
        if name in raw:
            value, found = _validate(adapter.validate_python, raw[name], ())
            if not found:
                good[name] = value
    if "name" not in good:
        return None
    return ModuleConfig.model_construct(**good)


def _top_key_problems(data: dict[Any, Any]) -> list[str]:
    problems: list[str] = []
    allowed = _top_keys()
    for key in data:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            fix = f"did you mean {hint[0]!r}? " if hint else ""
            problems.append(
                f"{_format_loc((str(key),))}: unknown key {key!r}; {fix}allowed keys here: "
                f"{', '.join(allowed)}"
            )
    for key, field in ClusterConfig.model_fields.items():
        if field.is_required() and key not in data:
            problems.append(f"{key}: required; add the {key} section")
    return problems


def _list_items(
    data: dict[Any, Any], key: str, model: type[_Model]
) -> tuple[tuple[tuple[int, Any], ...], int | None, list[str]]:
    """The items of list section `key` that validate, how many were listed, and the problems."""
    if key not in data:
        return (), None, []
    raw = data[key]
    if not isinstance(raw, list):
        return (), None, _validate(_LIST_ADAPTER.validate_python, raw, (key,))[1]
    good: list[tuple[int, Any]] = []
    problems: list[str] = []
    for i, item in enumerate(raw):
        value, found = _validate(model.model_validate, item, (key, i))
        problems += found
        if value is None and model is ModuleConfig:
            value = _partial_module(item)
        if value is not None:
            good.append((i, value))
    return tuple(good), len(raw), problems


def _raw_checkers(data: dict[Any, Any]) -> tuple[tuple[int, int, CheckerConfig], ...]:
    """Every checker that is valid on its own, wherever it is; its problems are reported
    by the module's validation."""
    found: list[tuple[int, int, CheckerConfig]] = []
    modules = data.get("modules")
    for i, module in enumerate(modules if isinstance(modules, list) else []):
        checkers = module.get("checkers") if isinstance(module, dict) else None
        for j, raw in enumerate(checkers if isinstance(checkers, list) else []):
            checker, problems = _validate(CheckerConfig.model_validate, raw, ())
            if not problems:
                found.append((i, j, checker))
    return tuple(found)


def _sort_key(data: dict[Any, Any]) -> Callable[[str], tuple[int, int]]:
    """Order problems as the file is: by section, then by list index."""
    order = {str(k): n for n, k in enumerate(data)}

    def key(problem: str) -> tuple[int, int]:
        m = re.match(r"(\w+)(?:\[(\d+)\])?", problem)
        if m is None or m.group(1) not in order:
            return (-1, -1)
        return (order[m.group(1)], int(m.group(2) or -1))

    return key


def config_from_data(data: object, source: str = "<config>") -> ClusterConfig:
    """Validate an already parsed document (YAML or JSON); raise ConfigError with every problem."""
    if data is None:
        raise ConfigError(
            [f"{source}: the configuration is empty; write the cluster, nodes and modules"],
            source,
        )
    if not isinstance(data, dict):
        raise ConfigError(
            [
                f"{source}: the top level is {type(data).__name__}, not a mapping; start the "
                f"file with keys such as cluster:, nodes:, modules: ({', '.join(_top_keys())})"
            ],
            source,
        )
    problems = _top_key_problems(data)
    values: dict[str, Any] = {}
    for key, adapter in _SECTIONS.items():
        if key in data:
            values[key], found = _validate(adapter.validate_python, data[key], (key,))
            problems += found
    nodes, node_count, found = _list_items(data, "nodes", NodeConfig)
    problems += found
    modules, module_count, found = _list_items(data, "modules", ModuleConfig)
    problems += found
    parts = _Parts(
        cluster=values.get("cluster"),
        nodes=nodes,
        node_count=node_count,
        witness=values.get("witness"),
        timing=values.get("timing") if "timing" in data else Timing(),
        ports=values.get("ports") if "ports" in data else Ports(),
        modules=modules,
        module_count=module_count or 0,
        checkers=_raw_checkers(data),
    )
    problems += _cross_problems(parts)
    if not problems:
        cfg, problems = _validate(ClusterConfig.model_validate, data, ())
        if not problems:
            assert isinstance(cfg, ClusterConfig)
            return cfg
    problems = sorted(dict.fromkeys(problems), key=_sort_key(data))
    raise ConfigError(problems, source)


def _top_keys() -> list[str]:
    return list(ClusterConfig.model_fields)


# --- YAML --------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (so `on:` stays a key) that reports duplicate keys."""

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self.source = source
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                mark = key_node.start_mark
                self.duplicates.append(
                    f"{self.source}:{mark.line + 1}:{mark.column + 1}: duplicate key "
                    f"{key_node.value!r}; each key may appear once in a mapping, keep one"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def _load_yaml(text: str, source: str) -> tuple[object, list[str]]:
    loader: _Loader | None = None
    try:
        # The reader refuses unprintable characters already in the constructor.
        loader = _Loader(text, source)
        return loader.get_single_data(), loader.duplicates
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        context = f" ({exc.context})" if exc.context else ""
        raise ConfigError(
            [f"{where}: YAML syntax error: {exc.problem}{context}; fix the YAML at this point"],
            source,
        ) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise ConfigError(
            [
                f"{source}:{line}:{col}: character #x{exc.character:04x} is not allowed in YAML; "
                "remove it (save the file as plain UTF-8 text)"
            ],
            source,
        ) from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError([f"{source}: YAML error: {detail}; fix the file"], source) from None
    except RecursionError:
        raise ConfigError([f"{source}: nested too deeply; simplify the file"], source) from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_config(text: str, source: str = "<config>") -> ClusterConfig:
    """Parse and validate cluster YAML; raise ConfigError listing every problem found."""
    data, duplicates = _load_yaml(text, source)
    try:
        cfg = config_from_data(data, source)
    except ConfigError as exc:
        raise ConfigError([*duplicates, *exc.problems], source) from None
    if duplicates:
        raise ConfigError(duplicates, source)
    return cfg


def load_config(path: str | Path) -> ClusterConfig:
    """Read, parse and validate a cluster YAML file; raise ConfigError only."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{source}: no such file; check the path"], source) from None
    except IsADirectoryError:
        raise ConfigError([f"{source}: is a directory; give the YAML file"], source) from None
    except PermissionError:
        raise ConfigError(
            [f"{source}: permission denied; run as root or make the file readable"], source
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(
            [f"{source}: cannot read the file: {exc}; check the path"], source
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"{source}: not UTF-8 text (byte {exc.start}); save the file as UTF-8"], source
        ) from None
    if not text.strip():
        raise ConfigError(
            [f"{source}: the file is empty; write the cluster, nodes and modules"], source
        )
    return parse_config(text, source)


def config_hash(cfg: ClusterConfig) -> str:
    """SHA-256 hex of the canonical JSON of the model: equal for equal configs, however written."""
    canonical = json.dumps(
        cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --- what only the node itself can check -------------------------------------------------------


def _host_addresses() -> list[tuple[str, IPv4Interface]]:
    """Every IPv4 address on this host with the name of its interface.

    `ip -j` rather than netlink bindings keeps this module importable where pyroute2 is not
    (the console validates configs with it too).
    """
    out = subprocess.run(
        ["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    found: list[tuple[str, IPv4Interface]] = []
    for link in json.loads(out):
        for info in link.get("addr_info", []):
            if info.get("family") == "inet" and "local" in info:
                found.append(
                    (link["ifname"], IPv4Interface(f"{info['local']}/{info['prefixlen']}"))
                )
    return found


def _executable_problem(path: str, file: Path, node: str, what: str) -> list[str]:
    try:
        st = file.stat()
    except FileNotFoundError:
        return [f"{path}: {file} does not exist on {node}; create the {what} or fix the path"]
    except OSError as exc:
        return [f"{path}: cannot look at {file} on {node}: {exc.strerror}; fix its permissions"]
    if not stat.S_ISREG(st.st_mode):
        return [f"{path}: {file} is not a regular file on {node}; give the {what}'s path"]
    if not os.access(file, os.X_OK):
        return [f"{path}: {file} is not executable on {node}; run chmod +x {file}"]
    return []


def _secret_problem(file: Path, node: str) -> list[str]:
    at = "cluster.secret_file"
    fix = f"create it with 'tandemctl keygen {file}' and copy it to both nodes"
    try:
        with file.open("rb") as f:
            head = f.read(200)
    except FileNotFoundError:
        return [f"{at}: {file} does not exist on {node}; {fix}"]
    except IsADirectoryError:
        return [f"{at}: {file} is a directory on {node}; {fix}"]
    except OSError as exc:
        return [f"{at}: cannot read {file} on {node}: {exc.strerror}; make it readable by root"]
    if not KEY_RE.fullmatch(head.strip().decode("ascii", "replace")):
        return [f"{at}: {file} does not hold a key (64 hex characters) on {node}; {fix}"]
    return []


def _module_checks(
    i: int,
    mod: ModuleConfig,
    node: str,
    interfaces: set[str],
    addrs: list[tuple[str, IPv4Interface]],
) -> list[str]:
    at = f"modules[{i}]"
    problems: list[str] = []
    iface = mod.vip_interface(node)
    if mod.vip is not None and iface is not None:
        keyed = not isinstance(mod.vip.interface, str)
        ipath = _format_loc(("modules", i, "vip", "interface", *((node,) if keyed else ())))
        if iface not in interfaces:
            problems.append(
                f"{ipath}: no interface {iface!r} on {node} (this host has "
                f"{', '.join(sorted(interfaces))}); fix the interface name"
            )
        else:
            vip = mod.vip.address
            own = [a for name, a in addrs if name == iface and a.ip != vip.ip]
            if not any(vip.ip in a.network for a in own):
                has = ", ".join(str(a) for a in own) or "no IPv4 address"
                problems.append(
                    f"{at}.vip.address: {vip} is in no subnet of {iface} on {node} ({iface} has "
                    f"{has}); choose a VIP in the subnet of an address already on {iface}"
                )
    if mod.service is not None:
        for key, script in (("start", mod.service.start), ("stop", mod.service.stop)):
            if script is not None:
                problems += _executable_problem(f"{at}.service.{key}", script, node, "script")
    for j, checker in enumerate(mod.checkers):
        if checker.type == "command" and checker.program is not None:
            problems += _executable_problem(
                f"{at}.checkers[{j}].command", Path(checker.program), node, "program"
            )
    return problems


def node_checks(cfg: ClusterConfig, node: str) -> list[str]:
    """What only `node` itself can check, as "key.path: why; fix" lines; [] when all is fine."""
    if node not in cfg.node_names:
        return [
            f"node: {node!r} is not a node of cluster {cfg.cluster.name!r}; "
            f"use one of {', '.join(cfg.node_names)}"
        ]
    problems = _secret_problem(cfg.cluster.secret_file, node)
    try:
        interfaces = {name for _, name in socket.if_nameindex()}
        addrs = _host_addresses()
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError) as exc:
        # Without the host's addresses nothing below can be judged: say so rather than guess.
        detail = " ".join(str(exc).split())
        return [*problems, f"node: cannot list this host's addresses ({detail}); install iproute2"]
    here = {a.ip for _, a in addrs}
    i = cfg.node_names.index(node)
    me = cfg.nodes[i]
    own = [(f"nodes[{i}].address", me.address)]
    own += [
        (f"nodes[{i}].heartbeat[{j}]", hb) for j, hb in enumerate(me.heartbeat) if hb != me.address
    ]
    for path, ip in own:
        if ip not in here:
            problems.append(
                f"{path}: {ip} is not configured on this host ({node}); add it to an interface "
                "or fix the address"
            )
    for k, mod in enumerate(cfg.modules):
        problems += _module_checks(k, mod, node, interfaces, addrs)
    return list(dict.fromkeys(problems))
