"""A server's ``/metrics`` endpoint and its access log (``metrics_port``, ``access_log``).

The counters live in :class:`~muxpool.stats.ServerStats`, on the loop thread,
as they did for the stats line; a scrape (on the HTTP server's thread) asks
the loop for a :class:`~muxpool.stats.MetricsSnapshot` through ``defer`` and
waits for it, so nothing is read while the loop changes it. A loop that does
not answer in time (a handler blocking the ``loop`` engine) gets the last
snapshot served again: a scrape never hangs on a stuck loop.

The inline path (``loop``, ``auto``) calls handlers with no engine in
between, so no engine times them: with metrics on, each session's
``on_message`` is wrapped to time itself (two clock reads and an append), and
the inline path's code has no clock in it when metrics are off. The loop
folds those times into the histogram every second and at each scrape.

The access log is one line per closed connection on the ``muxpool.access``
logger: peer, connection id, duration, messages, bytes and close reason, as
fields of the record (``--log-format json`` writes them as JSON fields) and
in the plain line, where the peer, which a Unix client chooses, comes last
and quoted, so it can neither end the line nor pose as another field.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from .handlers import Session
from .logs import format_peer
from .metrics import PoolCollector, ServerCollector, require_client, start_endpoint
from .stats import MetricsSnapshot

HANDLER_POOL = "muxpool-handler"  # the threadpool engine's own threads, as a pool (engines.threadpool)

log = logging.getLogger("muxpool.server")
access = logging.getLogger("muxpool.access")

_SCRAPE_WAIT = 2.0  # s a scrape waits for the loop to answer
_COLLECT_EVERY = 1.0  # s: threads' tallies are folded in this often, so their samples stay few


class ServerMetrics:
    """One server's metrics: built with the server, started and stopped with its loop.
    It reads the server's own parts, handed to it: its loop, its counters, its open
    connections (a dict the server keeps), its engine."""

    def __init__(self, config: Any, mux: Any, stats: Any, connections: dict, engine: Any,
                 serve_http: bool = True):
        require_client()  # at set-up, not when serving starts
        self._config, self._mux, self._stats = config, mux, stats
        self._connections, self._engine = connections, engine
        self.serve_http = serve_http  # a prefork worker publishes to its supervisor instead
        self.registry = None
        self._endpoint = None
        self._last = MetricsSnapshot()

    @property
    def address(self) -> tuple | None:
        """Where ``/metrics`` is served (``None`` until the server runs)."""
        return self._endpoint.address if self._endpoint is not None else None

    def start(self, on_failure=lambda: None) -> None:
        """Before the loop runs: the collect timer and the endpoint. If the endpoint
        cannot start (its port is taken), ``on_failure()`` and the error is raised."""
        self._mux.call_later(_COLLECT_EVERY, self._collect)
        if not self.serve_http:
            return
        try:
            self._serve()
        except BaseException:
            on_failure()
            raise

    def _serve(self) -> None:
        from prometheus_client import CollectorRegistry

        config = self._config
        registry = CollectorRegistry(auto_describe=True)
        registry.register(ServerCollector(self.scrape))
        pools = PoolCollector()
        engine = self._engine
        for pool in engine.pools():  # its handler threads, a pool= it offloads to
            pools.add(pool)
        registry.register(pools)
        self.registry = registry
        self._endpoint = start_endpoint(registry, config.metrics_host, config.metrics_port)
        log.info("metrics on http://%s/metrics", format_peer(self._endpoint.address))

    def stop(self) -> None:
        if self._endpoint is not None:
            self._endpoint.stop()

    def _collect(self) -> None:
        self._stats.collect()
        self._mux.call_later(_COLLECT_EVERY, self._collect)

    def snapshot(self) -> MetricsSnapshot:
        """Loop thread."""
        snapshot = self._stats.metrics(self._connections.values(), self._engine.queue_depth())
        own = [pool for pool in self._engine.pools() if getattr(pool, "name", None) == HANDLER_POOL]
        if own:
            snapshot.handler_pool = (own[0].max_workers, own[0].stats())
        self._last = snapshot
        return snapshot

    def scrape(self) -> MetricsSnapshot:
        """Any thread: the loop's snapshot, or the last one if the loop is stuck."""
        mux = self._mux
        if mux.in_loop_thread():
            return self.snapshot()
        answered = threading.Event()
        result: list[MetricsSnapshot] = []

        def on_loop() -> None:
            result.append(self.snapshot())
            answered.set()

        mux.defer(on_loop)
        if answered.wait(_SCRAPE_WAIT):
            return result[0]
        log.warning("metrics: the event loop did not answer a scrape in %s s; serving the last "
                    "snapshot", _SCRAPE_WAIT)
        return self._last


def timed_sessions(new_session, stats):
    """``new_session`` whose sessions time ``on_message`` into ``stats.inline_times``:
    for the inline engines, whose inline path does not time its calls. Every call
    is then timed here (auto hands some to its threads, and reports those too), so
    what the engine reports is counted but not observed again."""
    stats.observe = None
    times = stats.inline_times

    def make() -> Session:
        session = new_session()
        return Session(session.on_connect, _Timed(session.on_message, times.append).on_message,
                       session.on_disconnect)
    return make


class _Timed:
    __slots__ = ("_add", "_call")

    def __init__(self, call, add):
        self._call, self._add = call, add

    def on_message(self, conn, message):  # a method: the auto engine keys what it learns on it
        started = time.perf_counter()
        try:
            return self._call(conn, message)
        finally:
            self._add(time.perf_counter() - started)


def log_access(conn: Any, now: float) -> None:
    """The access log's line for a connection that has closed."""
    duration = now - conn.opened
    reason = conn.close_reason or "eof"
    peer = format_peer(conn.peer)
    access.info("conn=%d reason=%s duration=%.3fs messages=%d bytes_in=%d bytes_out=%d peer=%s",
                conn.id, reason, duration, conn.messages, conn.bytes_in, conn.bytes_out,
                json.dumps(str(peer)), extra={
                    "peer": conn.peer, "conn_id": conn.id, "close_reason": reason,
                    "duration": round(duration, 6), "messages": conn.messages,
                    "bytes_in": conn.bytes_in, "bytes_out": conn.bytes_out})

