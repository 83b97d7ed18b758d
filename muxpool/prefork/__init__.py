"""``prefork``: N worker processes share the listening socket (gunicorn's arbiter).

For CPU-bound handlers: each worker is a whole process with its own GIL, so
N workers use N cores. The parent binds, forks ``processes`` workers (default:
the number of cores), and from then on only supervises — boring and explicit:

* each worker serves the inherited listening socket with the ``loop`` or
  ``threadpool`` engine (``worker_engine``); the kernel hands each new
  connection to one of them — or, with ``reuse_port``, each worker serves a
  socket of its own, which the supervisor holds open across the worker's
  replacements (:mod:`muxpool.prefork.listeners`);
* a worker that dies is reaped and replaced; one that keeps dying young is
  replaced after a growing back-off, so a crash loop cannot spin;
* SIGTERM/SIGINT (or ``shutdown()``): every worker drains, then the parent
  exits; a second signal kills the workers at once;
* SIGHUP (or ``reload()``): workers are replaced one by one — a new one is up
  before an old one is asked to drain — and the listening socket never closes;
* stats: each worker writes its counters into a shared ``RawArray`` (the
  lesson's ``multiprocessing.Array``), which the parent sums;
* a worker whose event loop has not run for ``worker_timeout`` seconds (a
  handler stuck in a loop on ``--worker-engine loop``) is killed and
  replaced, as gunicorn's ``--timeout`` does: its loop writes a heartbeat
  (a monotonic clock reading) into the same array, from a timer that only
  fires while the loop turns.

The supervisor runs on the server's multiplexer: each worker's exit arrives
as a readable pidfd or process sentinel, so no SIGCHLD handler is needed and
the parent may supervise from any thread; SIGHUP is hooked when it runs on the
main thread. It forks a worker itself only while its process runs no other
thread (the CLI's case: the supervisor is the main thread, alone, and starts
no thread of its own); otherwise — a ``Server(engine="prefork").start()`` on a
background thread — the workers come from a fork server
(:mod:`muxpool.prefork.worker` says why and how).

:class:`PreforkServer` is what ``Server(engine="prefork")`` makes: it binds,
hands the supervising to a :class:`~muxpool.prefork.supervisor.Supervisor`,
and has a ``Server``'s surface (``serve_forever``, ``start``, ``shutdown``,
``stop_now``, ``address``, the context manager). Each worker runs an
ordinary :class:`~muxpool.server.Server` with ``worker_engine``.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

from ..compat import is_request_handler
from ..config import ServerConfig, make_listener, resolve_config, socket_identity, unlink_own_socket
from ..handlers import EchoService, resolve_handler
from ..lifecycle import ServerLifecycle
from ..multiplexer import Multiplexer
from ..server import _signals_wake, cannot_block, serving_line
from ..tls import server_context
from .listeners import bind_lanes
from .supervisor import Supervisor

log = logging.getLogger("muxpool.server")


class PreforkServer(ServerLifecycle):
    """Serve ``app`` from ``processes`` worker processes sharing one listening socket."""

    def __init__(self, app: Any = None, *, config: ServerConfig | None = None,
                 listener: socket.socket | None = None, ssl_context: ssl.SSLContext | None = None,
                 pool: Any = None, **overrides: Any):
        self.config = config = resolve_config(config, overrides)
        if pool is not None:
            raise ValueError("pool= offloads handlers from the threadpool engine; "
                             "the prefork engine runs them itself")
        self._app = app if app is not None else EchoService()
        self._request_handler = is_request_handler(self._app)
        if self._request_handler and config.worker_engine == "loop":
            raise ValueError(cannot_block("prefork engine's loop", self._app))
        if not self._request_handler:
            resolve_handler(self._app)  # a handler that cannot be called fails here, not in a worker
        if ssl_context is None and config.certfile:
            ssl_context = server_context(config.certfile, config.keyfile)
        self._ssl_context = ssl_context
        self._supervisor = Supervisor(config)
        if config.reuse_port and listener is not None:
            raise ValueError("reuse_port: the prefork supervisor binds one listening socket per "
                             "worker itself, so it cannot serve listener=; pass fd= for an "
                             "inherited SO_REUSEPORT socket, or leave reuse_port out")
        # Every worker's socket (one each with reuse_port, else one for all), open until we stop.
        self._listeners = (bind_lanes(config, self._supervisor.processes) if config.reuse_port
                          else [listener if listener is not None else make_listener(config)])
        self._listener = self._listeners[0]
        self._mux = Multiplexer()
        self._socket_file = (socket_identity(config.unix_path)
                             if config.unix_path and listener is None else None)
        self._address = self._listener.getsockname()
        self._init_lifecycle()

    # What tests and operators ask of the workers.
    @property
    def processes(self) -> int:
        return self._supervisor.processes

    @property
    def workers(self) -> dict:
        """pid -> worker, for the workers running now."""
        return self._supervisor.workers

    @property
    def metrics_address(self):
        """Where the supervisor serves ``/metrics`` for every worker: ``(host, port)``
        once serving, ``None`` without ``metrics_port``."""
        metrics = self._supervisor.metrics
        return metrics.address if metrics is not None else None

    def reload(self) -> None:
        """Replace the workers one by one, as SIGHUP does; from any thread."""
        self._mux.defer(self._supervisor.reload)

    def totals(self) -> tuple[int, int]:
        """Connections served and messages handled by every worker, past and present."""
        return self._supervisor.totals()

    def serve_forever(self) -> None:
        log.info("muxpool serving %s", serving_line(
            self._app, self.address, self.config, self._supervisor.describe(),
            tls=self._ssl_context is not None, framed=not self._request_handler))
        try:
            with _signals_wake(self._mux):
                self._supervisor.supervise(self, ready=self._ready)
        finally:
            for listener in self._listeners:
                listener.close()
            if self._socket_file is not None:
                unlink_own_socket(self.config.unix_path, self._socket_file)
            self._mux.close()
            log.info("muxpool stopped")
            self._stopped.set()

    def _ready(self) -> None:
        self._serving.set()
        self._notify_serving(self._mux)

    def _begin_drain(self) -> None:
        self._notify_stopping()
        self._supervisor.drain()

    def _hard_stop(self) -> None:
        self._supervisor.kill_all()


__all__ = ["PreforkServer"]
