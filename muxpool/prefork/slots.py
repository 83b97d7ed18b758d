"""What each prefork worker publishes to its supervisor and its siblings.

One ``RawArray`` of 64-bit integers (the lesson's ``multiprocessing.Array``,
without a lock: each field has one writer, the worker, and a reader that
sees a value a moment old loses nothing) holds a row of :data:`FIELDS` per
worker slot. :class:`WorkerSlot` names the fields of one row.

With metrics on, each worker also publishes its
:class:`~muxpool.stats.MetricsSnapshot` counters here, with its heartbeat
(:meth:`WorkerSlot.publish`); the supervisor sums the live rows and the
final rows of workers that have exited (:func:`metrics_snapshot`).
"""

from __future__ import annotations

from multiprocessing.sharedctypes import RawArray
from typing import Iterable

from ..stats import BUCKETS, CLOSE_REASONS, MetricsSnapshot

_CLOSED = tuple(f"closed_{reason}" for reason in CLOSE_REASONS)
_BUCKETS = tuple(f"bucket_{index}" for index in range(len(BUCKETS) + 1))  # the last: +Inf
_POOL_COUNTERS = ("pool_submitted", "pool_completed", "pool_failed")
_POOL_GAUGES = ("pool_max_workers", "pool_workers", "pool_busy", "pool_queued")
_METRIC_COUNTERS = ("rejected_total", "handler_errors", "bytes_in", "bytes_out",
                    "handler_us") + _CLOSED + _BUCKETS + _POOL_COUNTERS  # handler_us: handler time, summed
FIELDS = (
    "connections_total",  # counters: summed over workers, past and present
    "messages_total",
    *_METRIC_COUNTERS,
    "open_connections",  # gauges: now, or over the last stats interval
    "p50_us",
    "p99_us",
    "queued",
    *_POOL_GAUGES,  # the worker engine's handler threads (threadpool), now
    "heartbeat",  # time.monotonic_ns() (one clock for every process) when its loop last ran
)
COUNTERS = ("connections_total", "messages_total") + _METRIC_COUNTERS
# What the heartbeat holds before a worker's first beat: a free slot, or a worker
# the supervisor has started whose loop has not run yet.
UNUSED, STARTING = 0, 1


def make_shared(slots: int):
    return RawArray("q", slots * len(FIELDS))


def slot_count(shared) -> int:
    return len(shared) // len(FIELDS)


class WorkerSlot:
    """One worker's row of the shared array, by name."""

    __slots__ = ("_base", "_shared", "index")

    def __init__(self, shared, index: int):
        self._shared, self.index, self._base = shared, index, index * len(FIELDS)

    def clear(self, heartbeat: int = UNUSED) -> None:
        for offset in range(len(FIELDS)):
            self._shared[self._base + offset] = 0
        self.heartbeat = heartbeat

    def values(self) -> dict[str, int]:
        return {name: self._shared[self._base + offset] for offset, name in enumerate(FIELDS)}

    def publish(self, snapshot: MetricsSnapshot) -> None:
        """The worker's counters (its open connections are published as they change)."""
        shared, base = self._shared, self._base
        values = _counters(snapshot)
        for name, value in values.items():
            shared[base + _OFFSETS[name]] = value
        self.queued = snapshot.queued


def _counters(snapshot: MetricsSnapshot) -> dict[str, int]:
    values = {"connections_total": snapshot.accepted, "messages_total": snapshot.messages,
              "rejected_total": snapshot.rejected, "handler_errors": snapshot.handler_errors,
              "bytes_in": snapshot.bytes_in, "bytes_out": snapshot.bytes_out,
              "handler_us": int(snapshot.handler_seconds * 1e6)}
    values.update(zip(_CLOSED, (snapshot.closed[reason] for reason in CLOSE_REASONS)))
    values.update(zip(_BUCKETS, snapshot.buckets))
    if snapshot.handler_pool is not None:
        most, stats = snapshot.handler_pool
        values.update(pool_submitted=stats.submitted, pool_completed=stats.completed,
                      pool_failed=stats.failed, pool_max_workers=most, pool_workers=stats.workers,
                      pool_busy=stats.busy, pool_queued=stats.queued)
    return values


def metrics_snapshot(totals: dict[str, int], live: Iterable[dict[str, int]]) -> MetricsSnapshot:
    """Every worker's metrics as one server's: ``totals`` the counters summed over
    workers past and present, ``live`` the rows of the workers running now (gauges)."""
    live = list(live)
    return MetricsSnapshot(
        open_connections=sum(row["open_connections"] for row in live),
        accepted=totals["connections_total"], rejected=totals["rejected_total"],
        closed={reason: totals[name] for reason, name in zip(CLOSE_REASONS, _CLOSED)},
        messages=totals["messages_total"], handler_errors=totals["handler_errors"],
        bytes_in=totals["bytes_in"], bytes_out=totals["bytes_out"],
        queued=sum(row["queued"] for row in live), buckets=[totals[name] for name in _BUCKETS],
        handler_seconds=totals["handler_us"] / 1e6, handler_pool=_handler_pool(totals, live))


def _handler_pool(totals: dict[str, int], live: list[dict[str, int]]):
    """Every worker's handler threads as one pool, or None when no worker has any."""
    if not sum(row["pool_max_workers"] for row in live) and not totals["pool_submitted"]:
        return None
    from ..pools.base import PoolStats

    gauges = {name: sum(row[name] for row in live) for name in _POOL_GAUGES}
    stats = PoolStats(workers=gauges["pool_workers"], idle=gauges["pool_workers"] - gauges["pool_busy"],
                      busy=gauges["pool_busy"], queued=gauges["pool_queued"],
                      completed=totals["pool_completed"], failed=totals["pool_failed"], cancelled=0,
                      submitted=totals["pool_submitted"])
    return gauges["pool_max_workers"], stats


def _field(offset: int) -> property:
    def get(slot: WorkerSlot) -> int:
        return slot._shared[slot._base + offset]

    def put(slot: WorkerSlot, value: int) -> None:
        slot._shared[slot._base + offset] = value

    return property(get, put)


for _offset, _name in enumerate(FIELDS):
    setattr(WorkerSlot, _name, _field(_offset))


_OFFSETS = {name: offset for offset, name in enumerate(FIELDS)}
