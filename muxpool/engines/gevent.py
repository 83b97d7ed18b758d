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
work or of a call the patching does not cover.
"""

from __future__ import annotations

import logging

from ..errors import MissingDependency

try:
    import gevent
    import gevent.events
    import gevent.monkey
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependency("the gevent engine", "gevent") from exc

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

    def start(self, server) -> None:
        if not self.config.loop_stall_warning:
            return
        gevent.config.max_blocking_time = self.config.loop_stall_warning
        gevent.config.monitor_thread = True
        gevent.events.subscribers.append(self._on_event)
        self._watchdog = gevent.get_hub().start_periodic_monitoring_thread()

    def stop(self, wait: bool = True) -> None:
        if self._on_event in gevent.events.subscribers:
            gevent.events.subscribers.remove(self._on_event)

    def _on_event(self, event) -> None:
        if isinstance(event, gevent.events.EventLoopBlocked):
            where = "".join(event.info[-12:]) if event.info else ""
            log.warning("a handler blocked the gevent hub for over %.3f s:\n%s",
                        event.blocking_time, where)

    def spawn(self, fn, name: str) -> None:
        gevent.spawn(fn).name = name  # make_lock's threading.Lock is patched: cooperative

    def describe(self) -> str:
        return "a greenlet per connection"
