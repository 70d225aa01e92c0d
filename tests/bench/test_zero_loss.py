"""Benchmark: the zero-loss checker over more faults than CI runs.

The same checker as tests/integration/test_replication.py (tests/zero_loss.py): a client
appends records through the VIP, each fsynced before its HTTP 200, while the primary loses
power (all its processes killed -9, its link down) or only its agent is killed, in turn,
BENCH_ZERO_LOSS_CYCLES times (default 40; CI runs 10). After each fault every acknowledged
record must be on the node that took over; after each return an incremental resync (the
activity log gives back what was in flight) and identical copies. It fails only on a lost
record, a full comparison or copies that differ; the times are printed, never asserted.
"""

from __future__ import annotations

import pytest

from tests.bench.conftest import median, ms, report, zero_loss_cycles
from tests.cluster import Cluster
from tests.lab import Lab
from tests.zero_loss import Cycle, run_cycles

pytestmark = pytest.mark.timeout(7200)

CYCLES = zero_loss_cycles()


def _row(fault: str, cycles: list[Cycle]) -> list[str]:
    serving = [c.serving_s for c in cycles]
    resynced = [c.resynced_s for c in cycles]
    return [
        fault,
        str(len(cycles)),
        f"{ms(median(serving))} / {ms(max(serving))}",
        f"{ms(median(resynced))} / {ms(max(resynced))}",
        str(sum("incremental" in c.resync for c in cycles)),
        str(max(c.checked for c in cycles)),
    ]


def test_no_acknowledged_record_is_lost_over_many_faults(lab: Lab) -> None:
    cluster = Cluster(lab).start()
    try:
        cycles = run_cycles(lab, cluster, CYCLES)
    finally:
        cluster.stop_agents()
    rows = [
        _row(fault, [c for c in cycles if c.fault == fault])
        for fault in ("power loss", "agent kill")
    ]
    report(
        f"Zero-loss checker, {CYCLES} faults of the primary under a writer "
        "(every acknowledged record found on the node that took over, after each fault)",
        [
            "fault",
            "cycles",
            "the other node serves: median / max",
            "back in sync: median / max",
            "incremental resyncs",
            "records acknowledged by the last fault (every one found)",
        ],
        rows,
    )
