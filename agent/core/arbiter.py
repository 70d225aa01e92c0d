"""The witness's grant rule: one unexpired lease per (cluster, module), never two holders.

The primary renews its lease every heartbeat; another node is granted only
once that lease has expired, and only if its data generation is the one the
last holder reported (DRBD's outdate-peer, kept by the witness): a node that
missed writes its peer made alone is never let in by the lease alone. A
restarted witness restores the holders it persisted and gives each a full
lease from the restart, so it never lets the other node in early. Pure: time
is an argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from agent.core.frames import LeaseItem, Verdict

LeaseKey = tuple[str, str]  # (cluster, module)


@dataclass
class Lease:
    """Who holds a module's lease, until when, and the duration it was granted for."""

    holder: str
    expires: float
    duration: float


class Arbiter:
    """Grants leases per (cluster, module).

    `started` (the witness's start time) is set when the witness may have lost
    its state: until `started + duration`, a lease it knows nothing about is
    only granted to a node that renews it (the node that held it before), so a
    forgotten holder is never doubled.
    """

    def __init__(self, started: float | None = None) -> None:
        self._leases: dict[LeaseKey, Lease] = {}
        self._started = started
        # (node, generation) the last holder reported; kept across releases and expiries.
        self._generations: dict[LeaseKey, tuple[str, int]] = {}

    def decide(
        self, cluster: str, node: str, item: LeaseItem, duration: float, now: float
    ) -> Verdict:
        """Apply one request item from `node` at `now` and say what the witness answers."""
        if not duration > 0:
            raise ValueError(f"lease duration must be positive, got {duration}")
        key = (cluster, item.module)
        lease = self._leases.get(key)
        recorded = self._generations.get(key)
        if item.action == "release":
            verdict = self._release(key, lease, node, now)
            return replace(verdict, generation=recorded[1] if recorded else 0)
        if (
            item.action == "acquire"
            and item.generation
            and recorded is not None
            and recorded[0] != node
            and recorded[1] != item.generation
            and (lease is None or lease.holder != node)
        ):
            return Verdict(
                item.module,
                False,
                None,
                1.0,
                f"data outdated here: {recorded[0]} last served generation {recorded[1]:016x} "
                f"and this node holds {item.generation:016x}; it must resync from {recorded[0]} "
                "(`prim --force` accepts losing what it wrote)",
                recorded[1],
            )
        if lease is not None and lease.holder != node and now < lease.expires:
            return Verdict(
                item.module,
                False,
                lease.holder,
                lease.expires - now,
                f"lease held by {lease.holder} for another {lease.expires - now:.1f} s",
            )
        if lease is None and item.action == "acquire" and self._started is not None:
            wait = self._started + duration - now
            if wait > 0:
                return Verdict(
                    item.module,
                    False,
                    None,
                    wait,
                    f"witness restarted without its lease records; granting in {wait:.1f} s",
                )
        if lease is not None and lease.holder == node:
            # A renewal never shortens a lease already granted: the holder may rely on it.
            lease.expires = max(lease.expires, now + duration)
            lease.duration = duration
            reason = f"lease renewed for {duration:g} s"
        else:
            previous = f" (the lease of {lease.holder} expired)" if lease else ""
            lease = Lease(node, now + duration, duration)
            self._leases[key] = lease
            reason = f"lease granted for {duration:g} s{previous}"
        if item.generation:
            self._generations[key] = (node, item.generation)
        generation = self._generations.get(key, (node, 0))[1]
        return Verdict(item.module, True, node, lease.expires - now, reason, generation)

    def _release(self, key: LeaseKey, lease: Lease | None, node: str, now: float) -> Verdict:
        if lease is None:
            return Verdict(key[1], True, None, 0.0, "no lease to release")
        if lease.holder != node:
            remaining = max(0.0, lease.expires - now)
            return Verdict(
                key[1], False, lease.holder, remaining, f"not released: held by {lease.holder}"
            )
        del self._leases[key]
        return Verdict(key[1], True, None, 0.0, "lease released")

    def holders(self) -> dict[LeaseKey, str]:
        """The last holder of every lease, expired ones included (what the witness persists)."""
        return {key: lease.holder for key, lease in self._leases.items()}

    def leases(self) -> dict[LeaseKey, Lease]:
        """A copy of every lease, with its duration (persisted so a restore uses the same)."""
        return {k: Lease(v.holder, v.expires, v.duration) for k, v in self._leases.items()}

    def generations(self) -> dict[LeaseKey, tuple[str, int]]:
        """The data generation each module's last holder reported (persisted by the witness)."""
        return dict(self._generations)

    def restore_generations(self, generations: Mapping[LeaseKey, tuple[str, int]]) -> None:
        self._generations.update(generations)

    def restore(self, holders: Mapping[LeaseKey, str], now: float, duration: float) -> None:
        """Give each persisted holder a full lease from `now`, the witness's restart time."""
        if not duration > 0:
            raise ValueError(f"lease duration must be positive, got {duration}")
        for key, holder in holders.items():
            self._leases[key] = Lease(holder, now + duration, duration)
