"""The cluster YAML loader: good configs load with defaults, bad ones name every problem."""

from __future__ import annotations

import copy
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.config import (
    CheckerConfig,
    ClusterConfig,
    ConfigError,
    config_from_data,
    config_hash,
    load_config,
    node_checks,
    parse_config,
)

# The example of DESIGN.md, verbatim (its paths are already absolute).
GOOD_YAML = """\
cluster:
  name: shop
  secret_file: /etc/tandem/cluster.key   # shared key: authenticates peer traffic
nodes:
  - name: node1
    address: 198.18.0.1                  # API + replication
    heartbeat: [198.18.0.1, 198.18.1.1]  # one address per heartbeat network
  - name: node2
    address: 198.18.0.2
    heartbeat: [198.18.0.2, 198.18.1.2]
witness: {address: 198.18.0.254, port: 7710}   # optional arbitrator
timing: {heartbeat_interval: 0.25, peer_timeout: 1.5}     # seconds
ports: {api: 7700, heartbeat: 7701, peer: 7702, health: 7703}  # defaults; heartbeat is UDP
modules:
  - name: web
    default_primary: node1               # optional: automatic swap back once in sync
    vip: {address: 198.18.0.100/24, interface: eth0}   # or {node1: eth0, node2: ens18}
    directories:
      - {path: /srv/web/data, exclude: ["*.tmp", "cache/"]}
    replication: {mode: sync}            # sync (default) | flush | async
    service:
      start: /srv/web/start.sh           # or: systemd: nginx.service
      stop: /srv/web/stop.sh
    checkers:                            # run where the module is primary unless on: both
      - {type: tcp, address: 198.18.0.100, port: 8080}
      - {type: process, name: web-server}
      - {type: interface, name: eth0, on: both}
    restart: {attempts: 2, within: 60}   # local restarts before failover
"""

# The same configuration written otherwise: block style, other key order, no comments,
# defaults spelled out or left out.
REFORMATTED_YAML = """\
modules:
- restart:
    within: 60.0
    attempts: 2
  checkers:
  - port: 8080
    address: 198.18.0.100
    type: tcp
    on: primary
  - name: web-server
    type: process
    interval: 2
  - {on: both, name: eth0, type: interface}
  service: {stop: /srv/web/stop.sh, start: /srv/web/start.sh, start_timeout: 30}
  replication: {}
  directories:
  - exclude: ['*.tmp', 'cache/']
    path: /srv/web/data/
  vip: {interface: eth0, address: 198.18.0.100/24}
  default_primary: node1
  name: web
ports: {heartbeat: 7701}
timing: {peer_timeout: 1.5, ack_timeout: 5}
witness: {port: 7710, address: 198.18.0.254}
nodes:
- {heartbeat: ['198.18.0.1', '198.18.1.1'], address: '198.18.0.1', name: node1}
- {heartbeat: ['198.18.0.2', '198.18.1.2'], address: '198.18.0.2', name: node2}
cluster: {secret_file: /etc/tandem/cluster.key, name: shop}
"""


def good_data() -> dict[str, Any]:
    """A fresh, mutable copy of the good configuration as plain data."""
    data = yaml.safe_load(GOOD_YAML)
    assert isinstance(data, dict)
    # PyYAML's own loader turns the key `on` into True; write the YAML back with our spelling.
    for checker in data["modules"][0]["checkers"]:
        if True in checker:
            checker["on"] = checker.pop(True)
    return data


def problems_of(data: object) -> list[str]:
    """The problems parse_config reports for `data` written as YAML."""
    text = yaml.safe_dump(data, sort_keys=False)
    with pytest.raises(ConfigError) as info:
        parse_config(text, "test.yaml")
    assert info.value.problems, "a ConfigError always says what is wrong"
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


# --- good configurations -------------------------------------------------------------------------


def test_design_example_loads_with_defaults_filled() -> None:
    cfg = parse_config(GOOD_YAML)
    assert cfg.cluster.name == "shop"
    assert str(cfg.cluster.secret_file) == "/etc/tandem/cluster.key"
    assert cfg.node_names == ["node1", "node2"]
    assert [str(a) for a in cfg.nodes[1].heartbeat] == ["198.18.0.2", "198.18.1.2"]
    assert cfg.witness is not None and cfg.witness.port == 7710
    assert cfg.timing.ack_timeout == 5.0
    assert (cfg.ports.api, cfg.ports.heartbeat, cfg.ports.peer, cfg.ports.health) == (
        7700,
        7701,
        7702,
        7703,
    )
    web = cfg.modules[0]
    assert web.vip is not None and str(web.vip.address) == "198.18.0.100/24"
    assert web.replication.mode == "sync"
    assert web.service is not None and web.service.systemd is None
    assert web.service.start_timeout == 30.0 and web.service.stop_timeout == 30.0
    assert web.directories[0].exclude == ["*.tmp", "cache/"]
    tcp, process, interface = web.checkers
    assert (tcp.type, str(tcp.address), tcp.port, tcp.on) == (
        "tcp",
        "198.18.0.100",
        8080,
        "primary",
    )
    assert (process.type, process.name, process.address) == ("process", "web-server", None)
    assert (interface.type, interface.name, interface.on) == ("interface", "eth0", "both")
    assert isinstance(tcp, CheckerConfig) and tcp.program is None
    assert tcp.interval == 2.0 and tcp.timeout == 2.0
    assert web.restart.attempts == 2 and web.restart.within == 60.0


def test_minimal_config_gets_every_default() -> None:
    cfg = parse_config(
        "cluster: {name: c1, secret_file: /k}\n"
        "nodes: [{name: a, address: 198.18.0.1}, {name: b, address: 198.18.0.2}]\n"
    )
    assert [str(n.heartbeat[0]) for n in cfg.nodes] == ["198.18.0.1", "198.18.0.2"]
    assert cfg.witness is None
    assert cfg.timing.heartbeat_interval == 0.25 and cfg.timing.peer_timeout == 1.5
    assert cfg.ports.health == 7703
    assert cfg.modules == []


def test_models_are_frozen() -> None:
    cfg = parse_config(GOOD_YAML)
    with pytest.raises(ValueError):
        cfg.cluster.name = "other"


def test_helpers() -> None:
    cfg = parse_config(GOOD_YAML)
    assert cfg.node("node2").address == cfg.nodes[1].address
    assert cfg.peer_of("node1").name == "node2"
    assert cfg.peer_of("node2").name == "node1"
    with pytest.raises(ConfigError, match="'node3' is not a node of cluster 'shop'"):
        cfg.node("node3")
    with pytest.raises(ConfigError):
        cfg.peer_of("node3")
    web = cfg.module("web")
    assert web is not None and cfg.module("db") is None
    assert web.vip_interface("node1") == "eth0"
    assert web.preferred_node(cfg) == "node1"


def test_interface_per_node_and_preferred_node_default() -> None:
    data = good_data()
    module = data["modules"][0]
    module["vip"]["interface"] = {"node1": "eth0", "node2": "ens18"}
    del module["default_primary"]
    cfg = config_from_data(data)
    assert cfg.modules[0].vip_interface("node2") == "ens18"
    assert cfg.modules[0].preferred_node(cfg) == "node1"
    module["vip"] = None
    assert config_from_data(data).modules[0].vip_interface("node1") is None


def test_on_both_is_a_key_not_a_boolean() -> None:
    text = GOOD_YAML.replace(
        "{type: process, name: web-server}", "{type: process, name: x, on: both}"
    )
    cfg = parse_config(text)
    assert [c.on for c in cfg.modules[0].checkers] == ["primary", "both", "both"]
    # Data read by a YAML 1.1 loader elsewhere has True for `on`: accepted too.
    raw = yaml.safe_load(GOOD_YAML)
    assert config_from_data(raw).modules[0].checkers[2].on == "both"


def test_yaml_1_1_words_stay_text() -> None:
    cfg = parse_config(GOOD_YAML.replace("name: web-server", "name: no"))
    checker = cfg.modules[0].checkers[1]
    assert checker.name == "no"


def test_command_checker_string_and_list() -> None:
    data = good_data()
    data["modules"][0]["checkers"] = [
        {"type": "command", "command": "/usr/bin/test -e '/srv/web/data/ok file'"},
        {"type": "command", "command": ["/usr/bin/test", "-e", "/srv"]},
    ]
    first, second = config_from_data(data).modules[0].checkers
    assert first.command == "/usr/bin/test -e '/srv/web/data/ok file'"
    assert second.command == ["/usr/bin/test", "-e", "/srv"]
    assert first.program == second.program == "/usr/bin/test"


def test_systemd_service() -> None:
    data = good_data()
    data["modules"][0]["service"] = {"systemd": "nginx.service", "stop_timeout": 90}
    service = config_from_data(data).modules[0].service
    assert service is not None and service.systemd == "nginx.service"
    assert service.start is None and service.stop_timeout == 90.0


def test_config_hash_is_stable_across_reformatting() -> None:
    first = config_hash(parse_config(GOOD_YAML))
    assert len(first) == 64 and int(first, 16) >= 0
    assert config_hash(parse_config(REFORMATTED_YAML)) == first
    assert config_hash(config_from_data(good_data())) == first
    changed = GOOD_YAML.replace("peer_timeout: 1.5", "peer_timeout: 2")
    assert config_hash(parse_config(changed)) != first


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(GOOD_YAML)
    assert load_config(path) == parse_config(GOOD_YAML)
    assert load_config(str(path)).cluster.name == "shop"


# --- files that cannot be read as a config ---------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_bytes(b"cluster: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


@pytest.mark.parametrize("text", ["", "   \n# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="empty"):
        load_config(path)
    with pytest.raises(ConfigError, match="empty"):
        parse_config(text)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just words\n", "42\n"])
def test_top_level_not_a_mapping(text: str) -> None:
    with pytest.raises(ConfigError, match="not a mapping"):
        parse_config(text, "c.yaml")


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("cluster:\n  name: shop\n  secret_file: [/k\nnodes: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:4:"), problem
    assert "YAML syntax error" in problem


def test_bad_indentation_reports_the_line() -> None:
    with pytest.raises(ConfigError, match=r"^c\.yaml:3:\d+: YAML syntax error"):
        parse_config("cluster:\n  name: shop\n bad: indentation\n", "c.yaml")


def test_duplicate_yaml_keys_are_reported_with_their_line() -> None:
    text = GOOD_YAML.replace("  name: shop\n", "  name: shop\n  name: shop2\n")
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml")
    assert info.value.problems == [
        "c.yaml:3:3: duplicate key 'name'; each key may appear once in a mapping, keep one"
    ]


# --- bad configurations: one table, each naming the exact key path ------------------------------

Mutation = Callable[[dict[str, Any]], None]


def put(path: str, value: object) -> Mutation:
    """Set the value at a dotted path ("modules.0.vip.address") of the config data."""

    def apply(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value

    return apply


def drop(path: str) -> Mutation:
    """Remove the key at a dotted path."""

    def apply(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        del node[last]

    return apply


def add_module(**changes: Any) -> Mutation:
    """Append a copy of the first module, changed."""

    def apply(data: dict[str, Any]) -> None:
        module = copy.deepcopy(data["modules"][0])
        module.update({"name": "db", "vip": None, "directories": [], **changes})
        data["modules"].append(module)

    return apply


def many_modules(data: dict[str, Any]) -> None:
    data["modules"] = [{"name": f"m{i}"} for i in range(33)]


BAD_CASES: list[tuple[str, Mutation, str, str]] = [
    # (id, mutation, key path the problem starts with, words it contains)
    ("one-node", put("nodes", [{"name": "node1", "address": "198.18.0.1"}]), "nodes", "two"),
    ("no-nodes-section", drop("nodes"), "nodes", "required"),
    ("nodes-not-a-list", put("nodes", "node1"), "nodes", "expected a list"),
    ("cluster-missing", drop("cluster"), "cluster", "required"),
    ("cluster-name", put("cluster.name", "Shop!"), "cluster.name", "lowercase"),
    ("node-name", put("nodes.0.name", "-node1"), "nodes[0].name", "starting with"),
    ("module-name", put("modules.0.name", "w" * 33), "modules[0].name", "1-32"),
    ("node-name-dup", put("nodes.1.name", "node1"), "nodes[1].name", "duplicate node name"),
    (
        "node-address-dup",
        put("nodes.1.address", "198.18.0.1"),
        "nodes[1].address",
        "also an address of node1",
    ),
    ("node-address-bad", put("nodes.0.address", "198.18.0.300"), "nodes[0].address", "IPv4"),
    ("node-address-int", put("nodes.0.address", 12), "nodes[0].address", "expected text"),
    (
        "heartbeat-count",
        put("nodes.1.heartbeat", ["198.18.0.2"]),
        "nodes[1].heartbeat",
        "same order",
    ),
    (
        "heartbeat-twice",
        put("nodes.0.heartbeat", ["198.18.0.1", "198.18.0.1"]),
        "nodes[0].heartbeat[1]",
        "listed twice",
    ),
    ("heartbeat-empty", put("nodes.0.heartbeat", []), "nodes[0].heartbeat", "not be empty"),
    (
        "heartbeat-of-other",
        put("nodes.1.heartbeat.1", "198.18.1.1"),
        "nodes[1].heartbeat[1]",
        "node1",
    ),
    (
        "relative-secret",
        put("cluster.secret_file", "cluster.key"),
        "cluster.secret_file",
        "relative path",
    ),
    ("dotdot-secret", put("cluster.secret_file", "/etc/../k"), "cluster.secret_file", "'..'"),
    (
        "relative-directory",
        put("modules.0.directories.0.path", "srv/web"),
        "modules[0].directories[0].path",
        "relative path",
    ),
    (
        "relative-script",
        put("modules.0.service.start", "./start.sh"),
        "modules[0].service.start",
        "relative path",
    ),
    (
        "vip-is-node-address",
        put("modules.0.vip.address", "198.18.0.1/24"),
        "modules[0].vip.address",
        "198.18.0.1 is node1's own address; choose a free address in the subnet",
    ),
    (
        "vip-is-heartbeat",
        put("modules.0.vip.address", "198.18.1.2/24"),
        "modules[0].vip.address",
        "node2's heartbeat address",
    ),
    (
        "vip-is-witness",
        put("modules.0.vip.address", "198.18.0.254/24"),
        "modules[0].vip.address",
        "witness",
    ),
    (
        "vip-prefix-0",
        put("modules.0.vip.address", "198.18.0.100/0"),
        "modules[0].vip.address",
        "prefix length 0",
    ),
    (
        "vip-no-prefix",
        put("modules.0.vip.address", "198.18.0.100"),
        "modules[0].vip.address",
        "no prefix length",
    ),
    (
        "vip-network",
        put("modules.0.vip.address", "198.18.0.0/24"),
        "modules[0].vip.address",
        "network address",
    ),
    (
        "vip-broadcast",
        put("modules.0.vip.address", "198.18.0.255/24"),
        "modules[0].vip.address",
        "broadcast address",
    ),
    (
        "vip-dup",
        add_module(vip={"address": "198.18.0.100/24", "interface": "eth0"}),
        "modules[1].vip.address",
        "already the VIP of module 'web'",
    ),
    (
        "interface-unknown-node",
        put("modules.0.vip.interface", {"node1": "eth0", "node2": "eth0", "node3": "eth0"}),
        "modules[0].vip.interface.node3",
        "not a node",
    ),
    (
        "interface-missing-node",
        put("modules.0.vip.interface", {"node1": "eth0"}),
        "modules[0].vip.interface",
        "node2",
    ),
    (
        "interface-bad-name",
        put("modules.0.vip.interface", "eth0/1"),
        "modules[0].vip.interface",
        "not a network interface name",
    ),
    (
        "interface-not-text",
        put("modules.0.vip.interface", ["eth0"]),
        "modules[0].vip.interface",
        "expected an interface name",
    ),
    (
        "default-primary",
        put("modules.0.default_primary", "node3"),
        "modules[0].default_primary",
        "use one of node1, node2",
    ),
    ("witness-is-node", put("witness.address", "198.18.0.2"), "witness.address", "third host"),
    ("witness-port", put("witness.port", 0), "witness.port", "at least 1"),
    (
        "heartbeat-interval-0",
        put("timing.heartbeat_interval", 0),
        "timing.heartbeat_interval",
        "greater than 0",
    ),
    (
        "peer-timeout-short",
        put("timing.peer_timeout", 0.5),
        "timing.peer_timeout",
        "three heartbeats",
    ),
    ("ack-timeout", put("timing.ack_timeout", -1), "timing.ack_timeout", "greater than 0"),
    ("timing-nan", put("timing.peer_timeout", float("nan")), "timing.peer_timeout", "finite"),
    ("timing-text", put("timing.peer_timeout", "soon"), "timing.peer_timeout", "a number"),
    ("port-0", put("ports.api", 0), "ports.api", "at least 1"),
    ("port-big", put("ports.health", 70000), "ports.health", "at most 65535"),
    ("port-dup", put("ports.peer", 7701), "ports.peer", "also the heartbeat port"),
    ("too-many-modules", many_modules, "modules", "at most 32"),
    ("module-dup", add_module(name="web"), "modules[1].name", "duplicate module name 'web'"),
    (
        "nested-dirs",
        put("modules.0.directories", [{"path": "/srv/web"}, {"path": "/srv/web/data"}]),
        "modules[0].directories[1].path",
        "inside /srv/web",
    ),
    (
        "nested-across-modules",
        add_module(directories=[{"path": "/srv"}]),
        "modules[1].directories[0].path",
        "parent of /srv/web/data",
    ),
    (
        "same-dir-two-modules",
        add_module(directories=[{"path": "/srv/web/data/"}]),
        "modules[1].directories[0].path",
        "already replicated (module 'web'",
    ),
    ("root-dir", put("modules.0.directories.0.path", "/"), "modules[0].directories[0].path", "/"),
    ("restart-attempts", put("modules.0.restart.attempts", -1), "modules[0].restart.attempts", "0"),
    (
        "restart-within",
        put("modules.0.restart.within", 0),
        "modules[0].restart.within",
        "greater than 0",
    ),
    (
        "replication-mode",
        put("modules.0.replication.mode", "fast"),
        "modules[0].replication.mode",
        "'sync', 'flush' or 'async'",
    ),
    (
        "async-lag-bytes",
        put("modules.0.replication.max_lag_bytes", 1000),
        "modules[0].replication.max_lag_bytes",
        "at least 1048576",
    ),
    (
        "split-brain-policy",
        put("modules.0.replication.split_brain", "newest"),
        "modules[0].replication.split_brain",
        "'manual', 'discard-younger-primary' or 'discard-least-changes'",
    ),
    (
        "exclude-pattern",
        put("modules.0.directories.0.exclude", ["ok/", "a/**/b/[z-a]"]),
        "modules[0].directories[0].exclude[1]",
        "gitignore syntax",
    ),
    (
        "unknown-module-key",
        put("modules.0.servce", {}),
        "modules[0].servce",
        "did you mean 'service'? allowed keys here: checkers, default_primary",
    ),
    ("unknown-top-key", put("module", []), "module", "did you mean 'modules'"),
    (
        "unknown-node-key",
        put("nodes.0.adress", "198.18.0.1"),
        "nodes[0].adress",
        "allowed keys here: address, heartbeat, name",
    ),
    (
        "service-both",
        put("modules.0.service.systemd", "nginx.service"),
        "modules[0].service.systemd",
        "not both",
    ),
    ("service-no-stop", drop("modules.0.service.stop"), "modules[0].service.stop", "required"),
    ("service-empty", put("modules.0.service", {}), "modules[0].service", "neither"),
    (
        "service-timeout",
        put("modules.0.service.stop_timeout", 0),
        "modules[0].service.stop_timeout",
        "greater than 0",
    ),
    (
        "checker-interval",
        put("modules.0.checkers.1.interval", 0),
        "modules[0].checkers[1].interval",
        "greater than 0",
    ),
    (
        "checker-timeout",
        put("modules.0.checkers.2.timeout", -2),
        "modules[0].checkers[2].timeout",
        "greater than 0",
    ),
    (
        "tcp-port-range",
        put("modules.0.checkers.0.port", 70000),
        "modules[0].checkers[0].port",
        "at most 65535",
    ),
    (
        "tcp-port-missing",
        drop("modules.0.checkers.0.port"),
        "modules[0].checkers[0].port",
        "required for a tcp checker",
    ),
    (
        "process-with-port",
        put("modules.0.checkers.1.port", 80),
        "modules[0].checkers[1].port",
        "unknown key 'port' for a process checker; allowed keys here: interval, name, on, timeout,"
        " type",
    ),
    (
        "checker-type-unknown",
        put("modules.0.checkers.1.type", "ping"),
        "modules[0].checkers[1].type",
        "use one of 'tcp', 'process', 'interface' or 'command'",
    ),
    (
        "checker-type-missing",
        drop("modules.0.checkers.1.type"),
        "modules[0].checkers[1].type",
        "required",
    ),
    ("checker-on", put("modules.0.checkers.2.on", "always"), "modules[0].checkers[2].on", "both"),
    (
        "command-relative",
        put("modules.0.checkers.1", {"type": "command", "command": "check.sh -q"}),
        "modules[0].checkers[1].command",
        "absolute path",
    ),
    (
        "command-quotes",
        put("modules.0.checkers.1", {"type": "command", "command": "/bin/check 'x"}),
        "modules[0].checkers[1].command",
        "quoting",
    ),
    (
        "checker-not-mapping",
        put("modules.0.checkers.1", "tcp"),
        "modules[0].checkers[1]",
        "mapping",
    ),
    (
        "interface-checker-name",
        put("modules.0.checkers.2.name", "a b"),
        "modules[0].checkers[2].name",
        "not a network interface name",
    ),
    (
        "command-missing",
        put("modules.0.checkers.1", {"type": "command"}),
        "modules[0].checkers[1].command",
        "required for a command checker",
    ),
    (
        "exclude-empty",
        put("modules.0.directories.0.exclude", [""]),
        "modules[0].directories[0].exclude[0]",
        "empty",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "path", "words"),
    [pytest.param(m, p, w, id=i) for i, m, p, w in BAD_CASES],
)
def test_bad_config_names_the_key(mutate: Mutation, path: str, words: str) -> None:
    data = good_data()
    mutate(data)
    problems = problems_of(data)
    matching = [p for p in problems if p.startswith(f"{path}: ")]
    assert matching, f"no problem at {path}: {problems}"
    assert any(words in p for p in matching), f"{words!r} not said: {matching}"
    for problem in problems:
        assert "; " in problem, f"no fix given: {problem}"


def test_bad_cases_are_many_and_distinct() -> None:
    assert len({case[0] for case in BAD_CASES}) == len(BAD_CASES) >= 25


def test_every_problem_of_a_file_is_reported() -> None:
    text = """\
cluster: {name: Shop, secret_file: etc/cluster.key, colour: red}
nodes:
  - {name: node1, address: 198.18.0.1, heartbeat: [198.18.0.1, 198.18.1.1]}
  - {name: node1, address: 198.18.0.1, heartbeat: [198.18.0.2]}
timing: {heartbeat_interval: 0.5, peer_timeout: 1.0}
ports: {api: 7700, heartbeat: 7700}
modules:
  - name: web
    vip: {address: 198.18.0.1/24, interface: eth0}
    directories: [{path: /srv/web}, {path: /srv/web/data}]
    replication: {mode: fast}
    checkers: [{type: tcp, address: 198.18.0.100}]
  - name: web
    directories: [{path: /srv/web}]
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml")
    paths = [p.split(": ", 1)[0] for p in info.value.problems]
    expected = [
        "cluster.name",
        "cluster.secret_file",
        "cluster.colour",
        "nodes[1].name",
        "nodes[1].address",
        "nodes[1].heartbeat",
        "timing.peer_timeout",
        "ports.heartbeat",
        "modules[0].replication.mode",
        "modules[0].checkers[0].port",
        # Cross rules still run on the valid parts of a module that has errors.
        "modules[0].vip.address",
        "modules[0].directories[1].path",
        "modules[1].name",
        "modules[1].directories[0].path",
    ]
    assert sorted(paths) == sorted(expected), info.value.problems
    assert (
        paths.index("cluster.name") < paths.index("nodes[1].name") < paths.index("modules[1].name")
    )


# --- node_checks on this host's loopback ---------------------------------------------


def write_node_files(root: Path, executable: bool = True) -> dict[str, Path]:
    """A key file and start/stop scripts under `root`."""
    key = root / "cluster.key"
    key.write_text("0123456789abcdef" * 4 + "\n")
    files = {"key": key}
    for name in ("start", "stop"):
        script = root / f"{name}.sh"
        script.write_text("#!/bin/sh\nexit 0\n")
        script.chmod(0o755 if executable else 0o644)
        files[name] = script
    return files


def loopback_config(
    files: dict[str, Path], interface: str = "lo", vip: str = "127.0.0.100/8"
) -> str:
    """A config whose node1 is this host, by its loopback address."""
    return f"""\
cluster: {{name: lab, secret_file: {files["key"]}}}
nodes:
  - {{name: node1, address: 127.0.0.1}}
  - {{name: node2, address: 198.19.255.2}}
modules:
  - name: web
    vip: {{address: {vip}, interface: {interface}}}
    service: {{start: {files["start"]}, stop: {files["stop"]}}}
    checkers:
      - {{type: command, command: "{files["start"]} --check"}}
"""


def test_node_checks_pass_on_loopback(tmp_path: Path) -> None:
    cfg = parse_config(loopback_config(write_node_files(tmp_path)))
    assert node_checks(cfg, "node1") == []


def test_node_checks_report_what_is_missing(tmp_path: Path) -> None:
    files = write_node_files(tmp_path, executable=False)
    files["key"].write_text("not a key\n")
    cfg = parse_config(loopback_config(files, interface="tdt-nope0"))
    problems = node_checks(cfg, "node1")
    assert problems == [
        f"cluster.secret_file: {files['key']} does not hold a key (64 hex characters) on node1; "
        f"create it with 'tandemctl keygen {files['key']}' and copy it to both nodes",
        "modules[0].vip.interface: no interface 'tdt-nope0' on node1 (this host has "
        + ", ".join(sorted(name for _, name in socket.if_nameindex()))
        + "); fix the interface name",
        f"modules[0].service.start: {files['start']} is not executable on node1; "
        f"run chmod +x {files['start']}",
        f"modules[0].service.stop: {files['stop']} is not executable on node1; "
        f"run chmod +x {files['stop']}",
        f"modules[0].checkers[0].command: {files['start']} is not executable on node1; "
        f"run chmod +x {files['start']}",
    ]


def test_node_checks_missing_files_and_foreign_addresses(tmp_path: Path) -> None:
    files = write_node_files(tmp_path)
    files["key"].unlink()
    files["stop"].unlink()
    cfg = parse_config(loopback_config(files, vip="198.19.255.100/24"))
    problems = node_checks(cfg, "node1")
    assert problems[0].startswith("cluster.secret_file: ")
    assert "does not exist on node1; create it with 'tandemctl keygen" in problems[0]
    assert any(
        p.startswith("modules[0].vip.address: 198.19.255.100/24 is in no subnet of lo on node1")
        for p in problems
    ), problems
    assert f"modules[0].service.stop: {files['stop']} does not exist on node1" in "\n".join(
        problems
    )
    # node2 is not this host: its address is reported, and an unknown node is refused.
    assert any(
        p.startswith("nodes[1].address: 198.19.255.2 is not configured")
        for p in node_checks(cfg, "node2")
    )
    assert node_checks(cfg, "node9") == [
        "node: 'node9' is not a node of cluster 'lab'; use one of node1, node2"
    ]


def test_node_checks_unreadable_key(tmp_path: Path) -> None:
    files = write_node_files(tmp_path)
    files["key"].unlink()
    files["key"].mkdir()
    cfg = parse_config(loopback_config(files))
    assert node_checks(cfg, "node1") == [
        f"cluster.secret_file: {files['key']} is a directory on node1; "
        f"create it with 'tandemctl keygen {files['key']}' and copy it to both nodes"
    ]


def test_node_checks_interface_per_node(tmp_path: Path) -> None:
    files = write_node_files(tmp_path)
    text = loopback_config(files).replace("interface: lo", "interface: {node1: lo, node2: eth9}")
    cfg = parse_config(text)
    assert node_checks(cfg, "node1") == []
    problems = node_checks(cfg, "node2")
    assert any(
        p.startswith("modules[0].vip.interface.node2: no interface 'eth9'") for p in problems
    )


# --- nothing but ConfigError, whatever the input -------------------------------------------------

KEYS = [
    "cluster", "name", "secret_file", "nodes", "address", "heartbeat", "witness", "port",
    "timing", "heartbeat_interval", "peer_timeout", "ack_timeout", "ports", "api", "peer",
    "health", "modules", "default_primary", "vip", "interface", "directories", "path",
    "exclude", "replication", "mode", "service", "start", "stop", "systemd", "checkers",
    "type", "on", "interval", "timeout", "command", "restart", "attempts", "within",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "198.18.0.1",
            "198.18.0.100/24",
            "/srv/x",
            "x/y",
            "tcp",
            "both",
            "sync",
            "eth0",
            "node1",
            "node2",
            "web",
            "",
            "0.0.0.0/0",
            "/",
            "a b",
            "..",
            "tcp ' x",
        ]
    ),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=5)), inner, max_size=5),
    ),
    max_leaves=30,
)


def test_keys_that_are_not_text() -> None:
    with pytest.raises(ConfigError) as info:
        bad: dict[object, object] = {1: 2, None: 3, (1, 2): 4}
        bad.update(good_data())
        config_from_data(bad)
    assert len(info.value.problems) == 3
    assert all("unknown key" in p for p in info.value.problems)
    data = good_data()
    data["modules"][0]["vip"]["interface"] = {1: "eth0"}
    assert problems_of(data)[0].startswith("modules[0].vip.interface: expected an interface")


def test_odd_keys_and_paths_are_quoted_on_one_line() -> None:
    data = good_data()
    data["modules"][0]["vip"]["interface"] = {"node1": "eth0", "node2": "eth0", "node 3": "eth0"}
    data["modules"][0]["directories"][0]["path"] = "/srv/web\ndata"
    problems = problems_of(data)
    assert any(p.startswith("modules[0].vip.interface['node 3']: ") for p in problems), problems
    assert any(p.startswith("modules[0].directories[0].path: ") for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_model_validate_enforces_the_cross_rules_too() -> None:
    data = good_data()
    data["ports"]["peer"] = 7700
    with pytest.raises(ValidationError, match=r"ports\.peer: 7700 is also the api port"):
        ClusterConfig.model_validate(data)


def assert_only_config_error(text: str) -> None:
    try:
        parse_config(text, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert isinstance(problem, str) and problem and "\n" not in problem


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_random_documents_raise_only_config_error(doc: object) -> None:
    assert_only_config_error(yaml.safe_dump(doc))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_changes_to_a_good_config_raise_only_config_error(data: st.DataObject) -> None:
    doc = good_data()
    node: Any = doc
    # Walk down a random path, then replace, remove or add something there.
    while isinstance(node, dict | list) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        if not isinstance(node[key], dict | list):
            break
        node = node[key]
    action = data.draw(st.sampled_from(["replace", "remove", "add"]))
    if isinstance(node, dict) and node:
        key = data.draw(st.sampled_from(list(node)))
        if action == "remove":
            del node[key]
        elif action == "add":
            node[data.draw(st.sampled_from(KEYS))] = data.draw(documents)
        else:
            node[key] = data.draw(documents)
    elif isinstance(node, list) and node:
        i = data.draw(st.integers(0, len(node) - 1))
        if action == "remove":
            del node[i]
        elif action == "add":
            node.append(data.draw(documents))
        else:
            node[i] = data.draw(documents)
    assert_only_config_error(yaml.safe_dump(doc))


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(list("abc:-[]{}&*!|>'\"%@` \n\t#,?0123.\x00\ufeff")), max_size=60
    )
)
def test_random_text_raises_only_config_error(text: str) -> None:
    assert_only_config_error(text)
