"""Serving as a process does: :func:`serve` until a stop signal, and what the
stop signals mean (:class:`StopSignals`).

SIGTERM or SIGINT drains; SIGQUIT, or the same signal again later than
``DUPLICATE_WINDOW``, stops at once. The server itself (:mod:`muxpool.server`)
knows nothing of signals beyond waking its loop for them.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from .server import Server
from .systemd import Notifier

log = logging.getLogger("muxpool.server")


def serve(app: Any = None, address: tuple[str, int] | None = None, **options: Any) -> None:
    """Serve until SIGTERM/SIGINT (drain); SIGQUIT, or a second SIGTERM/SIGINT
    at least ``DUPLICATE_WINDOW`` seconds after the first, stops at once.

    ``serve(MyHandler, ("127.0.0.1", 9999), engine="threadpool")``.
    """
    if address is not None:
        options["host"], options["port"] = address
    stop_signals = None
    if threading.current_thread() is threading.main_thread():
        # Before the server binds: its port accepts from then on, so a supervisor may
        # stop it at once, and a SIGTERM then must drain it, not kill the process.
        stop_signals = StopSignals().install()
    try:
        server = Server(app, **options)
        server._notifier = Notifier()  # a no-op unless a service manager set NOTIFY_SOCKET
        try:
            if stop_signals is not None:
                stop_signals.attach(server)
            server.serve_forever()
        except _StopNow:
            pass  # serve_forever closed every connection on its way out
        finally:
            server._notifier.close()
    finally:
        if stop_signals is not None:
            stop_signals.restore()


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

    def __init__(self, server: Server | None = None):
        self.server = server
        self.first_at: float | None = None
        self.overdue = False
        self._previous: dict[int, Any] = {}
        self._early: list[int] = []  # signals taken before there was a server to stop

    def install(self) -> "StopSignals":
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self._previous[signum] = signal.signal(signum, self.on_signal)
        if self.server is not None:
            self._arm_interrupt()
        return self

    def attach(self, server: Server) -> None:
        """The server these signals stop, once it exists; a signal that came while it
        was being made (binding, loading the app) is acted on now, in order."""
        self.server = server
        self._arm_interrupt()
        early, self._early = self._early, []
        for signum in early:
            self.on_signal(signum, None)

    def _arm_interrupt(self) -> None:
        main = threading.main_thread().ident

        def interrupt() -> None:  # the drain deadline thread: the loop is stuck in a handler
            self.overdue = True
            signal.pthread_kill(main, signal.SIGTERM)

        self.server._on_drain_overdue = interrupt

    def restore(self) -> None:
        if self.server is not None:
            self.server._on_drain_overdue = None
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def on_signal(self, signum: int, frame: Any) -> None:
        if self.server is None:  # still being made: stopped once it exists (attach)
            self._early.append(signum)
            return
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
        if server.config.engine != "gevent" and server._mux.in_loop_thread() and server._mux.ticks % 2 == 0:
            # The loop is inside a callback — a handler that may never return —
            # so it would never get to run stop_now: unwind it from here.
            raise _StopNow


class _StopNow(BaseException):
    """A stop-now request, raised out of whatever the loop thread is running, a
    handler included (neither an ``Exception`` nor a ``SystemExit``, which the
    engines catch around handler calls), so ``serve_forever`` unwinds and
    closes everything."""


__all__ = ["DUPLICATE_WINDOW", "StopSignals", "serve"]
