"""Counters a server keeps for its ``--stats-interval`` line.

Every connection counts its own messages (``conn.messages``, one writer: the
thread that frames them), and the server's total is the closed connections'
sum plus the open ones' (:attr:`ServerStats.messages_total`, summed when read):
no second counter per message. Message engines report each handler call's
time on the loop thread (:meth:`ServerStats.record`). A connection with its
own thread or greenlet (``threaded``, ``gevent``) times its calls in a
:class:`Tally` of its own instead, and the loop thread collects every tally
when it writes the line: one writer per list and no lock, so the threaded
fast path pays two clock reads and an append per message, and only when
stats are on.

With metrics on (``metrics_port``), the same counters feed Prometheus: handler
times also land in :class:`Histogram` buckets (on the loop thread, or when the
loop collects a tally), and each connection keeps its own bytes, messages,
errors and :data:`close reason <CLOSE_REASONS>`, folded into the server's
totals once it closes (:meth:`ServerStats.closed`). A scrape reads a
:class:`MetricsSnapshot` built on the loop thread; nothing per message calls
``prometheus_client``.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Iterable

_SAMPLES = 100_000  # a bounded sample of handler times per interval

# Why a connection ended: set once, where it ends (the first reason wins), and
# read by the metrics and the access log.
CLOSE_REASONS = (
    "eof",  # the client closed first
    "idle",  # idle_timeout
    "write_timeout",  # the client stopped taking replies
    "protocol_error",  # a bad or oversized frame, or a TLS error
    "reset",  # the socket failed: reset by the peer, a broken pipe
    "drain",  # the server drained (shutdown, SIGTERM, a prefork worker replaced)
    "closed",  # the handler called conn.close()
    "handler_error",  # a handler raised, or returned a reply the framing cannot carry
    "handler_timeout",  # handler_timeout
    "tls_timeout",  # no TLS handshake within tls_handshake_timeout
    "shutdown",  # closed hard: stop_now, or drain_timeout ran out
)
# Handler time buckets (seconds, upper bounds; +Inf follows): 100 µs to 10 s.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
           0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


_bucket = partial(bisect_left, BUCKETS)


def set_reason(conn: Any, reason: str) -> None:
    """Record why ``conn`` ends, unless an earlier reason is already recorded."""
    if conn.close_reason is None:
        conn.close_reason = reason


def handler_failed(conn: Any) -> None:
    """A handler call of ``conn`` failed: counted, and the reason it closes."""
    conn.errors += 1
    set_reason(conn, "handler_error")


class Histogram:
    """Handler times in :data:`BUCKETS` (one count per bucket, not cumulative)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0  # seconds, summed

    def observe(self, elapsed: float) -> None:
        self.counts[bisect_left(BUCKETS, elapsed)] += 1
        self.total += elapsed

    def observe_all(self, times: list[float]) -> None:
        counts = self.counts
        # Counter, map and sum run in C: about twice as fast as a loop of observe().
        for index, count in Counter(map(_bucket, times)).items():
            counts[index] += count
        self.total += sum(times)


@dataclass
class MetricsSnapshot:
    """Everything a scrape reports of one server (or of every prefork worker, summed)."""

    open_connections: int = 0
    accepted: int = 0
    rejected: int = 0  # at max_connections, closed at once (never a connection)
    closed: dict = field(default_factory=lambda: dict.fromkeys(CLOSE_REASONS, 0))
    messages: int = 0
    handler_errors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    queued: int = 0
    buckets: list = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    handler_seconds: float = 0.0
    # The engine's own handler pool, summed (a prefork worker publishes it):
    # (max_workers, PoolStats), or None for an engine that runs handlers itself.
    handler_pool: Any = None


class Tally:
    """One connection's handler times since the loop last collected them."""

    __slots__ = ("times", "done")

    def __init__(self) -> None:
        self.times: list[float] = []  # appended by the connection, emptied from the front by the loop
        self.done = False  # the connection handles no more messages

    def add(self, elapsed: float) -> None:
        if len(self.times) < _SAMPLES:
            self.times.append(elapsed)


class ServerStats:
    """Messages handled and handler times since the last report (loop thread only)."""

    def __init__(self, metrics: bool = False, counted: bool = True) -> None:
        self.connections_total = 0
        self.connections_rejected = 0  # accepted at max_connections and closed at once
        # Connections keep bytes and messages only for a reader: metrics, the
        # access log, the stats line, a prefork worker's totals. Otherwise no
        # per-message counter runs, and these stay 0.
        self.counted = counted
        self._closed_messages = 0  # of the connections that have closed
        self.live: Iterable[Any] = ()  # the open connections (the server's, a view)
        self._times: list[float] = []
        self._since = time.monotonic()
        self._counted = 0  # messages_total at the last snapshot
        self._tallies: set[Tally] = set()
        # With metrics on: buckets, and the totals of connections that have closed.
        self.histogram = Histogram() if metrics else None
        self.timed = metrics  # connections with their own thread keep a Tally
        # None when every on_message call is timed on its way in (the inline path's wrapper).
        self.observe = self.histogram.observe if self.histogram is not None else None
        # The inline engines' handler times, appended by their sessions' timed
        # on_message (server_metrics.timed_sessions), on whichever thread ran the call.
        self.inline_times: list[float] | None = [] if metrics else None
        self.closed_by = dict.fromkeys(CLOSE_REASONS, 0)
        self.bytes_in = self.bytes_out = self.handler_errors = 0

    @property
    def messages_total(self) -> int:
        """Messages received since the server started (loop thread)."""
        return self._closed_messages + sum(conn.messages for conn in self.live)

    def record(self, elapsed: float) -> None:
        times = self._times
        if len(times) < _SAMPLES:
            times.append(elapsed)
        if self.observe is not None:
            self.observe(elapsed)

    def closed(self, conn: Any) -> None:
        """Fold a closed connection's counters into the totals (loop thread)."""
        self.closed_by[conn.close_reason or "eof"] += 1
        self._closed_messages += conn.messages
        self.bytes_in += conn.bytes_in
        self.bytes_out += conn.bytes_out
        self.handler_errors += conn.errors

    def metrics(self, live: Iterable[Any], queued: int) -> MetricsSnapshot:
        """What a scrape reports, with ``live`` the open connections (loop thread)."""
        self.collect()
        live = list(live)
        histogram = self.histogram or Histogram()
        return MetricsSnapshot(
            open_connections=len(live), accepted=self.connections_total,
            rejected=self.connections_rejected, closed=dict(self.closed_by),
            messages=self.messages_total,
            handler_errors=self.handler_errors + sum(conn.errors for conn in live),
            bytes_in=self.bytes_in + sum(conn.bytes_in for conn in live),
            bytes_out=self.bytes_out + sum(conn.bytes_out for conn in live),
            queued=queued, buckets=list(histogram.counts), handler_seconds=histogram.total)

    def tally(self) -> Tally:
        """A new connection's own counter (loop thread), collected at each snapshot."""
        tally = Tally()
        self._tallies.add(tally)
        return tally

    def collect(self) -> None:
        """Fold every connection's tally in (loop thread)."""
        for tally in list(self._tallies):
            done = tally.done  # read first: a tally marked done gets no more adds
            taken = len(tally.times)
            room = _SAMPLES - len(self._times)
            self._times.extend(tally.times[:min(taken, max(room, 0))])
            if self.histogram is not None:
                self.histogram.observe_all(tally.times[:taken])
            del tally.times[:taken]  # only what was read: an add meanwhile stays for next time
            if done:
                self._tallies.discard(tally)
        inline = self.inline_times
        if inline:
            taken = len(inline)
            self.histogram.observe_all(inline[:taken])
            del inline[:taken]

    def snapshot(self) -> tuple[float, float, float]:
        """Messages/s, and handler p50 and p99 in ms, since the last snapshot."""
        self.collect()
        now = time.monotonic()
        times, self._times = sorted(self._times), []
        # From the count, not the sample: the sample stops growing at _SAMPLES.
        total = self.messages_total
        rate = (total - self._counted) / max(1e-9, now - self._since)
        self._since, self._counted = now, total

        def pct(p: float) -> float:
            return times[min(len(times) - 1, int(p * len(times)))] * 1000 if times else 0.0

        return rate, pct(0.5), pct(0.99)

    def line(self, connections: int, queued: int) -> str:
        return format_line(connections, *self.snapshot(), queued)


def format_line(connections: int, rate: float, p50_ms: float, p99_ms: float, queued: int) -> str:
    """The ``--stats-interval`` line, the same for one process or many."""
    return (f"connections={connections} messages/s={rate:.0f} handler p50={p50_ms:.2f}ms "
            f"p99={p99_ms:.2f}ms queued={queued}")
