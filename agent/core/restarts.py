"""Local restarts before failover: `restart: {attempts, within}` as a pure policy."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum


class RestartVerdict(StrEnum):
    RESTART = "restart"
    GIVE_UP = "give_up"


@dataclass
class RestartPolicy:
    """Allows `attempts` local restarts within a sliding window of `within` seconds.

    The failure after the last allowed restart gives the module up on this node,
    so the peer can take over instead of the application flapping here.
    """

    attempts: int
    within: float
    _restarts: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.attempts < 0:
            raise ValueError(f"restart.attempts must be 0 or more, got {self.attempts}")
        if not self.within >= 0:
            raise ValueError(f"restart.within must be 0 seconds or more, got {self.within}")

    def on_failure(self, now: float) -> RestartVerdict:
        """A failure at `now`: restart here while the window's budget lasts, else give up."""
        while self._restarts and now - self._restarts[0] > self.within:
            self._restarts.popleft()
        if len(self._restarts) >= self.attempts:
            return RestartVerdict.GIVE_UP
        self._restarts.append(now)
        return RestartVerdict.RESTART

    def used(self, now: float) -> int:
        """How many restarts count against the budget at `now`."""
        return sum(1 for t in self._restarts if now - t <= self.within)

    def reset(self) -> None:
        """Forget past restarts (an administrator started the module again)."""
        self._restarts.clear()
