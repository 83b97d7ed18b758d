"""What every kind of server shares with its user: where it listens, serving on
a background thread, stopping from any thread, the context manager.

:class:`~muxpool.server.Server` (one process, one loop) and
:class:`~muxpool.prefork.PreforkServer` (a supervisor of worker processes,
each running a ``Server``) both have this surface and nothing else public.
A subclass provides ``serve_forever()``, ``_begin_drain`` and ``_hard_stop``
(run on its loop), and sets ``config``, ``_listener``, ``_mux`` and ``_address``.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from . import calls

log = logging.getLogger("muxpool.server")


class ServerLifecycle:
    config: Any  # the ServerConfig it runs: read it, never change it (it is frozen)
    _listener: socket.socket
    _mux: Any  # the Multiplexer its loop runs
    _address: Any
    _failure: BaseException | None = None
    # serve(): called from the drain deadline thread, when one runs, to interrupt
    # a main thread whose loop is stuck in a handler.
    _on_drain_overdue = None
    # serve(), in the process a service manager started: a muxpool.systemd.Notifier
    # told READY=1 once serving, STOPPING=1 as the drain begins, and WATCHDOG=1 from
    # a timer on the loop (a loop that stops turning stops the pings: systemd restarts us).
    _notifier = None

    def _init_lifecycle(self) -> None:
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._serving = threading.Event()

    @property
    def address(self) -> Any:
        """Where the server listens: ``(host, port)`` or a Unix socket path."""
        return self._address

    # socketserver's names, for handlers that read self.server.server_address
    server_address = address

    @property
    def socket(self) -> socket.socket:
        return self._listener

    def serve_forever(self) -> None:
        raise NotImplementedError

    def _notify_serving(self, mux) -> None:
        """On the loop, once serving: READY=1, and the watchdog pings if asked for."""
        if self._notifier is None:
            return
        self._notifier.ready()
        from .systemd import watchdog_interval

        interval = watchdog_interval()
        if interval:
            def ping() -> None:
                self._notifier.watchdog()
                mux.call_later(interval, ping)

            mux.call_later(0, ping)

    def _notify_stopping(self) -> None:
        if self._notifier is not None:
            self._notifier.stopping()

    def start(self):
        """Serve on a background thread; returns once the server accepts, or
        raises what stopped it from starting (an unpicklable app for prefork's
        fork server, say)."""
        self._thread = threading.Thread(target=self._serve_in_thread, name="muxpool-server", daemon=True)
        self._thread.start()
        self._serving.wait()
        if self._failure is not None:
            self._thread.join()
            raise self._failure
        return self

    def _serve_in_thread(self) -> None:
        try:
            self.serve_forever()
        except BaseException as exc:  # noqa: BLE001 - handed to start(), or logged once serving
            if self._serving.is_set():
                log.exception("the server stopped on an error")
            else:
                self._failure = exc
        finally:
            self._serving.set()  # start() must not wait for a server that will never serve

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        """Drain and stop. Safe from any thread, a handler included (which
        never waits for itself)."""
        if self._stopped.is_set():
            return
        self._before_drain()
        self._mux.defer(self._begin_drain)
        in_handler = self._mux.in_loop_thread() or getattr(calls.handler_thread, "active", False)
        if wait and not in_handler and self._serving.is_set():
            self._stopped.wait(timeout)

    def _before_drain(self) -> None:
        """Off the loop, before the drain is asked of it (the loop may be stuck)."""

    def stop_now(self) -> None:
        """Close every connection at once and stop (a second SIGTERM)."""
        self._mux.defer(self._hard_stop)

    def __enter__(self):
        if self._thread is None and not self._serving.is_set():
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()
        if self._thread is not None:
            self._thread.join()
