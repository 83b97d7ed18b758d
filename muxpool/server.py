"""The server core: listening sockets, accept, connection lifetimes, shutdown.

A :class:`Server` owns one :class:`~muxpool.multiplexer.Multiplexer` and the
sockets on it; its engine decides only where handler calls run and reports
each result back on the loop thread (``Connection.handler_done``).

The accept loop survives overload: at ``max_connections`` it stops watching
the listener, so excess clients wait in the kernel's backlog; on EMFILE,
ENFILE, ENOBUFS or ENOMEM it logs and backs off; ECONNABORTED is skipped.

Shutdown (``shutdown()`` from any thread, a handler included, or SIGTERM /
SIGINT under :func:`serve`): stop accepting, stop reading, finish the messages
already received, flush their replies, close; after ``drain_timeout`` the
rest is closed hard.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import signal
import socket
import ssl
import threading
import time
from typing import Any

from .compat import RequestHandlerConnection, is_request_handler
from .config import ServerConfig, make_listener
from .connection import Connection, _call_connect
from .engines import load_engine
from .framing import make_framer
from .handlers import EchoService, resolve_handler
from .multiplexer import EVENT_READ, Multiplexer
from .stats import ServerStats
from .stream import StreamConnection
from .tls import server_context
from .watchdog import LoopWatchdog

log = logging.getLogger("muxpool.server")

_OVERLOAD_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_ACCEPTS_PER_EVENT = 64
_MAX_ENCODED = 0xFFFFFFFF  # the most a 4-byte length prefix can carry


class Server:
    """Serve ``app`` (default: the lesson's echo service) on one engine.

    ``Server(app, port=0, engine="loop")`` binds at once (so ``.address`` is
    known); ``serve_forever()`` blocks, ``start()`` serves on a background
    thread, ``shutdown()`` drains and stops from any thread. A context
    manager: ``with Server(...).start() as srv:``.
    """

    def __init__(self, app: Any = None, *, listener: socket.socket | None = None,
                 ssl_context: ssl.SSLContext | None = None, pool: Any = None, **options: Any):
        unknown = set(options) - set(ServerConfig.names())
        if unknown:
            raise TypeError(f"unknown server option(s): {', '.join(sorted(unknown))}")
        self.config = config = ServerConfig(**options)
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
                where = config.engine if config.engine != "prefork" else "prefork engine's loop"
                raise ValueError(
                    f"the {where} engine runs handlers on its event loop, which must never "
                    f"block, and {self.app.__qualname__} is a socketserver handler that blocks on its "
                    "socket: use engine threadpool, threaded, prefork or gevent")
        else:
            self.new_session = resolve_handler(self.app)
        # One stateless encoder for every reply: what we send is not bound by
        # the limit on what we accept.
        self.encoder = make_framer(config.framing, _MAX_ENCODED)
        self.in_handler = threading.local()  # engines set .active while a handler runs
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
        self._address = self.listener.getsockname()
        self.stats = ServerStats()
        self.connections: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self._accepting = False
        self._draining = False
        self._stopped_hard = False  # _hard_stop ran: calls still running are abandoned
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._serving = threading.Event()

    # --- lifecycle -----------------------------------------------------------

    @property
    def address(self) -> Any:
        """Where the server listens: ``(host, port)`` or a Unix socket path."""
        return self._address

    # socketserver's names, for handlers that read self.server.server_address
    server_address = address

    @property
    def socket(self) -> socket.socket:
        return self.listener

    def serve_forever(self) -> None:
        if getattr(self.engine, "supervises", False):
            self._supervise()
            return
        self.engine.start(self)
        self._set_accepting(True)
        if self.config.stats_interval:
            self.mux.call_later(self.config.stats_interval, self._report_stats)
        log.info("muxpool serving %s on %s (engine=%s, %s, framing=%s)", _app_name(self.app),
                 _format_address(self.address), self.config.engine, self.engine.describe(),
                 self.config.framing)
        watchdog = None
        if self.config.loop_stall_warning and not self.engine.watches_its_loop:
            watchdog = LoopWatchdog(self.mux, self.config.loop_stall_warning).start()
        self._serving.set()
        try:
            self.mux.run()
        finally:
            if watchdog is not None:
                watchdog.stop()
            self._close_everything()
            # After a hard stop, handler calls still running are abandoned, not waited for.
            self.engine.stop(wait=not self._stopped_hard)
            self.mux.close()
            log.info("muxpool stopped (%d connections served)", self.stats.connections_total)
            self._stopped.set()

    def _supervise(self) -> None:
        """Engines that run whole servers in other processes (prefork)."""
        log.info("muxpool serving %s on %s (engine=%s, %s, framing=%s)", _app_name(self.app),
                 _format_address(self.address), self.config.engine, self.engine.describe(),
                 self.config.framing)
        try:
            self.engine.supervise(self, ready=self._serving.set)
        finally:
            self.listener.close()
            if self.config.unix_path and self._owns_listener:
                _unlink_quietly(self.config.unix_path)
            self.mux.close()
            log.info("muxpool stopped")
            self._stopped.set()

    def start(self) -> "Server":
        """Serve on a background thread; returns once the server accepts."""
        self._thread = threading.Thread(target=self.serve_forever, name="muxpool-server", daemon=True)
        self._thread.start()
        self._serving.wait()
        return self

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        """Drain and stop. Safe from any thread, a handler included (which
        never waits for itself)."""
        if self._stopped.is_set():
            return
        self.mux.defer(self._begin_drain)
        in_handler = self.mux.in_loop_thread() or getattr(self.in_handler, "active", False)
        if wait and not in_handler and self._serving.is_set():
            self._stopped.wait(timeout)

    def stop_now(self) -> None:
        """Close every connection at once and stop (a second SIGTERM)."""
        self.mux.defer(self._hard_stop)

    def __enter__(self) -> "Server":
        if self._thread is None and not self._serving.is_set():
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()
        if self._thread is not None:
            self._thread.join()

    def _begin_drain(self) -> None:
        if self._draining:
            return
        self._draining = True
        if getattr(self.engine, "supervises", False):
            self.engine.drain()
            return
        self._set_accepting(False)
        self.listener.close()
        if self.config.unix_path and self._owns_listener:
            _unlink_quietly(self.config.unix_path)
        for conn in list(self.connections.values()):
            conn.close_when_done()
        self.mux.call_later(self.config.drain_timeout, self._hard_stop)
        self._stop_if_drained()

    def _stop_if_drained(self) -> None:
        if self._draining and not self.connections and self.engine.idle():
            self.mux.stop()

    def _hard_stop(self) -> None:
        if getattr(self.engine, "supervises", False):
            self.engine.kill_all()
            return
        if self.connections:
            log.warning("closing %d connections that did not finish in time", len(self.connections))
        self._stopped_hard = True
        self._close_everything()
        self.mux.stop()

    def _close_everything(self) -> None:
        self._set_accepting(False)
        for conn in list(self.connections.values()):
            conn.abort(None)
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

    def _on_accept(self, mask: int) -> None:
        for _ in range(_ACCEPTS_PER_EVENT):
            if len(self.connections) >= self.config.max_connections:
                self._set_accepting(False)  # the rest wait in the kernel backlog
                return
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _OVERLOAD_ERRNOS:
                    log.error("accept failed (%s); pausing accepts for 0.1 s", exc)
                    self._set_accepting(False)
                    self.mux.call_later(0.1, lambda: self._set_accepting(True))
                    return
                raise
            self._add_connection(sock, peer)

    def _add_connection(self, sock: socket.socket, peer: Any) -> None:
        sock.setblocking(False)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = peer or self.config.unix_path
        if self.request_handler or self.engine.per_connection:
            kind = RequestHandlerConnection if self.request_handler else StreamConnection
            stream = kind(self, sock, peer, next(self._ids))
            self.connections[id(stream)] = stream
            self.stats.connections_total += 1
            if self.ssl_context is not None:  # the whole handshake, not each read, is timed
                stream.tls_timer = self.mux.call_later(self.config.tls_handshake_timeout,
                                                       lambda: self._handshake_overdue(stream))
            self.engine.spawn(stream.serve, f"muxpool-conn-{stream.id}")
            return
        conn = Connection(self, sock, peer, next(self._ids))
        self.connections[id(conn)] = conn
        self.stats.connections_total += 1
        conn.update_interest()
        if self.config.idle_timeout:
            conn.idle_timer = self.mux.call_later(self.config.idle_timeout, lambda: self._check_idle(conn))
        if conn.tls is None:
            conn.dispatch(_call_connect, None)
        else:  # the greeting waits for the handshake, which must end in time
            limit = self.config.tls_handshake_timeout
            conn.tls_timer = self.mux.call_later(limit, lambda: self._handshake_overdue(conn))

    def tls_ready(self, conn: Connection) -> None:
        """A connection's TLS handshake finished: now it is a client like any other."""
        if conn.tls_timer is not None:
            conn.tls_timer.cancel()
            conn.tls_timer = None
        conn.dispatch(_call_connect, None)

    def _handshake_overdue(self, conn: Connection | StreamConnection) -> None:
        conn.tls_timer = None
        if not conn.closed and not conn.handshaken:
            log.warning("closing %s: no TLS handshake within %s s (tls_handshake_timeout)",
                        conn.peer, self.config.tls_handshake_timeout)
            conn.abort(None)

    def forget_from_any_thread(self, conn) -> None:
        if self.mux.in_loop_thread():
            self.forget(conn)
        else:
            self.mux.defer(lambda: self.forget(conn))

    def forget(self, conn: Connection) -> None:
        """A connection's socket closed: free its slot, resume accepting."""
        self.connections.pop(id(conn), None)
        for timer in (conn.idle_timer, conn.write_timer, conn.handler_timer, conn.tls_timer):
            if timer is not None:
                timer.cancel()
        if not self._accepting and not self._draining and len(self.connections) < self.config.max_connections:
            self._set_accepting(True)
        self._stop_if_drained()

    # --- running handlers ----------------------------------------------------------

    def run_handler(self, conn: Connection, fn, arg) -> None:
        if self.config.handler_timeout:
            conn.handler_timer = self.mux.call_later(self.config.handler_timeout,
                                                     lambda: self._handler_overdue(conn))
        self.engine.run(conn, fn, arg)

    def handler_done(self, conn: Connection, ok: bool, value: Any, elapsed: float) -> None:
        """Called by engines on the loop thread when a handler call returns."""
        self.stats.record(elapsed)
        if conn.handler_timer is not None:
            conn.handler_timer.cancel()
            conn.handler_timer = None
            limit = self.config.handler_timeout
            if elapsed > limit and not conn.closed:
                log.error("handler for %s took %.3f s, over handler_timeout=%s s; closing it",
                          conn.peer, elapsed, limit)
                conn.abort(None)
        conn.handler_done(ok, value)
        if self._draining:
            self._stop_if_drained()

    def _handler_overdue(self, conn: Connection) -> None:
        conn.handler_timer = None
        if not conn.closed:
            log.error("handler for %s exceeded handler_timeout=%s s; closing it",
                      conn.peer, self.config.handler_timeout)
            conn.abort(None)

    # --- timers ----------------------------------------------------------------------

    def _check_idle(self, conn: Connection) -> None:
        if conn.closed:
            return
        limit = self.config.idle_timeout
        quiet = time.monotonic() - conn.last_active
        if quiet >= limit and not conn.busy and not conn.backlog:
            log.info("closing %s: idle for %.1f s (idle_timeout)", conn.peer, quiet)
            conn.abort(None)
        else:
            conn.idle_timer = self.mux.call_later(max(0.05, limit - quiet), lambda: self._check_idle(conn))

    def watch_writes(self, conn: Connection) -> None:
        """Start the write_timeout clock for a connection with unsent output."""
        limit = self.config.write_timeout
        if limit and conn.write_timer is None:
            conn.write_timer = self.mux.call_later(limit, lambda: self._check_write(conn))

    def _check_write(self, conn: Connection) -> None:
        conn.write_timer = None
        if conn.closed or not conn.outbuf:
            return
        limit = self.config.write_timeout
        stalled = time.monotonic() - conn.write_progress
        if stalled >= limit:
            log.warning("closing %s: no reply bytes accepted for %.1f s (write_timeout), "
                        "%d bytes unsent", conn.peer, stalled, len(conn.outbuf))
            conn.abort(None)
        else:
            conn.write_timer = self.mux.call_later(limit - stalled, lambda: self._check_write(conn))

    def _report_stats(self) -> None:
        self.report_stats(len(self.connections), self.engine.queue_depth())
        self.mux.call_later(self.config.stats_interval, self._report_stats)

    def report_stats(self, connections: int, queued: int) -> None:
        """Log the ``--stats-interval`` line (a prefork worker publishes it instead)."""
        log.info("%s", self.stats.line(connections, queued))

    def new_framer(self):
        return make_framer(self.config.framing, self.config.max_message_size)


def serve(app: Any = None, address: tuple[str, int] | None = None, **options: Any) -> None:
    """Serve until SIGTERM/SIGINT (drain), a second signal stops at once.

    ``serve(MyHandler, ("127.0.0.1", 9999), engine="threadpool")``.
    """
    if address is not None:
        options["host"], options["port"] = address
    server = Server(app, **options)
    signals = {signal.SIGTERM: None, signal.SIGINT: None}
    signalled = False  # counted here: _draining is set on the loop thread, which may be busy
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum, frame):
            nonlocal signalled
            if server._draining or signalled:
                log.warning("second signal: stopping now")
                server.stop_now()
                if server.config.engine == "loop" and server.mux.in_loop_thread():
                    # The loop engine runs handlers on this very thread: one that
                    # blocks would keep the loop from ever running stop_now.
                    raise _StopNow
            else:
                signalled = True
                log.info("signal %s: draining", signal.Signals(signum).name)
                server.shutdown(wait=False)
        for signum in signals:
            signals[signum] = signal.signal(signum, on_signal)
    try:
        server.serve_forever()
    except _StopNow:
        pass  # serve_forever closed every connection on its way out
    finally:
        for signum, previous in signals.items():
            if previous is not None:
                signal.signal(signum, previous)


class _StopNow(BaseException):
    """A second signal, raised out of whatever the loop thread is running, a
    handler included (neither an ``Exception`` nor a ``SystemExit``, which the
    engines catch around handler calls), so ``serve_forever`` unwinds and
    closes everything."""


def _app_name(app: Any) -> str:
    if isinstance(app, EchoService):
        return "the echo service"
    return getattr(app, "__qualname__", type(app).__qualname__)


def _format_address(address: Any) -> str:
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


__all__ = ["Server", "ServerConfig", "serve"]
