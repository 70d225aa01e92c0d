"""Benchmark: does a busy machine make the cluster fail over when nothing failed?

A healthy pair (default timing) is watched first on a quiet machine (the baseline, a quarter
of the loaded period), then for BENCH_LOAD_SECONDS (default 600) with every core saturated
(stress-ng, else Python busy loops: 2 per core) and disks busy (write + fsync loops in
/tmp), all on the host the lab runs on. Counted: the module's transitions in both agents'
event logs (what `tandemctl logs web` shows) and the VIP's address events. The largest
heartbeat silence is sampled from each agent's status (its link's `silent_for`, every
0.2 s). Goal: 0 false failovers.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from tests.bench.conftest import CpuMeter, Load, load_seconds, ratio, report
from tests.cluster import VIP, Cluster
from tests.lab import DEFAULT_TIMING, Lab, VipWatch

PEER_TIMEOUT = DEFAULT_TIMING["peer_timeout"]
NODES = ("node1", "node2")
SAMPLE_EVERY = 0.2


@dataclass
class Watched:
    """What one period showed."""

    seconds: float
    samples: int = 0
    unanswered: int = 0
    max_silence: dict[str, float] = field(default_factory=lambda: dict.fromkeys(NODES, 0.0))
    transitions: list[tuple[str, str, str]] = field(default_factory=list)
    vip_events: int = 0
    busy: float = 0.0

    @property
    def silence(self) -> float:
        """The largest silence either node saw (s)."""
        return max(self.max_silence.values())

    @property
    def false_failovers(self) -> int:
        """Transitions logged while nothing failed (each one is a false alarm)."""
        return len(self.transitions)


def last_id(cluster: Cluster, node: str) -> int:
    """The newest event id in `node`'s log of the module (0 if none)."""
    events = cluster.events(node)
    return int(events[-1]["id"]) if events else 0


def link_silence(status: dict[str, Any]) -> float | None:
    """How long the peer has been silent on every link (the detector's view: the least)."""
    silent = [link["silent_for"] for link in status["peer"]["links"]]
    if not silent or any(s is None for s in silent):
        return None
    return float(min(silent))


def observe(cluster: Cluster, watch: VipWatch, seconds: float) -> Watched:
    """Sample both agents every 0.2 s for `seconds`; then read their event logs."""
    seen = Watched(seconds)
    marks = {node: last_id(cluster, node) for node in NODES}
    vip_mark = len(watch.events)
    meter = CpuMeter()
    started = time.monotonic()
    next_sample = started
    while (now := time.monotonic()) < started + seconds:
        if now < next_sample:
            time.sleep(next_sample - now)
        next_sample += SAMPLE_EVERY
        for node in NODES:
            status = cluster.status(node)
            seen.samples += 1
            if status is None:
                seen.unanswered += 1
                continue
            silence = link_silence(status)
            if silence is not None:
                seen.max_silence[node] = max(seen.max_silence[node], silence)
    seen.busy = meter.busy()
    for node in NODES:
        for event in cluster.events(node, after=marks[node]):
            if event["kind"] == "transition":
                seen.transitions.append((node, str(event["state"]), str(event["reason"])))
    seen.vip_events = len(watch.events) - vip_mark
    return seen


def test_false_failovers_under_load(lab: Lab, cpu_hog: str | None) -> None:
    seconds = load_seconds()
    cluster = Cluster(lab).start()
    cluster.wait_healthy_pair("node1")
    print(f"\nload average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with lab.watch_vip(VIP) as watch:
        idle = observe(cluster, watch, max(10.0, seconds / 4))
        with Load(seconds, cpu_hog) as load:
            loaded = observe(cluster, watch, seconds)
        most = watch.holders_at_any_instant()
    assert most <= 1, f"both nodes held the VIP at once: {watch.events}"

    def row(name: str, w: Watched, extra: str) -> list[str]:
        return [
            name,
            f"{w.seconds:.0f} s",
            f"{w.busy:.0%}",
            str(w.false_failovers),
            str(w.vip_events),
            f"{w.silence * 1000:.0f} ms",
            ratio(w.silence, idle.silence),
            ratio(w.silence, PEER_TIMEOUT),
            f"{w.unanswered}/{w.samples}",
            extra,
        ]

    report(
        f"False failovers under load (default timing, peer_timeout {PEER_TIMEOUT:g} s)",
        [
            "period",
            "length",
            "CPU busy",
            "transitions",
            "VIP events",
            "max silence",
            "÷ idle",
            "÷ peer_timeout",
            "status unanswered",
            "load",
        ],
        [
            row("idle (baseline)", idle, "none"),
            row(
                "**loaded**",
                loaded,
                f"{load.cpu_tool}; {load.writers} writers, {load.fsyncs} × 64 KiB write+fsync",
            ),
        ],
    )
    for node, state, reason in idle.transitions + loaded.transitions:
        print(f"transition on {node}: {state} — {reason}")
    verdict = "met" if loaded.false_failovers == 0 and loaded.vip_events == 0 else "NOT met"
    print(
        f"goal: 0 false failovers — {verdict} ({loaded.false_failovers} transitions, "
        f"{loaded.vip_events} VIP events in {seconds} s under load); max silence is "
        f"sampled every {SAMPLE_EVERY:g} s, so the true maximum may be up to that much longer",
        flush=True,
    )
