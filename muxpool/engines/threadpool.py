"""``threadpool``: the loop holds every connection; handler calls go to a pool.

The default engine, because it is safe for any handler: a handler may block
(a database call, a file, ``time.sleep``) without stalling other
connections, yet an idle connection costs no thread — 5,000 idle clients
cost ``workers`` threads, not 5,000. Results come back to the loop through
``defer()``; per-connection order is kept by the connection itself.
"""

from __future__ import annotations

import time

from ..pools import ThreadPool
from .base import Engine

DEFAULT_WORKERS = 32


class ThreadPoolEngine(Engine):
    name = "threadpool"
    per_connection = False
    can_block = True

    def __init__(self, config, pool=None):
        self.config = config
        self.threads = config.workers or DEFAULT_WORKERS
        self._pool = pool
        self._owns_pool = pool is None
        self._server = None
        self._in_flight = 0

    def start(self, server) -> None:
        self._server = server
        if self._pool is None:
            # Unbounded queue on purpose: the loop must never block on it, and
            # each connection has at most one call queued (see Connection).
            self._pool = ThreadPool(self.threads, name="muxpool-handler")

    def stop(self) -> None:
        if self._owns_pool and self._pool is not None:
            self._pool.close()
            self._pool.join(self.config.drain_timeout)

    def run(self, conn, fn, arg) -> None:
        self._in_flight += 1
        self._pool.run(self._call, (conn, fn, arg))

    def _call(self, conn, fn, arg) -> None:
        marker = self._server.in_handler
        marker.active = True
        started = time.perf_counter()
        try:
            value, ok = fn(conn, arg), True
        except Exception as exc:
            value, ok = exc, False
        finally:
            marker.active = False
        elapsed = time.perf_counter() - started
        self._server.mux.defer(lambda: self._done(conn, ok, value, elapsed))

    def _done(self, conn, ok, value, elapsed) -> None:
        self._in_flight -= 1
        self._server.handler_done(conn, ok, value, elapsed)

    def spawn(self, fn, name: str) -> None:
        """Run a whole connection (a socketserver handler) on one pool thread."""
        self._pool.run(fn)

    def idle(self) -> bool:
        return self._in_flight == 0

    def queue_depth(self) -> int:
        return self._pool.stats().queued if self._pool is not None else 0

    def describe(self) -> str:
        return f"{self.threads} handler threads"
