"""Replacing workers that have served enough, or grown too large (gunicorn's
``max_requests`` and ``max_requests_jitter``; an RSS mark, as its users ask for).

The supervisor reads what each worker publishes (its message count, in its
shared slot) and the worker's resident size (``/proc/<pid>/statm``), and
replaces a worker that is due as a SIGHUP reload replaces each one: the new
worker starts first, then the old one drains. The listening socket stays open
in the supervisor all along, so no client is refused meanwhile. The jitter
gives each worker its own limit, so workers started together are not all
replaced together.
"""

from __future__ import annotations

import os
import random

CHECK_EVERY = 0.25  # seconds between looks (a worker publishes its counts every 0.5 s at most)
_PAGE = os.sysconf("SC_PAGE_SIZE")


class Recycling:
    def __init__(self, config, counts_connections: bool):
        self.max_requests = config.max_requests
        self.jitter = config.max_requests_jitter
        self.max_memory = config.max_worker_memory
        # socketserver handlers have no messages: each connection is a request
        self._counter = "connections_total" if counts_connections else "messages_total"
        self._limits: dict[int, int] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.max_requests or self.max_memory)

    def started(self, pid: int) -> None:
        if self.max_requests:
            self._limits[pid] = self.max_requests + random.randint(0, self.jitter)

    def gone(self, pid: int) -> None:
        self._limits.pop(pid, None)

    def due(self, pid: int, slot: dict[str, int]) -> str | None:
        """Why worker ``pid`` should be replaced now, or ``None``."""
        limit, served = self._limits.get(pid), slot[self._counter]
        if limit is not None and served >= limit:
            return f"has handled {served} requests (max_requests={limit})"
        if self.max_memory:
            rss = resident_bytes(pid)
            if rss is not None and rss > self.max_memory:
                return f"uses {rss} bytes (max_worker_memory={self.max_memory})"
        return None


def resident_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None  # gone, or not Linux: nothing to decide on
