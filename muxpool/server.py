"""The server core: listening sockets, accept, connection lifetimes, shutdown.

A :class:`Server` owns one :class:`~muxpool.multiplexer.Multiplexer` and the
sockets on it; its engine decides only where handler calls run and reports
each result back on the loop thread (``Connection.handler_done``).

The accept loop survives overload: at ``max_connections`` it still accepts,
and closes what it has no room for at once (after ``busy_message``, if set),
so no client waits on a connection nobody will serve; on EMFILE, ENFILE,
ENOBUFS or ENOMEM it logs and backs off; ECONNABORTED is skipped.

Shutdown (``shutdown()`` from any thread, a handler included, or SIGTERM /
SIGINT under :func:`serve`): stop accepting, stop reading, finish the messages
already received, flush their replies, close each connection with a lingering
close; after ``drain_timeout`` the rest is closed hard — by a thread of its
own when a handler keeps the event loop from doing it.
"""

from __future__ import annotations

import errno
import contextlib
import itertools
import logging
import signal
import socket
import ssl
import threading
import time
from typing import Any, Protocol

from .compat import RequestHandlerConnection, is_request_handler
from .config import ServerConfig, make_listener, resolve_config, socket_identity, unlink_own_socket
from .connection import Connection
from .context import ConnectionContext
from .engines import SUPERVISING_ENGINES, load_engine
from .framing import make_framer
from .handlers import EchoService, resolve_handler
from .lifecycle import ServerLifecycle
from .multiplexer import EVENT_READ, Multiplexer
from .server_metrics import ServerMetrics, log_access, timed_sessions
from .stats import ServerStats
from .stream import StreamConnection
from .tls import server_context
from .watchdog import LoopWatchdog

log = logging.getLogger("muxpool.server")

_OVERLOAD_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_ACCEPTS_PER_EVENT = 64
_MAX_ENCODED = 0xFFFFFFFF  # the most a 4-byte length prefix can carry
_DEADLINE_GRACE = 0.25  # s past drain_timeout before the deadline thread steps in for a stuck loop
_REJECT_LOG_EVERY = 10.0  # s between log lines about connections closed at max_connections
_SHARED_FULL_PAUSE = 0.05  # s a full prefork worker leaves the shared queue to the others
_REJECT_PASSES = 64  # x _ACCEPTS_PER_EVENT: the most one reject pass closes before the loop runs on
_SHARED_FULL_WAIT_MAX = 0.5  # s at most, while they say they have room (what they say may be stale)


class Siblings(Protocol):
    """The other processes serving the same listening socket, as one ``Server``
    sees them: a prefork worker's siblings, behind its supervisor's shared
    memory (``muxpool.prefork.worker.SlotSiblings``). Called on the loop thread."""

    def serving(self, mux: Multiplexer, stats: ServerStats, stop: Any, metrics_snapshot: Any = None) -> None:
        """The server's loop is about to run: ``stop()`` drains it (its supervisor went away,
        say); ``metrics_snapshot()``, with metrics on, is what to publish for the supervisor
        to serve (this server serves no endpoint of its own)."""

    def room(self) -> bool | None:
        """This server is full: has a live sibling room (True), is every one full
        (False), or can one not say (None: still starting, or silent)?"""

    def holding(self, connections: int) -> None:
        """This server now holds ``connections`` open."""

    def report(self, stats: ServerStats, connections: int, queued: int) -> None:
        """The ``stats_interval`` report, in place of this server's own log line."""

    def stopped(self, stats: ServerStats) -> None:
        """The loop has stopped; ``stats`` are final."""


class Server(ServerLifecycle):
    """Serve ``app`` (default: the lesson's echo service) on one engine.

    ``Server(app, port=0, engine="loop")`` binds at once (so ``.address`` is
    known); ``serve_forever()`` blocks, ``start()`` serves on a background
    thread, ``shutdown()`` drains and stops from any thread. A context
    manager: ``with Server(...).start() as srv:``. ``config=ServerConfig(...)``
    gives every option at once; keyword options override it.

    With ``metrics_port``, ``srv.metrics_address`` is where ``/metrics`` is served
    once it runs (:mod:`muxpool.server_metrics`).

    ``engine="prefork"`` makes a :class:`muxpool.prefork.PreforkServer`
    instead (the same surface): a supervisor whose worker processes each run
    a ``Server`` of their own.
    """

    def __new__(cls, app: Any = None, **options: Any):
        config = options.get("config")
        engine = options.get("engine", config.engine if isinstance(config, ServerConfig) else None)
        if cls is Server and engine in SUPERVISING_ENGINES:
            return load_engine(engine)(app, **options)  # not a Server: __init__ is not run again
        return super().__new__(cls)

    def __init__(self, app: Any = None, *, config: ServerConfig | None = None,
                 listener: socket.socket | None = None, ssl_context: ssl.SSLContext | None = None,
                 pool: Any = None, siblings: "Siblings | None" = None, **overrides: Any):
        if pool is not None and config is None:
            overrides.setdefault("engine", "threadpool")  # the engine pool= offloads from
        self.config = config = resolve_config(config, overrides)
        self._app = app if app is not None else EchoService()
        engine_class = load_engine(config.engine)
        if pool is not None:
            if config.engine != "threadpool":
                raise ValueError("pool= offloads handlers from the threadpool engine; "
                                 f"the {config.engine} engine runs them itself")
            self._engine = engine_class(config, pool=pool)
        else:
            self._engine = engine_class(config)
        self._request_handler = is_request_handler(self._app)
        self._new_session = None  # a socketserver handler class runs whole connections itself
        if self._request_handler:
            if not self._engine.can_block:
                raise ValueError(cannot_block(config.engine, self._app))
        else:
            self._new_session = resolve_handler(self._app)
        # One stateless encoder for every reply: what we send is not bound by
        # the limit on what we accept.
        self._encoder = make_framer(config.framing, _MAX_ENCODED)
        # Handlers called straight from the read path when nothing needs the
        # engine's hand-off: the loop engine, with no per-call timer or timing.
        self._inline = (self._engine.inline and not config.handler_timeout
                       and not config.stats_interval)
        if ssl_context is None and config.certfile:
            ssl_context = server_context(config.certfile, config.keyfile)
        self._ssl_context = ssl_context
        self._mux = Multiplexer()
        # A prefork worker serves the socket its parent bound and handed down.
        self._listener = listener if listener is not None else make_listener(config)
        self._owns_listener = listener is None  # a prefork worker must not unlink its parent's path
        # The socket file we bound, so a server unlinks its own and never a newer server's.
        self._socket_file = (socket_identity(config.unix_path)
                             if config.unix_path and self._owns_listener else None)
        self._busy_reply = (self._encoder.encode(config.busy_message.encode())
                            if config.busy_message else None)
        self._rejected_unlogged = 0
        self._rejecting = False
        self._full_since: float | None = None
        self._siblings = siblings  # a prefork worker's: the others serving the same socket
        self._reject_logged_at = -_REJECT_LOG_EVERY
        self._address = self._listener.getsockname()
        self._stats = ServerStats(metrics=config.metrics_port is not None, counted=bool(
            config.metrics_port is not None or config.access_log or config.stats_interval
            or siblings is not None))  # a prefork worker publishes its totals to the supervisor
        self._connections: dict[int, Connection] = {}
        self._stats.live = self._connections.values()  # a view: what is open at each read
        # A prefork worker's siblings publish its metrics to the supervisor, which serves them.
        self._metrics = (ServerMetrics(config, self._mux, self._stats, self._connections, self._engine,
                                       serve_http=siblings is None)
                         if config.metrics_port is not None else None)
        # auto runs the inline path itself. Neither times its calls: with metrics
        # on, the sessions' on_message does, once per call, on any thread.
        self._connection_class = Connection
        if self._inline and self._engine.inline_method is not None:
            self._connection_class = type(f"{type(self._engine).__name__}Connection", (Connection,),
                                          {"handle_inline": self._engine.inline_method})
        if self._inline and self._metrics is not None:
            self._new_session = timed_sessions(self._new_session, self._stats)
        self._ids = itertools.count(1)
        self._accepting = False
        self._draining = False
        self._stopped_hard = False  # _hard_stop ran: calls still running are abandoned
        self._deadline_armed = False
        self._deadline_lock = threading.Lock()
        # Called (from the deadline thread) when drain_timeout passed with the loop
        # stuck in a handler: serve() interrupts its main thread with it.
        self._on_drain_overdue = None
        self._init_lifecycle()
        # All a connection knows of its server.
        self._ctx = ConnectionContext(
            config=config, mux=self._mux, engine=self._engine, encode=self._encoder.encode,
            new_session=self._new_session, new_framer=self._new_framer,
            stats=self._stats, ssl_context=self._ssl_context, inline=self._inline, server=self,
            app=self._app, closed=self._forget, check_drained=self._stop_if_drained,
            later=self._engine.later)

    @property
    def metrics_address(self):
        """Where ``/metrics`` is served: ``(host, port)`` once serving (``metrics_port=0``
        picks the port), ``None`` without ``metrics_port``."""
        return self._metrics.address if self._metrics is not None else None

    # --- lifecycle -----------------------------------------------------------

    def serve_forever(self) -> None:
        self._engine.start(self._mux)
        if self._metrics is not None:
            self._metrics.start(on_failure=self._engine.stop)
        self._set_accepting(True)
        if self.config.stats_interval:
            self._mux.call_later(self.config.stats_interval, self._stats_tick)
        log.info("muxpool serving %s", _serving(self))
        watchdog = None
        if self.config.loop_stall_warning and not self._engine.watches_its_loop:
            watchdog = LoopWatchdog(self._mux, self.config.loop_stall_warning).start()
        if self._siblings is not None:
            snapshot = self._metrics.snapshot if self._metrics is not None else None
            self._siblings.serving(self._mux, self._stats, lambda: self.shutdown(wait=False), snapshot)
        self._serving.set()
        self._notify_serving(self._mux)
        try:
            with _signals_wake(self._mux):
                self._mux.run()
        finally:
            if watchdog is not None:
                watchdog.stop()
            if self._metrics is not None:
                self._metrics.stop()
            self._close_everything()
            # After a hard stop, handler calls still running are abandoned, not waited for.
            self._engine.stop(wait=not self._stopped_hard)
            self._mux.close()
            if self._siblings is not None:
                self._siblings.stopped(self._stats)
            served = self._stats.connections_total
            log.info("muxpool stopped (%d connection%s served)", served, "" if served == 1 else "s")
            self._stopped.set()

    def _begin_drain(self) -> None:
        if self._draining:
            return
        self._draining = self._ctx.draining = True
        self._notify_stopping()
        self._ctx.drain_deadline = time.monotonic() + self.config.drain_timeout
        self._set_accepting(False)
        self._listener.close()
        if self._socket_file is not None:
            unlink_own_socket(self.config.unix_path, self._socket_file)
        for conn in list(self._connections.values()):
            conn.drain()
        self._mux.call_later(self.config.drain_timeout, self._hard_stop)
        self._stop_if_drained()

    def stop_now(self) -> None:
        self._stopped_hard = True  # serve_forever must not wait for handler calls on its way out
        super().stop_now()

    def _before_drain(self) -> None:
        self._arm_drain_deadline()  # here, not on the loop: a handler may be blocking it

    def _arm_drain_deadline(self) -> None:
        if self.config.engine == "gevent":
            return  # its threads are greenlets on the hub they would watch: its own timer it is
        with self._deadline_lock:
            if self._deadline_armed:
                return
            self._deadline_armed = True
        threading.Thread(target=self._enforce_drain_deadline, name="muxpool-drain-deadline",
                         args=(self.config.drain_timeout + _DEADLINE_GRACE,), daemon=True).start()

    def _enforce_drain_deadline(self, limit: float) -> None:
        """drain_timeout is a timer on the loop; a handler blocking the loop thread
        would keep it from ever firing. Then this thread shuts the connections'
        sockets (so clients learn at once) and asks serve() to stop the process."""
        if self._stopped.wait(limit) or self._deadline_fired:
            return
        log.error("drain_timeout=%s s has passed and the event loop is still blocked (a handler "
                  "has not returned): closing every connection", self.config.drain_timeout)
        for conn in _snapshot(self._connections):
            conn.shutdown_socket()
        self.stop_now()
        if self._on_drain_overdue is not None and self._mux.ticks % 2 == 0:
            self._on_drain_overdue()

    def _stop_if_drained(self) -> None:
        if self._draining and not self._connections and self._engine.idle():
            self._mux.stop()

    _deadline_fired = False  # _hard_stop has run on the loop: it is not stuck

    def _hard_stop(self) -> None:
        self._deadline_fired = True
        if self._connections:
            log.warning("closing %d connections that did not finish in time", len(self._connections))
        self._stopped_hard = True
        self._close_everything()
        self._mux.stop()

    def _close_everything(self) -> None:
        self._set_accepting(False)
        for conn in list(self._connections.values()):
            conn.abort(None, reset=True)
        try:
            self._listener.close()
        except OSError:
            pass

    # --- accepting -------------------------------------------------------------

    def _set_accepting(self, on: bool) -> None:
        if on == self._accepting or (on and self._draining):
            return
        self._accepting = on
        if on:
            self._mux.register(self._listener, EVENT_READ, self._on_accept)
        else:
            self._mux.unregister(self._listener)

    def _on_accept(self, mask: int) -> bool:
        """Accept what waits, at most _ACCEPTS_PER_EVENT; True once the queue is empty."""
        for _ in range(_ACCEPTS_PER_EVENT):
            full = len(self._connections) >= self.config.max_connections
            if full and self._leave_to_siblings():
                return False
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return True
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _OVERLOAD_ERRNOS:
                    log.error("accept failed (%s); pausing accepts for 0.1 s", exc)
                    self._set_accepting(False)
                    self._mux.call_later(0.1, lambda: self._set_accepting(True))
                    return False
                raise
            if full:
                self._reject(sock, peer)
            else:
                self._add_connection(sock, peer)
        return False

    def _leave_to_siblings(self) -> bool:
        """A full prefork worker shares the listen queue: while a sibling may have
        room, stop accepting for a moment and let it take what waits. When every
        sibling says it is full there is no one to wait for: close at once."""
        if self._siblings is None or self._rejecting:
            return False
        if self._siblings.room() is False:
            return False
        self._set_accepting(False)
        if self._full_since is None:
            self._full_since = time.monotonic()
        self._mux.call_later(_SHARED_FULL_PAUSE, self._reject_waiting)
        return True

    def _reject_waiting(self) -> None:
        if self._draining:
            return
        waited = time.monotonic() - (self._full_since or 0.0)
        if (waited < _SHARED_FULL_WAIT_MAX and len(self._connections) >= self.config.max_connections
                and self._siblings.room() is not False):
            self._mux.call_later(_SHARED_FULL_PAUSE, self._reject_waiting)  # theirs to take
            return
        self._full_since = None
        # Close what waited, now, to the end of the queue: a flag left for the next
        # readable event would close a newcomer a sibling with room was about to
        # take, and one batch per pause strands clients in a large burst.
        self._rejecting = True
        try:
            for _ in range(_REJECT_PASSES):
                if self._on_accept(EVENT_READ):
                    break
        finally:
            self._rejecting = False
        self._set_accepting(True)

    def _reject(self, sock: socket.socket, peer: Any) -> None:
        """No room: close at once (nginx does the same), so the client knows now
        instead of waiting on a connection that the kernel would drop from a
        full accept queue, with its handshake done and no one to serve it."""
        self._stats.connections_rejected += 1
        try:
            sock.setblocking(False)
            if self._busy_reply is not None:
                sock.send(self._busy_reply)
        except OSError:
            pass
        sock.close()
        self._rejected_unlogged += 1
        now = time.monotonic()
        if now - self._reject_logged_at >= _REJECT_LOG_EVERY:
            log.warning("at max_connections=%d: closed %d new connection(s) at once (latest from %s)",
                        self.config.max_connections, self._rejected_unlogged, peer or "a Unix socket")
            self._reject_logged_at, self._rejected_unlogged = now, 0

    def _add_connection(self, sock: socket.socket, peer: Any) -> None:
        sock.setblocking(False)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = peer or self.config.unix_path
        if self._request_handler:
            kind = RequestHandlerConnection
        elif self._engine.per_connection:
            kind = StreamConnection
        else:
            kind = self._connection_class
        conn = kind(self._ctx, sock, peer, next(self._ids))
        self._connections[id(conn)] = conn
        if self._siblings is not None:
            self._siblings.holding(len(self._connections))
        self._stats.connections_total += 1
        conn.start()

    def _forget(self, conn: Connection) -> None:
        """A connection's socket closed: free its slot, resume accepting."""
        if self._connections.pop(id(conn), None) is not None:
            self._stats.closed(conn)
            if self.config.access_log:
                log_access(conn, time.monotonic())
        if self._siblings is not None:
            self._siblings.holding(len(self._connections))
        if not self._accepting and not self._draining and len(self._connections) < self.config.max_connections:
            self._full_since = None
            self._set_accepting(True)
        self._stop_if_drained()

    def _stats_tick(self) -> None:
        """The ``--stats-interval`` line (a prefork worker's siblings report it instead)."""
        connections, queued = len(self._connections), self._engine.queue_depth()
        if self._siblings is not None:
            self._siblings.report(self._stats, connections, queued)
        else:
            log.info("%s", self._stats.line(connections, queued))
        self._mux.call_later(self.config.stats_interval, self._stats_tick)

    def _new_framer(self):
        return make_framer(self.config.framing, self.config.max_message_size)


@contextlib.contextmanager
def _signals_wake(mux: Multiplexer):
    """While serving on the main thread, a signal wakes the loop's poll: the
    kernel may deliver a process-directed SIGTERM to any thread that does not
    block it, and Python's handler runs only when the main thread next runs
    bytecode — which an idle loop, asleep in its poll, would not do."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.set_wakeup_fd(mux.wakeup_fd(), warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)


def _snapshot(connections: dict) -> list:
    """The connections, read from another thread while the loop may change the dict."""
    for _attempt in range(100):
        try:
            return list(connections.values())
        except RuntimeError:  # changed size during iteration
            continue
    return []


def cannot_block(where: str, app: Any) -> str:
    return (f"the {where} engine runs handlers on its event loop, which must never block, and "
            f"{app.__qualname__} is a socketserver handler that blocks on its socket: use engine "
            "threadpool, threaded, prefork or gevent")


def _serving(server: Server) -> str:
    return serving_line(server._app, server.address, server.config, server._engine.describe(),
                        tls=server._ssl_context is not None, framed=not server._request_handler)


def serving_line(app: Any, address: Any, config: ServerConfig, how: str, tls: bool, framed: bool) -> str:
    """The startup line: what, where (and whether over TLS), and how. A socketserver
    handler reads its socket itself: no framing to name."""
    parts = [f"engine={config.engine}", how] + ([f"framing={config.framing}"] if framed else [])
    over = " over TLS" if tls else ""
    return f"{_app_name(app)} on {_format_address(address)}{over} ({', '.join(parts)})"


def _app_name(app: Any) -> str:
    if isinstance(app, EchoService):
        return "the echo service"
    return getattr(app, "__qualname__", type(app).__qualname__)


def _format_address(address: Any) -> str:
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)


__all__ = ["Server", "ServerConfig", "Siblings"]
