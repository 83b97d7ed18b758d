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
from typing import Any

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
from .systemd import Notifier
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


class Server(ServerLifecycle):
    """Serve ``app`` (default: the lesson's echo service) on one engine.

    ``Server(app, port=0, engine="loop")`` binds at once (so ``.address`` is
    known); ``serve_forever()`` blocks, ``start()`` serves on a background
    thread, ``shutdown()`` drains and stops from any thread. A context
    manager: ``with Server(...).start() as srv:``. ``config=ServerConfig(...)``
    gives every option at once; keyword options override it.

    With ``metrics_port``, ``srv.metrics.address`` is where ``/metrics`` is served
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
                 pool: Any = None, **overrides: Any):
        self.config = config = resolve_config(config, overrides)
        self.app = app if app is not None else EchoService()
        engine_class = load_engine(config.engine)
        if pool is not None:
            if config.engine != "threadpool":
                raise ValueError("pool= offloads handlers from the threadpool engine; "
                                 f"the {config.engine} engine runs them itself")
            self.engine = engine_class(config, pool=pool)
        else:
            self.engine = engine_class(config)
        self.request_handler = is_request_handler(self.app)
        if self.request_handler:
            if not self.engine.can_block:
                raise ValueError(cannot_block(config.engine, self.app))
        else:
            self.new_session = resolve_handler(self.app)
        # One stateless encoder for every reply: what we send is not bound by
        # the limit on what we accept.
        self.encoder = make_framer(config.framing, _MAX_ENCODED)
        # Handlers called straight from the read path when nothing needs the
        # engine's hand-off: the loop engine, with no per-call timer or timing.
        self.inline = (getattr(self.engine, "inline", False) and not config.handler_timeout
                       and not config.stats_interval)
        if ssl_context is None and config.certfile:
            ssl_context = server_context(config.certfile, config.keyfile)
        self.ssl_context = ssl_context
        self.mux = Multiplexer()
        # A prefork worker serves the socket its parent bound and handed down.
        self.listener = listener if listener is not None else make_listener(config)
        self._owns_listener = listener is None  # a prefork worker must not unlink its parent's path
        # The socket file we bound, so a server unlinks its own and never a newer server's.
        self._socket_file = (socket_identity(config.unix_path)
                             if config.unix_path and self._owns_listener else None)
        self._busy_reply = (self.encoder.encode(config.busy_message.encode())
                            if config.busy_message else None)
        self._rejected_unlogged = 0
        self._rejecting = False
        self._full_since: float | None = None
        # A prefork worker's: do the other workers have room? (their open
        # connections, through the supervisor's shared array) and a callback
        # to publish its own count.
        self.sibling_room: Any = None  # prefork: Callable[[], bool | None]
        self.on_connection_count: Any = None
        self._reject_logged_at = -_REJECT_LOG_EVERY
        self._address = self.listener.getsockname()
        self.stats = ServerStats(metrics=config.metrics_port is not None)
        self.metrics = ServerMetrics(self) if config.metrics_port is not None else None
        # auto runs the inline path itself (Connection.handle_inline times the loop engine's).
        if self.metrics is not None and self.inline and hasattr(self.engine, "handle_inline"):
            self.new_session = timed_sessions(self.new_session, self.stats)
        self.connections: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self._accepting = False
        self._draining = False
        self._stopped_hard = False  # _hard_stop ran: calls still running are abandoned
        self._deadline_armed = False
        self._deadline_lock = threading.Lock()
        # Called (from the deadline thread) when drain_timeout passed with the loop
        # stuck in a handler: serve() interrupts its main thread with it.
        self.on_drain_overdue = None
        self._init_lifecycle()
        # All a connection knows of its server.
        self._ctx = ConnectionContext(
            config=config, mux=self.mux, engine=self.engine, encode=self.encoder.encode,
            new_session=getattr(self, "new_session", None), new_framer=self.new_framer,
            stats=self.stats, ssl_context=self.ssl_context, inline=self.inline, server=self,
            app=self.app, closed=self.forget, check_drained=self._stop_if_drained)

    # --- lifecycle -----------------------------------------------------------

    def serve_forever(self) -> None:
        self.engine.start(self.mux)
        if self.metrics is not None:
            self.metrics.start(on_failure=self.engine.stop)
        self._set_accepting(True)
        if self.config.stats_interval:
            self.mux.call_later(self.config.stats_interval, self._report_stats)
        log.info("muxpool serving %s", _serving(self))
        watchdog = None
        if self.config.loop_stall_warning and not self.engine.watches_its_loop:
            watchdog = LoopWatchdog(self.mux, self.config.loop_stall_warning).start()
        self._serving.set()
        self._notify_serving(self.mux)
        try:
            with _signals_wake(self.mux):
                self.mux.run()
        finally:
            if watchdog is not None:
                watchdog.stop()
            if self.metrics is not None:
                self.metrics.stop()
            self._close_everything()
            # After a hard stop, handler calls still running are abandoned, not waited for.
            self.engine.stop(wait=not self._stopped_hard)
            self.mux.close()
            served = self.stats.connections_total
            log.info("muxpool stopped (%d connection%s served)", served, "" if served == 1 else "s")
            self._stopped.set()

    def _begin_drain(self) -> None:
        if self._draining:
            return
        self._draining = self._ctx.draining = True
        self._notify_stopping()
        self._ctx.drain_deadline = time.monotonic() + self.config.drain_timeout
        self._set_accepting(False)
        self.listener.close()
        if self._socket_file is not None:
            unlink_own_socket(self.config.unix_path, self._socket_file)
        for conn in list(self.connections.values()):
            conn.drain()
        self.mux.call_later(self.config.drain_timeout, self._hard_stop)
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
        for conn in _snapshot(self.connections):
            conn.shutdown_socket()
        self.stop_now()
        if self.on_drain_overdue is not None and self.mux.ticks % 2 == 0:
            self.on_drain_overdue()

    def _stop_if_drained(self) -> None:
        if self._draining and not self.connections and self.engine.idle():
            self.mux.stop()

    _deadline_fired = False  # _hard_stop has run on the loop: it is not stuck

    def _hard_stop(self) -> None:
        self._deadline_fired = True
        if self.connections:
            log.warning("closing %d connections that did not finish in time", len(self.connections))
        self._stopped_hard = True
        self._close_everything()
        self.mux.stop()

    def _close_everything(self) -> None:
        self._set_accepting(False)
        for conn in list(self.connections.values()):
            conn.abort(None, reset=True)
        try:
            self.listener.close()
        except OSError:
            pass

    # --- accepting -------------------------------------------------------------

    def _set_accepting(self, on: bool) -> None:
        if on == self._accepting or (on and self._draining):
            return
        self._accepting = on
        if on:
            self.mux.register(self.listener, EVENT_READ, self._on_accept)
        else:
            self.mux.unregister(self.listener)

    def _on_accept(self, mask: int) -> bool:
        """Accept what waits, at most _ACCEPTS_PER_EVENT; True once the queue is empty."""
        for _ in range(_ACCEPTS_PER_EVENT):
            full = len(self.connections) >= self.config.max_connections
            if full and self._leave_to_siblings():
                return False
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return True
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _OVERLOAD_ERRNOS:
                    log.error("accept failed (%s); pausing accepts for 0.1 s", exc)
                    self._set_accepting(False)
                    self.mux.call_later(0.1, lambda: self._set_accepting(True))
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
        if self._owns_listener or self._rejecting or self.sibling_room is None:
            return False
        if self.sibling_room() is False:
            return False
        self._set_accepting(False)
        if self._full_since is None:
            self._full_since = time.monotonic()
        self.mux.call_later(_SHARED_FULL_PAUSE, self._reject_waiting)
        return True

    def _reject_waiting(self) -> None:
        if self._draining:
            return
        waited = time.monotonic() - (self._full_since or 0.0)
        if (waited < _SHARED_FULL_WAIT_MAX and len(self.connections) >= self.config.max_connections
                and self.sibling_room() is not False):
            self.mux.call_later(_SHARED_FULL_PAUSE, self._reject_waiting)  # theirs to take
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
        self.stats.connections_rejected += 1
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
        if self.request_handler:
            kind = RequestHandlerConnection
        elif self.engine.per_connection:
            kind = StreamConnection
        else:
            kind = Connection
        conn = kind(self._ctx, sock, peer, next(self._ids))
        self.connections[id(conn)] = conn
        if self.on_connection_count is not None:
            self.on_connection_count(len(self.connections))
        self.stats.connections_total += 1
        conn.start()

    def forget(self, conn: Connection) -> None:
        """A connection's socket closed: free its slot, resume accepting."""
        if self.connections.pop(id(conn), None) is not None:
            self.stats.closed(conn)
            if self.config.access_log:
                log_access(conn, time.monotonic())
        if self.on_connection_count is not None:
            self.on_connection_count(len(self.connections))
        if not self._accepting and not self._draining and len(self.connections) < self.config.max_connections:
            self._full_since = None
            self._set_accepting(True)
        self._stop_if_drained()

    def _report_stats(self) -> None:
        self.report_stats(len(self.connections), self.engine.queue_depth())
        self.mux.call_later(self.config.stats_interval, self._report_stats)

    def report_stats(self, connections: int, queued: int) -> None:
        """Log the ``--stats-interval`` line (a prefork worker publishes it instead)."""
        log.info("%s", self.stats.line(connections, queued))

    def new_framer(self):
        return make_framer(self.config.framing, self.config.max_message_size)


def serve(app: Any = None, address: tuple[str, int] | None = None, **options: Any) -> None:
    """Serve until SIGTERM/SIGINT (drain); SIGQUIT, or a second SIGTERM/SIGINT
    at least ``DUPLICATE_WINDOW`` seconds after the first, stops at once.

    ``serve(MyHandler, ("127.0.0.1", 9999), engine="threadpool")``.
    """
    if address is not None:
        options["host"], options["port"] = address
    server = Server(app, **options)
    server.notifier = Notifier()  # a no-op unless a service manager set NOTIFY_SOCKET
    stop_signals = None
    if threading.current_thread() is threading.main_thread():
        stop_signals = StopSignals(server).install()
    try:
        server.serve_forever()
    except _StopNow:
        pass  # serve_forever closed every connection on its way out
    finally:
        if stop_signals is not None:
            stop_signals.restore()
        server.notifier.close()


DUPLICATE_WINDOW = 0.5  # s: a repeat of the first stop signal this soon is the same request


class StopSignals:
    """The stop signals of a process that serves (the main thread's handlers).

    SIGTERM or SIGINT starts the drain. The same signal often arrives twice
    within a millisecond — ``timeout``, ``make`` and other supervisors signal a
    whole process group *and* their child — so a repeat within
    ``DUPLICATE_WINDOW`` seconds of the first is taken as the same request and
    the drain goes on. A later one is a person's second request (Ctrl-C
    again), and SIGQUIT always is: both stop at once, as gunicorn's SIGQUIT.
    """

    def __init__(self, server: Server):
        self.server = server
        self.first_at: float | None = None
        self.overdue = False
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopSignals":
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self._previous[signum] = signal.signal(signum, self.on_signal)
        main = threading.main_thread().ident

        def interrupt() -> None:  # the drain deadline thread: the loop is stuck in a handler
            self.overdue = True
            signal.pthread_kill(main, signal.SIGTERM)

        self.server.on_drain_overdue = interrupt
        return self

    def restore(self) -> None:
        self.server.on_drain_overdue = None
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.overdue:
            self._stop_now()
        elif signum == signal.SIGQUIT:
            log.warning("signal SIGQUIT: stopping now")
            self._stop_now()
        elif self.first_at is None:
            self.first_at = now
            log.info("signal %s: draining (SIGQUIT, or the signal again, stops at once)", name)
            self.server.shutdown(wait=False)
        elif now - self.first_at < DUPLICATE_WINDOW:
            log.info("signal %s again %.0f ms after the first: the same request, still draining",
                     name, (now - self.first_at) * 1000)
        else:
            log.warning("second signal: stopping now")
            self._stop_now()

    def _stop_now(self) -> None:
        server = self.server
        server.stop_now()
        # (On gevent this handler runs in a greenlet of its own: raising would end only it.)
        if server.config.engine != "gevent" and server.mux.in_loop_thread() and server.mux.ticks % 2 == 0:
            # The loop is inside a callback — a handler that may never return —
            # so it would never get to run stop_now: unwind it from here.
            raise _StopNow


class _StopNow(BaseException):
    """A stop-now request, raised out of whatever the loop thread is running, a
    handler included (neither an ``Exception`` nor a ``SystemExit``, which the
    engines catch around handler calls), so ``serve_forever`` unwinds and
    closes everything."""


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
    return serving_line(server.app, server.address, server.config, server.engine.describe(),
                        tls=server.ssl_context is not None, framed=not server.request_handler)


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


__all__ = ["Server", "ServerConfig", "serve"]
