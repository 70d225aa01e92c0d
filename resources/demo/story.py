"""`make demo`: a real two-node cluster on this machine, and a narrated failover and failback.

Builds the namespace lab (node1, node2, a client and a witness on one LAN),
starts the witness and both agents with the demo module (an HTTP service that
stores numbered records, behind the VIP 198.18.0.100), then tells the story:
a client writes through the VIP while every write is mirrored to node2, node1
loses power, node2 takes over with every acknowledged record, the client carries
on, node1 returns and gets back only what changed (with its progress shown), and
the roles are swapped back.
Everything it made is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.cluster import DEMO_DIR, DEMO_PORT, VIP, Cluster, demo_module
from tests.integration.support import last_event_id
from tests.lab import Lab, wait_for

BATCH_MIB = 160  # what a batch job writes on node2 while node1 is away
RESYNC_RATE = 40 << 20  # the demo caps resyncs so their progress can be watched

BOLD, DIM, GREEN, RED, RESET = "\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m"


def say(text: str) -> None:
    print(f"{BOLD}▶{RESET} {text}", flush=True)


def detail(text: str) -> None:
    print(f"  {DIM}{text}{RESET}", flush=True)


class Writer(threading.Thread):
    """The client: appends a record through the VIP every 100 ms, remembering each answer."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.acked: list[tuple[float, str, int]] = []
        self.failures = 0
        self.running = True

    def run(self) -> None:
        n = 0
        while self.running:
            n += 1
            answer = self.cluster.post_record(f"order {n}".encode(), timeout=0.5)
            if answer is None:
                self.failures += 1
            else:
                self.acked.append((time.monotonic(), str(answer["node"]), int(answer["seq"])))
            time.sleep(0.1)

    def last_node(self) -> str | None:
        return self.acked[-1][1] if self.acked else None


def show_resync(cluster: Cluster, primary: str, secondary: str) -> None:
    """Print the resync's progress as `tandemctl status` shows it, until the copy is in sync."""
    deadline = time.monotonic() + 120
    last = 0.0
    while time.monotonic() < deadline:
        if cluster.state(secondary) == "SECOND" and cluster.replication(secondary).get("in_sync"):
            return
        resync = cluster.replication(primary).get("resync")
        if resync and time.monotonic() - last >= 1.0:
            last = time.monotonic()
            done, total = resync["done_bytes"], resync["total_bytes"]
            eta = "?" if resync["eta_s"] is None else f"{resync['eta_s']:.0f} s"
            detail(
                f"resync {done / 2**20:6.1f} / {total / 2**20:.1f} MiB "
                f"({100 * done / total if total else 100:3.0f}%) at "
                f"{resync['rate_bps'] / 2**20:.1f} MiB/s, ETA {eta}"
            )
        time.sleep(0.1)
    raise SystemExit(f"{secondary} did not get back in sync: see the agents' logs")


def write_batch(cluster: Cluster, node: str) -> None:
    """A batch job on `node` writes a big file through its replicated directory."""
    path = f"{DEMO_DIR}/data/batch-report.bin"
    script = f"head -c {BATCH_MIB}M /dev/urandom > {path} && sync {path}"
    done = cluster.in_mount(node, script, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"the batch job on {node} failed: {done.stderr.strip()}")


def show_status(cluster: Cluster, node: str) -> None:
    result = cluster.ctl(node, "status")
    for line in result.stdout.rstrip().splitlines():
        print(f"    {line}")


def first_answer_after(t0: float, probe: float = 0.01, timeout: float = 30) -> float | None:
    """Seconds from t0 until a TCP connect to the VIP succeeds from the client."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if LAB is not None and LAB.tcp_connect_ok(VIP, DEMO_PORT, timeout=0.2):
            return time.monotonic() - t0
        time.sleep(probe)
    return None


LAB: Lab | None = None


def story(lab: Lab) -> None:
    global LAB
    LAB = lab
    cluster = Cluster(lab, modules=[demo_module(replication={"resync_rate": RESYNC_RATE})])
    say("Building the lab: namespaces node1, node2, client and witness on one LAN (198.18.0.0/24)")
    say("Starting the witness and both agents; the demo module's VIP is 198.18.0.100")
    cluster.start()
    cluster.wait_healthy_pair("node1")
    cluster.wait_until(
        "node2 is an in-sync secondary",
        lambda: bool(cluster.replication("node2").get("in_sync")),
        timeout=60,
    )
    detail(f"{DEMO_DIR}/data is mirrored: every write returns once node2 has it")
    show_status(cluster, "node1")

    say("A client starts writing records through the VIP, ten a second (each fsynced)")
    writer = Writer(cluster)
    writer.start()
    wait_for(lambda: len(writer.acked) >= 20, 10)
    detail(f"{len(writer.acked)} records acknowledged, all by {writer.last_node()}")

    say(f"{RED}node1 loses power{RESET}: all its processes killed -9, its network link down")
    t0 = time.monotonic()
    lab.power_loss("node1")
    took = first_answer_after(t0)
    if took is None:
        raise SystemExit("the VIP did not answer from node2: see the agents' logs")
    detail(f"the VIP answers again after {took:.2f} s (peer_timeout is 1.5 s)")
    cluster.wait_state("node2", ("ALONE",))
    acked_by_node1 = {seq for _, node, seq in writer.acked if node == "node1"}
    missing = acked_by_node1 - set(cluster.records("node2"))
    detail(
        f"all {len(acked_by_node1) - len(missing)} of the {len(acked_by_node1)} records node1 "
        "acknowledged are in node2's copy"
        + ("" if not missing else f" {RED}(missing: {sorted(missing)[:5]}){RESET}")
    )
    wait_for(lambda: writer.last_node() == "node2", 10)
    detail(
        f"the client carries on: records are now acknowledged by {writer.last_node()}, "
        f"numbered on from {max(acked_by_node1, default=0)}"
    )
    say(f"Meanwhile a batch job on node2 writes a {BATCH_MIB} MiB report (journalled: no peer)")
    write_batch(cluster, "node2")
    show_status(cluster, "node2")

    say(f"{GREEN}node1 comes back{RESET}: its agent starts and finds node2 serving")
    mark = last_event_id(cluster, "node2")
    lab.power_on("node1")
    cluster.start_agent("node1")
    cluster.wait_state("node1", ("SECOND",), timeout=30)
    detail("node1 does not take the VIP back by force: it becomes SECOND and resyncs")
    detail(
        f"(only blocks that differ cross the link; the demo caps resyncs at "
        f"{RESYNC_RATE >> 20} MiB/s so the progress can be watched)"
    )
    show_resync(cluster, "node2", "node1")
    said = [e["reason"] for e in cluster.events("node2", after=mark)]
    how = [r for r in said if r.startswith("mirroring to node1:")]
    if how:
        detail(
            f"node2: {how[-1]} (node2's journal of what changed while alone, and what "
            "node1's activity log says it may have held in flight when it lost power)"
        )
    detail("node1 is an up-to-date secondary again; the application never stopped")
    show_status(cluster, "node1")

    say("The operator swaps the roles back: tandemctl swap web")
    t0 = time.monotonic()
    result = cluster.ctl("node1", "swap", "web")
    detail(
        f"{result.stdout.strip()} ({time.monotonic() - t0:.2f} s, application stop and start "
        "included)"
    )
    cluster.wait_healthy_pair("node1")
    wait_for(lambda: writer.last_node() == "node1", 10)
    writer.running = False
    writer.join(5)
    show_status(cluster, "node1")
    cluster.wait_until(
        "node2 is in sync after the swap",
        lambda: bool(cluster.replication("node2").get("in_sync")),
        timeout=60,
    )
    say("Both copies compared block by block while the application runs: tandemctl verify web")
    for line in cluster.ctl("node1", "verify", "web").stdout.splitlines():
        detail(line)
    served = {node for _, node, _ in writer.acked}
    say(
        f"The client wrote {len(writer.acked)} records, served by {', '.join(sorted(served))}; "
        f"{writer.failures} attempts failed while the VIP moved"
    )
    say("The event log of node1 tells the story with reasons:")
    for line in cluster.ctl("node1", "logs", "web", "-n", "12").stdout.splitlines():
        print(f"    {line}")
    cluster.stop_agents()


def interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    if os.geteuid() != 0:
        print(
            "make demo needs root: it builds network namespaces, VIPs and cgroups", file=sys.stderr
        )
        return 1
    signal.signal(signal.SIGTERM, interrupted)
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        say("A display is present, but the console comes in a later milestone: narrating")
    with tempfile.TemporaryDirectory(prefix="tandem-demo-") as tmp:
        try:
            with Lab(Path(tmp)) as lab:
                story(lab)
        except KeyboardInterrupt:
            print("\ninterrupted: the lab has been removed", file=sys.stderr)
            return 130
    say("Done: the lab, its namespaces, processes and VIPs are gone")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
