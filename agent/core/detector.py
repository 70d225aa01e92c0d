"""Heartbeat failure detection: a peer is lost when every link has been silent for peer_timeout.

Pure: the caller says when a datagram was heard and what time it is now.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinkStatus:
    """One heartbeat link as seen now; silent_for is None when nothing was ever heard on it."""

    index: int
    up: bool
    silent_for: float | None


class FailureDetector:
    """Tracks the last datagram heard on each heartbeat link of one peer."""

    def __init__(self, links: int, peer_timeout: float) -> None:
        if links < 1:
            raise ValueError(f"a peer needs at least one heartbeat link, got {links}")
        if not peer_timeout > 0:
            raise ValueError(f"peer_timeout must be positive, got {peer_timeout}")
        self.peer_timeout = peer_timeout
        self._last: list[float | None] = [None] * links

    def _check(self, link: int) -> None:
        if not 0 <= link < len(self._last):
            raise ValueError(f"link {link} out of range 0..{len(self._last) - 1}")

    def heard(self, link: int, now: float) -> None:
        """Record a good heartbeat received on `link` at `now`."""
        self._check(link)
        last = self._last[link]
        # A late-processed datagram must not move the link's last contact backwards.
        self._last[link] = now if last is None else max(last, now)

    def reset(self) -> None:
        """Forget every contact (e.g. after the peer's configuration changed)."""
        self._last = [None] * len(self._last)

    def _up(self, last: float | None, now: float) -> bool:
        return last is not None and now - last < self.peer_timeout

    def link_up(self, link: int, now: float) -> bool:
        """True if `link` carried a heartbeat within peer_timeout."""
        self._check(link)
        return self._up(self._last[link], now)

    def links(self, now: float) -> list[LinkStatus]:
        """Every link's state, for status reports."""
        return [
            LinkStatus(i, self._up(last, now), None if last is None else max(0.0, now - last))
            for i, last in enumerate(self._last)
        ]

    def up_count(self, now: float) -> int:
        """How many links carried a heartbeat within peer_timeout."""
        return sum(self._up(last, now) for last in self._last)

    def peer_alive(self, now: float) -> bool:
        """True if some link carried a heartbeat within peer_timeout; never heard is not alive."""
        return self.up_count(now) > 0

    def silence(self, now: float) -> float | None:
        """Seconds since the last heartbeat on any link; None if none was ever heard."""
        heard = [last for last in self._last if last is not None]
        return max(0.0, now - max(heard)) if heard else None

    def lost_reason(self, now: float) -> str:
        """Words for the peer's state, used in transition reasons and status."""
        total = len(self._last)
        silence = self.silence(now)
        if silence is None:
            return f"peer never heard on {total} link{'s' if total != 1 else ''}"
        up = self.up_count(now)
        if up:
            return f"peer alive on {up}/{total} links"
        return f"peer lost on {total}/{total} links for {silence:.1f} s"
