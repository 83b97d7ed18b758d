"""The two kinds of engine, declared, and the defaults they share.

An engine decides only where a handler runs. A :class:`MessageEngine` runs
one call at a time for a connection that lives on the loop (``loop``,
``threadpool``); a :class:`ConnectionEngine` runs a whole connection on a
flow of control of its own (``threaded``, ``gevent``; ``threadpool`` is one
too, for socketserver handlers). Neither knows the server: they get the
loop at ``start`` and report each call's end to the callback they are given.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Protocol, runtime_checkable

from ..multiplexer import Multiplexer

# done(ok, value, elapsed): ok=False means value is the exception the call raised.
Done = Callable[[bool, Any, float], None]


@runtime_checkable
class MessageEngine(Protocol):
    name: str
    per_connection: bool  # False: messages go through the loop
    can_block: bool  # may a handler block? (False: socketserver handlers are refused)
    inline: bool  # connections may call handlers straight from the read path
    # With inline: None (the connection calls its handlers itself), or the function
    # the server makes its connections' handle_inline(conn, messages) (auto: calls
    # it can hand off): a method, so a read's messages cost no call more.
    inline_method: Callable[[Any, list], None] | None
    watches_its_loop: bool  # it reports a stalled loop itself (else muxpool.watchdog does)

    def start(self, mux: Multiplexer) -> None:
        """Set up (threads, pools); ``mux`` is the loop results come back on."""

    def run(self, conn: Any, fn: Callable[[Any, Any], Any], arg: Any, done: Done) -> None:
        """Run ``fn(conn, arg)`` somewhere, then ``done(ok, value, elapsed)`` on
        the loop thread. A connection has at most one call in flight."""

    def stop(self, wait: bool = True) -> None:
        """Every connection is closed; ``wait``: for calls still running (up to
        drain_timeout), else abandon them."""

    def idle(self) -> bool:
        """No call in flight (the drain may end)."""

    def queue_depth(self) -> int:
        """Calls waiting for a thread (the stats line)."""

    def pools(self) -> list:
        """The muxpool pools that run its calls (each with ``name`` and ``stats()``), for
        the ``muxpool_pool_*`` metrics; empty for an engine that runs them itself."""

    def describe(self) -> str:
        """For the serving log line."""


@runtime_checkable
class ConnectionEngine(Protocol):
    name: str
    per_connection: bool  # True: each connection gets its own thread or greenlet
    can_block: bool
    kernel_timeouts: bool  # real threads: the kernel times blocking calls (SO_RCVTIMEO)
    watches_its_loop: bool

    def start(self, mux: Multiplexer) -> None: ...

    def spawn(self, fn: Callable[[], None], name: str) -> None:
        """Run ``fn`` (a whole connection) on a thread, greenlet or pool thread of its own."""

    def make_lock(self) -> Any:
        """A lock for a connection's writers (cooperative under gevent)."""

    def stop(self, wait: bool = True) -> None: ...

    def idle(self) -> bool: ...

    def queue_depth(self) -> int: ...

    def pools(self) -> list: ...

    def describe(self) -> str: ...


class Engine:
    """Defaults for both kinds."""

    name = "engine"
    per_connection = False
    can_block = True
    inline = False
    inline_method = None
    # Or a method, later(fn): fn() on the loop, ordered with the results this
    # engine reports (what a handler's conn.send defers to: see threadpool).
    later = None
    kernel_timeouts = False
    watches_its_loop = False

    def __init__(self, config):
        self.config = config

    def start(self, mux: Multiplexer) -> None:
        pass

    def stop(self, wait: bool = True) -> None:
        pass

    def make_lock(self):
        return threading.Lock()

    def idle(self) -> bool:
        return True

    def queue_depth(self) -> int:
        return 0

    def pools(self) -> list:
        return []

    def describe(self) -> str:
        return self.name
