"""What each prefork worker publishes to its supervisor and its siblings.

One ``RawArray`` of 64-bit integers (the lesson's ``multiprocessing.Array``,
without a lock: each field has one writer, the worker, and a reader that
sees a value a moment old loses nothing) holds a row of :data:`FIELDS` per
worker slot. :class:`WorkerSlot` names the fields of one row.
"""

from __future__ import annotations

from multiprocessing.sharedctypes import RawArray

FIELDS = (
    "connections_total",  # counters: summed over workers, past and present
    "messages_total",
    "open_connections",  # gauges: now, or over the last stats interval
    "p50_us",
    "p99_us",
    "queued",
    "heartbeat",  # time.monotonic_ns() (one clock for every process) when its loop last ran
)
COUNTERS = ("connections_total", "messages_total")
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


def _field(offset: int) -> property:
    def get(slot: WorkerSlot) -> int:
        return slot._shared[slot._base + offset]

    def put(slot: WorkerSlot, value: int) -> None:
        slot._shared[slot._base + offset] = value

    return property(get, put)


for _offset, _name in enumerate(FIELDS):
    setattr(WorkerSlot, _name, _field(_offset))
