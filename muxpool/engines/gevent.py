"""``gevent``: a greenlet per connection (``pip install 'muxpool[gevent]'``).

For many concurrent connections whose handlers wait on I/O: a greenlet costs
a few KiB where a thread costs a stack, and with the standard library
monkey-patched, a handler's ``time.sleep``, sockets and locks yield to the
other greenlets instead of blocking. The same loop accepts and drains
connections; it runs on the gevent hub too, because ``selectors`` is patched.

Monkey-patching must happen before anything imports ``socket`` or
``threading`` — before the user's module: ``muxpool serve --engine gevent``
does it first thing in its own process. From Python, call
``gevent.monkey.patch_all()`` at the top of your main module; without it this
engine refuses to start, with that advice.

A watchdog thread (gevent's monitor) logs any handler that keeps the hub busy
longer than ``loop_stall_warning`` seconds (default 0.5) — the sign of CPU
work or of a call the patching does not cover. It is a real thread, started
with asynchronous signals blocked: a SIGTERM the kernel handed to it would
trip Python's flag while the hub, the only thread that runs handlers, slept
on in epoll, and the server would never drain.

gevent checks for signals in its hub (its loop's prepare callback), so a
Python signal handler runs there when a signal interrupts the hub's wait —
and nothing may block in the hub: a handler that logs, when the log handler's
lock is held by another thread (the monitor writing a report), raised
``BlockingSwitchOutError`` instead of starting the drain. While the engine
runs, the SIGTERM, SIGINT and SIGHUP handlers in place are run in a greenlet
of their own when they are called in the hub.

gevent's libev loop learns of a signal only when it interrupts the hub's
``epoll_wait``. One that arrives just before the hub goes to sleep (after
the loop's last signal check) or on another thread sets Python's flag and
nothing more: the hub then slept until its next timer (``idle_timeout``,
300 s) with the SIGTERM taken and unhandled — a stop that hung on 3.13
under load in about 1 of 5 runs of 50. The engine therefore points
``signal.set_wakeup_fd`` at a pipe the hub watches, as asyncio does, so
every signal wakes the hub, which then runs the handler.
"""

from __future__ import annotations

import logging
import signal

from ..errors import MissingDependency

try:
    import gevent
    import gevent.events
    import gevent.monkey
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependency("the gevent engine", "gevent") from exc

from ..gevent_signals import SignalWakeup
from . import _signals
from .base import Engine

log = logging.getLogger("muxpool.server")


class GeventEngine(Engine):
    name = "gevent"
    per_connection = True
    can_block = True
    watches_its_loop = True  # gevent's monitor thread watches the hub

    def __init__(self, config):
        if not gevent.monkey.is_module_patched("socket") or not gevent.monkey.is_module_patched("threading"):
            raise RuntimeError(
                "the gevent engine needs the standard library monkey-patched before anything "
                "imports socket or threading: run `muxpool serve module:app --engine gevent`, "
                "or put `from gevent import monkey; monkey.patch_all()` first in your main module")
        super().__init__(config)
        self._watchdog = None
        self._wrapped: dict[int, tuple] = {}
        self._wakeup = SignalWakeup()

    def start(self, mux) -> None:
        self._wrapped = _handlers_off_the_hub()
        self._wakeup.start()
        if not self.config.loop_stall_warning:
            return
        gevent.config.max_blocking_time = self.config.loop_stall_warning
        gevent.config.monitor_thread = True
        gevent.events.subscribers.append(self._on_event)
        with _signals.blocked():  # the thread inherits this mask: signals go to the hub's thread
            self._watchdog = gevent.get_hub().start_periodic_monitoring_thread()

    def stop(self, wait: bool = True) -> None:
        if self._on_event in gevent.events.subscribers:
            gevent.events.subscribers.remove(self._on_event)
        for signum, (handler, off_hub) in self._wrapped.items():
            if signal.getsignal(signum) is off_hub:  # else someone replaced it since: theirs now
                signal.signal(signum, handler)
        self._wrapped = {}
        self._wakeup.stop()

    def _on_event(self, event) -> None:
        if isinstance(event, gevent.events.EventLoopBlocked):
            where = "".join(event.info[-12:]) if event.info else ""
            log.warning("a handler blocked the gevent hub for over %.3f s:\n%s",
                        event.blocking_time, where)

    def spawn(self, fn, name: str) -> None:
        gevent.spawn(fn).name = name  # make_lock's threading.Lock is patched: cooperative

    def describe(self) -> str:
        return "a greenlet per connection"


_SERVER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)


def _handlers_off_the_hub() -> dict[int, tuple]:
    """Wrap the Python handlers of the server's signals so that, called in the hub, they
    run in a new greenlet instead, where they may wait. Returns ``{signum: (handler,
    wrapper)}`` for :meth:`GeventEngine.stop` to undo."""
    wrapped: dict[int, tuple] = {}
    for signum in _SERVER_SIGNALS:
        handler = signal.getsignal(signum)
        # default_int_handler raises KeyboardInterrupt, which gevent already hands to
        # the main greenlet; in a greenlet of its own it would end only that greenlet.
        if not callable(handler) or handler is signal.default_int_handler:
            continue

        def off_hub(signum, frame, handler=handler):
            if gevent.getcurrent() is gevent.get_hub():
                gevent.spawn(handler, signum, None)
            else:
                handler(signum, frame)

        try:
            signal.signal(signum, off_hub)
        except ValueError:  # not the main thread: its handlers are not ours to touch
            break
        wrapped[signum] = (handler, off_hub)
    return wrapped
