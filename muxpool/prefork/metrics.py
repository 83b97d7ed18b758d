"""The prefork supervisor's ``/metrics``: every worker's series, summed.

Each worker runs an ordinary server with metrics on, but serves no endpoint:
it publishes its counters into its row of the shared array with each
heartbeat (:mod:`muxpool.prefork.slots`). The supervisor sums the rows of the
workers running now with the final rows of those that have exited (folded in
when it reaps them), so a replaced or crashed worker's counts stay in the
totals: a counter never goes backwards. A worker killed outright loses what it
counted since its last heartbeat (``worker_timeout / 4``, at most 0.5 s).

The endpoint runs on the supervisor's own loop, never on a thread: the
supervisor forks its workers itself only while its process runs no other
thread (:mod:`muxpool.prefork.worker`). A scrape is answered whole before the
loop runs on; a scraper has a second to send its request.
"""

from __future__ import annotations

import logging

from ..logs import format_peer
from ..metrics import POOL_SERIES, ServerCollector, SnapshotCollector, require_client, start_loop_endpoint
from ..stats import MetricsSnapshot
from .slots import metrics_snapshot

log = logging.getLogger("muxpool.server")


class SupervisorMetrics:
    """The supervisor's endpoint, summing its workers' published counters."""

    def __init__(self, supervisor):
        require_client()  # at set-up, not once the workers run
        self.supervisor = supervisor
        self._endpoint = None

    @property
    def address(self) -> tuple | None:
        """Where ``/metrics`` is served (``None`` until the supervisor runs)."""
        return self._endpoint.address if self._endpoint is not None else None

    def start(self, mux) -> None:
        from prometheus_client import CollectorRegistry

        config = self.supervisor.config
        registry = CollectorRegistry(auto_describe=True)
        registry.register(ServerCollector(self.snapshot))
        registry.register(_WorkersPoolCollector(self.snapshot))
        self._endpoint = start_loop_endpoint(registry, config.metrics_host, config.metrics_port, mux)
        log.info("metrics on http://%s/metrics", format_peer(self._endpoint.address))

    def stop(self) -> None:
        if self._endpoint is not None:
            self._endpoint.stop()
            self._endpoint = None

    def close_in_child(self) -> None:
        """In a forked worker: its copy of the endpoint's socket is not its to keep."""
        if self._endpoint is not None:
            self._endpoint.httpd.socket.close()

    def snapshot(self) -> MetricsSnapshot:
        supervisor = self.supervisor
        return metrics_snapshot(supervisor.counter_totals(), supervisor.live_slots())


class _WorkersPoolCollector(SnapshotCollector):
    """``muxpool_pool_*{pool="muxpool-handler"}``: every worker's handler threads
    (a threadpool worker engine's) as one pool, summed as the server series are."""

    series = POOL_SERIES
    label_names = ("pool",)

    def __init__(self, source):
        super().__init__()
        self._source = source

    def snapshots(self):
        pool = self._source().handler_pool
        if pool is not None:
            most, stats = pool
            yield ("muxpool-handler",), (_Bound(most), stats)


class _Bound:
    __slots__ = ("max_workers",)

    def __init__(self, max_workers: int):
        self.max_workers = max_workers
