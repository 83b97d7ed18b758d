"""Counters a server keeps for its ``--stats-interval`` line."""

from __future__ import annotations

import time


class ServerStats:
    """Messages handled and handler times since the last report (loop thread only)."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.connections_rejected = 0  # accepted at max_connections and closed at once
        self.messages_total = 0
        self._times: list[float] = []
        self._since = time.monotonic()

    def record(self, elapsed: float) -> None:
        self.messages_total += 1
        times = self._times
        if len(times) < 100_000:  # a bounded sample per interval
            times.append(elapsed)

    def snapshot(self) -> tuple[float, float, float]:
        """Messages/s, and handler p50 and p99 in ms, since the last snapshot."""
        now = time.monotonic()
        times, self._times = sorted(self._times), []
        rate = len(times) / max(1e-9, now - self._since)
        self._since = now

        def pct(p: float) -> float:
            return times[min(len(times) - 1, int(p * len(times)))] * 1000 if times else 0.0

        return rate, pct(0.5), pct(0.99)

    def line(self, connections: int, queued: int) -> str:
        return format_line(connections, *self.snapshot(), queued)


def format_line(connections: int, rate: float, p50_ms: float, p99_ms: float, queued: int) -> str:
    """The ``--stats-interval`` line, the same for one process or many."""
    return (f"connections={connections} messages/s={rate:.0f} handler p50={p50_ms:.2f}ms "
            f"p99={p99_ms:.2f}ms queued={queued}")
