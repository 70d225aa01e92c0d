"""The API's data shapes, shared with the console (no FUSE, netlink or Qt here)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from agent.core.states import DataState, State


class LinkStatus(BaseModel):
    index: int
    local: str
    peer: str
    up: bool
    silent_for: float | None = Field(description="seconds since the peer was last heard here")


class PeerStatus(BaseModel):
    name: str
    address: str
    reachable: bool
    links: list[LinkStatus]
    problem: str | None = Field(None, description="why the peers refuse to work together")
    dropped_forged: int = 0
    dropped_replayed: int = 0


class WitnessStatus(BaseModel):
    configured: bool
    address: str | None = None
    reachable: bool = False


class ResyncStatus(BaseModel):
    done_bytes: int
    total_bytes: int
    rate_bps: float
    eta_s: float | None


class Latency(BaseModel):
    p50: float | None = None
    p99: float | None = None


class ReplicationFigures(BaseModel):
    role: str | None = Field(
        default=None, description="primary (mirroring) or secondary (receiving)"
    )
    connected: bool = False
    in_sync: bool = False
    generation: str | None = None
    problem: str | None = None
    lag_ms: float = 0.0
    ack_latency_ms: Latency = Latency()
    pending_bytes: int = 0
    throughput_bps: float = 0.0
    resync: ResyncStatus | None = None
    quarantine_bytes: int = Field(default=0, description="bytes of files kept aside by resyncs")


class CheckerStatus(BaseModel):
    name: str
    type: str
    on: str
    ok: bool | None
    detail: str


class ModuleStatus(BaseModel):
    name: str
    state: State
    colour: str
    data: DataState
    peer_state: State | None = Field(description="null while the peer cannot be reached")
    peer_data: DataState | None
    vip: str | None
    vip_held: bool
    service: str
    reason: str
    since: float = Field(description="unix time of the last state change")
    running: bool = Field(description="false once an administrator stopped it here")
    maintenance: bool
    restarts: int
    checkers: list[CheckerStatus]
    replication: ReplicationFigures


class NodeStatus(BaseModel):
    name: str
    address: str
    version: str
    config_hash: str
    started: float


class Status(BaseModel):
    cluster: str
    node: NodeStatus
    peer: PeerStatus
    witness: WitnessStatus
    modules: list[ModuleStatus]


class CommandRequest(BaseModel):
    command: str
    timeout: float = Field(30.0, gt=0, le=3600)
    wait: bool = True


class ResolveRequest(BaseModel):
    keep: str = Field(description="the node whose data is kept")


class DataResult(BaseModel):
    """The outcome of `resolve` or `verify`."""

    module: str
    accepted: bool
    reason: str
    differing: list[str] = Field(default_factory=list, description="verify: paths that differ")
    compared: int = 0
    seconds: float = 0.0


class CommandResult(BaseModel):
    module: str
    command: str
    accepted: bool
    done: bool
    reason: str
    state: State | None = None
    peer_state: State | None = None


class EventOut(BaseModel):
    id: int
    ts: float
    node: str
    module: str | None
    kind: str
    state: str | None
    reason: str
    detail: dict[str, Any] | None = None


class ErrorOut(BaseModel):
    detail: str
