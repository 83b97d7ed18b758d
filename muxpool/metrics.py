"""Prometheus metrics: custom collectors a user registers in a
``prometheus_client`` registry (``pip install 'muxpool[metrics]'``).

A collector adds nothing to the hot path: it keeps no counters of its own and
reads, at each scrape, the snapshot the object already keeps (a pool's
``stats()``). Every series is described by a :class:`Series` row (its name
after the ``muxpool_`` prefix, its type, its help, how to read it from the
snapshot), and :class:`SnapshotCollector` turns rows and snapshots into metric
families; a collector for another object (the server's) is one more table
and one more ``snapshots()`` beside :class:`PoolCollector`.

Names follow Prometheus' conventions: the ``muxpool_`` prefix, base units,
``_total`` on counters (``prometheus_client`` appends it). Several pools share
one collector (``add``), each series labelled ``pool``: registering two
collectors with the same series names fails in the registry, so a second
pool is added to the first collector instead.

:class:`ServerCollector` reports a server's (or a prefork supervisor's
workers') :class:`~muxpool.stats.MetricsSnapshot`, which the server builds on
its loop thread; :func:`start_endpoint` serves a registry on a thread of its
own, :func:`start_loop_endpoint` on a multiplexer (a prefork supervisor must
start no thread: it forks its workers itself only while it runs none).

``prometheus_client`` is imported when a collector is made, never by
``import muxpool``; without it, :class:`~muxpool.errors.MissingDependency`.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .errors import MissingDependency
from .stats import BUCKETS, CLOSE_REASONS

log = logging.getLogger("muxpool.metrics")

PREFIX = "muxpool_"


@dataclass(frozen=True)
class Series:
    """One metric family: ``read(snapshot)`` gives its value for one label set."""

    name: str  # after PREFIX; a counter's without "_total"
    kind: str  # "gauge" or "counter"
    help: str
    read: Callable[[Any], float]


def _stat(field: str) -> Callable[[Any], float]:
    return lambda snapshot: getattr(snapshot[1], field)


POOL_SERIES = (
    Series("pool_max_workers", "gauge", "Workers the pool may run at once.",
           lambda snapshot: snapshot[0].max_workers),
    Series("pool_workers", "gauge", "Workers (threads, processes, greenlets) the pool has now.",
           _stat("workers")),
    Series("pool_workers_busy", "gauge", "Workers running a task now.", _stat("busy")),
    Series("pool_tasks_queued", "gauge", "Tasks waiting for a worker.", _stat("queued")),
    Series("pool_tasks_submitted", "counter", "Tasks the pool accepted.", _stat("submitted")),
    Series("pool_tasks_completed", "counter", "Tasks that returned a value.", _stat("completed")),
    Series("pool_tasks_failed", "counter",
           "Tasks that failed: raised, timed out, lost their worker, or could not be pickled.",
           _stat("failed")),
    Series("pool_tasks_timed_out", "counter", "Tasks failed for running past task_timeout "
           "(also counted as failed).", _stat("timed_out")),
    Series("pool_tasks_cancelled", "counter", "Tasks cancelled before they ran.", _stat("cancelled")),
    Series("pool_workers_recycled", "counter", "Workers replaced on purpose "
           "(max_tasks_per_worker, max_worker_memory).", _stat("recycled")),
    Series("pool_workers_crashed", "counter", "Worker processes that died unasked.", _stat("crashed")),
)


def _metric_families():
    """``prometheus_client``'s family classes by type, imported on first use."""
    try:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
    except ImportError as exc:
        raise MissingDependency("muxpool.metrics", "metrics") from exc
    return {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
            "histogram": HistogramMetricFamily}


def require_client() -> None:
    """``MissingDependency`` (saying what to install) unless ``prometheus_client`` imports."""
    _metric_families()


class SnapshotCollector:
    """A ``prometheus_client`` custom collector over a table of :class:`Series`.

    Subclasses set ``series`` and ``label_names`` and yield ``(label values,
    snapshot)`` pairs from ``snapshots()``; the registry calls ``describe()``
    once when registering (to refuse clashing names) and ``collect()`` per scrape.
    """

    series: tuple[Series, ...] = ()
    label_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._families = _metric_families()  # fails here, at set-up, not at the first scrape

    def snapshots(self) -> Iterable[tuple[tuple[str, ...], Any]]:
        raise NotImplementedError

    def _empty_families(self) -> list:
        return [self._families[s.kind](PREFIX + s.name, s.help, labels=self.label_names)
                for s in self.series]

    def describe(self) -> list:
        return self._empty_families()

    def collect(self) -> list:
        families = self._empty_families()
        for labels, snapshot in self.snapshots():
            for series, family in zip(self.series, families):
                family.add_metric(list(labels), series.read(snapshot))
        return families


class PoolCollector(SnapshotCollector):
    """The ``muxpool_pool_*`` series of one or more pools, labelled ``pool``.

    ``pool`` is any muxpool pool (``ThreadPool``, ``ProcessPool``,
    ``GeventPool``, ``DaskPool``, ``Pool``); ``name`` is its label (default:
    the pool's ``name``). The collector holds the pools it was given until
    :meth:`remove`: a closed pool keeps reporting its final counts.

    Raises ``MissingDependency`` without ``prometheus-client``; ``add`` raises
    ``ValueError`` for a label already in use, ``TypeError`` for an object
    without ``stats()``.
    """

    series = POOL_SERIES
    label_names = ("pool",)

    def __init__(self, pool: Any = None, name: str | None = None):
        super().__init__()
        self._lock = threading.Lock()  # add/remove from the caller, collect from the HTTP thread
        self._pools: dict[str, Any] = {}
        if pool is not None:
            self.add(pool, name)

    def add(self, pool: Any, name: str | None = None) -> str:
        """Watch ``pool`` too; returns its label."""
        if not callable(getattr(pool, "stats", None)):
            raise TypeError(f"{pool!r} has no stats(): not a muxpool pool")
        label = name or getattr(pool, "name", None) or f"{type(pool).__name__}-{id(pool):x}"
        with self._lock:
            if label in self._pools:
                raise ValueError(f"a pool labelled {label!r} is already collected; give name=")
            self._pools[label] = pool
        return label

    def remove(self, name: str) -> None:
        """Stop reporting the pool labelled ``name`` (``KeyError`` if none is)."""
        with self._lock:
            del self._pools[name]

    def snapshots(self) -> Iterable[tuple[tuple[str, ...], Any]]:
        with self._lock:
            pools = list(self._pools.items())
        for label, pool in pools:
            try:
                stats = pool.stats()
            except Exception:  # noqa: BLE001 - one pool's failure must not empty the scrape
                log.warning("pool %r: stats() failed; its series are left out", label, exc_info=True)
                continue
            yield (label,), (pool, stats)


SERVER_SERIES = (
    Series("connections_open", "gauge", "Connections open now.",
           lambda snapshot: snapshot.open_connections),
    Series("connections_accepted", "counter", "Connections accepted and served.",
           lambda snapshot: snapshot.accepted),
    Series("connections_rejected", "counter", "Connections closed at once at max_connections.",
           lambda snapshot: snapshot.rejected),
    Series("messages", "counter", "Messages received and handled.", lambda snapshot: snapshot.messages),
    Series("handler_errors", "counter", "Handler calls that raised, or returned a reply the "
           "framing cannot carry.", lambda snapshot: snapshot.handler_errors),
    Series("received_bytes", "counter", "Bytes read from clients (on the wire: TLS records "
           "under TLS).", lambda snapshot: snapshot.bytes_in),
    Series("sent_bytes", "counter", "Bytes the kernel took for clients.",
           lambda snapshot: snapshot.bytes_out),
    Series("handler_queue_depth", "gauge", "Handler calls waiting for a thread.",
           lambda snapshot: snapshot.queued),
)


class ServerCollector(SnapshotCollector):
    """The ``muxpool_*`` series of one server, from ``source()``: a
    :class:`~muxpool.stats.MetricsSnapshot`, read once per scrape. Besides
    :data:`SERVER_SERIES`: ``muxpool_connections_closed_total`` by ``reason``
    (:data:`~muxpool.stats.CLOSE_REASONS`, every one always present) and the
    ``muxpool_handler_seconds`` histogram."""

    series = SERVER_SERIES

    def __init__(self, source: Callable[[], Any]):
        super().__init__()
        self._source = source

    def snapshots(self) -> Iterable[tuple[tuple[str, ...], Any]]:
        yield (), self._source()

    def _empty_families(self) -> list:
        closed = self._families["counter"](
            PREFIX + "connections_closed", "Connections closed, by why they ended.",
            labels=("reason",))
        handler = self._families["histogram"](
            PREFIX + "handler_seconds", "Time handler calls took (messages only).")
        return super()._empty_families() + [closed, handler]

    def collect(self) -> list:
        snapshot = self._source()
        families = self._empty_families()
        *plain, closed, handler = families
        for series, family in zip(self.series, plain):
            family.add_metric([], series.read(snapshot))
        for reason in CLOSE_REASONS:
            closed.add_metric([reason], snapshot.closed.get(reason, 0))
        cumulative, buckets = 0, []
        for bound, count in zip((*BUCKETS, float("inf")), snapshot.buckets):
            cumulative += count
            buckets.append((_bound(bound), cumulative))
        handler.add_metric([], buckets, snapshot.handler_seconds)
        return families


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class Endpoint:
    """``/metrics`` over HTTP: ``address`` (where it listens) and ``stop()``."""

    def __init__(self, httpd, stop: Callable[[], None]):
        self.httpd = httpd
        self.address = httpd.server_address
        self._stop = stop

    def stop(self) -> None:
        self._stop()


def start_endpoint(registry, host: str, port: int) -> Endpoint:
    """Serve ``registry`` on ``host:port`` (0: a free port) from a thread of its own
    (``prometheus_client.start_http_server``). Raises ``OSError`` if it cannot bind."""
    try:
        from prometheus_client import start_http_server
    except ImportError as exc:
        raise MissingDependency("muxpool.metrics", "metrics") from exc
    httpd, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)

    return Endpoint(httpd, stop)


def start_loop_endpoint(registry, host: str, port: int, mux) -> Endpoint:
    """Serve ``registry`` from ``mux``'s loop, one request at a time: for a process
    that must start no thread. A request is answered whole before the loop runs
    on, and a client has ``_LOOP_REQUEST_TIMEOUT`` seconds to send it."""
    try:
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        from prometheus_client import make_wsgi_app
    except ImportError as exc:
        raise MissingDependency("muxpool.metrics", "metrics") from exc

    class Quiet(WSGIRequestHandler):
        timeout = _LOOP_REQUEST_TIMEOUT

        def log_message(self, format: str, *args: Any) -> None:  # stderr is the server's log
            pass

    class Server(WSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    httpd = make_server(host, port, make_wsgi_app(registry), Server, handler_class=Quiet)
    httpd.socket.setblocking(False)
    mux.register(httpd.socket, mux.EVENT_READ, lambda _mask: _answer(httpd))

    def stop() -> None:
        try:
            mux.unregister(httpd.socket)
        except (KeyError, ValueError, OSError):
            pass  # the loop is closed already
        httpd.server_close()

    return Endpoint(httpd, stop)


_LOOP_REQUEST_TIMEOUT = 1.0


def _answer(httpd) -> None:
    try:
        request, address = httpd.socket.accept()
    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
        return
    request.setblocking(True)
    if httpd.verify_request(request, address):
        try:
            httpd.process_request(request, address)
        except Exception:  # noqa: BLE001 - a broken scrape must not stop the supervisor
            log.warning("metrics: answering %s failed", address, exc_info=True)
            httpd.shutdown_request(request)
    else:
        httpd.shutdown_request(request)
