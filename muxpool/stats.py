"""Counters a server keeps for its ``--stats-interval`` line.

Message engines report each handler call on the loop thread
(:meth:`ServerStats.record`). A connection with its own thread or greenlet
(``threaded``, ``gevent``) times its calls in a :class:`Tally` of its own
instead, and the loop thread collects every tally when it writes the line:
one writer per counter and no lock, so the threaded fast path pays two clock
reads and an append per message, and only when stats are on.
"""

from __future__ import annotations

import time

_SAMPLES = 100_000  # a bounded sample of handler times per interval


class Tally:
    """One connection's handler calls since the loop last collected them."""

    __slots__ = ("count", "seen", "times", "done")

    def __init__(self) -> None:
        self.count = 0  # written by the connection's thread only
        self.seen = 0  # written by the loop thread only
        self.times: list[float] = []  # appended by the connection, emptied from the front by the loop
        self.done = False  # the connection handles no more messages

    def add(self, elapsed: float) -> None:
        self.count += 1
        if len(self.times) < _SAMPLES:
            self.times.append(elapsed)


class ServerStats:
    """Messages handled and handler times since the last report (loop thread only)."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.connections_rejected = 0  # accepted at max_connections and closed at once
        self.messages_total = 0
        self._times: list[float] = []
        self._since = time.monotonic()
        self._counted = 0  # messages_total at the last snapshot
        self._tallies: set[Tally] = set()

    def record(self, elapsed: float) -> None:
        self.messages_total += 1
        times = self._times
        if len(times) < _SAMPLES:
            times.append(elapsed)

    def tally(self) -> Tally:
        """A new connection's own counter (loop thread), collected at each snapshot."""
        tally = Tally()
        self._tallies.add(tally)
        return tally

    def collect(self) -> None:
        """Fold every connection's tally in (loop thread)."""
        for tally in list(self._tallies):
            done = tally.done  # read first: a tally marked done gets no more adds
            count = tally.count
            self.messages_total += count - tally.seen
            tally.seen = count
            taken = len(tally.times)
            room = _SAMPLES - len(self._times)
            self._times.extend(tally.times[:min(taken, max(room, 0))])
            del tally.times[:taken]  # only what was read: an add meanwhile stays for next time
            if done:
                self._tallies.discard(tally)

    def snapshot(self) -> tuple[float, float, float]:
        """Messages/s, and handler p50 and p99 in ms, since the last snapshot."""
        self.collect()
        now = time.monotonic()
        times, self._times = sorted(self._times), []
        # From the count, not the sample: the sample stops growing at _SAMPLES.
        rate = (self.messages_total - self._counted) / max(1e-9, now - self._since)
        self._since, self._counted = now, self.messages_total

        def pct(p: float) -> float:
            return times[min(len(times) - 1, int(p * len(times)))] * 1000 if times else 0.0

        return rate, pct(0.5), pct(0.99)

    def line(self, connections: int, queued: int) -> str:
        return format_line(connections, *self.snapshot(), queued)


def format_line(connections: int, rate: float, p50_ms: float, p99_ms: float, queued: int) -> str:
    """The ``--stats-interval`` line, the same for one process or many."""
    return (f"connections={connections} messages/s={rate:.0f} handler p50={p50_ms:.2f}ms "
            f"p99={p99_ms:.2f}ms queued={queued}")
