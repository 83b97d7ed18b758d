"""What every connection of one server shares, and all a connection knows of it.

A connection reads its options, its loop, its engine and its handler factory
from here, and reports two things back: that it has closed (``closed``: the
server frees its slot) and, while the server drains, that a handler call
ended (``check_drained``). Nothing else flows from a connection to the server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import ServerConfig
from .multiplexer import Multiplexer
from .stats import ServerStats


@dataclass(eq=False)
class ConnectionContext:
    config: ServerConfig
    mux: Multiplexer
    engine: Any  # a MessageEngine or a ConnectionEngine (muxpool.engines.base)
    encode: Callable[[bytes], bytes]  # replies: not bound by the limit on what we accept
    new_session: Callable[[], Any]  # the handler object for one connection
    new_framer: Callable[[], Any]
    stats: ServerStats
    ssl_context: Any = None
    app: Any = None  # a socketserver handler class runs whole connections itself
    inline: bool = False  # the loop engine's fast path: handlers called from the read itself
    server: Any = None  # what a handler reaches as conn.server (socketserver's name)
    closed: Callable[[Any], None] = lambda conn: None  # on the loop thread
    check_drained: Callable[[], None] = lambda: None
    # fn() on the loop, from another thread: the engine's, ordered with its results
    # (a handler's send before its reply), or mux.defer.
    later: Callable[[Callable[[], Any]], None] | None = None
    draining: bool = False
    drain_deadline: float | None = field(default=None)  # monotonic time the drain must end by

    def linger_time(self) -> float:
        """How long a lingering close may wait for the client's EOF: linger_timeout,
        and never past the drain's deadline."""
        limit = self.config.linger_timeout
        if self.drain_deadline is not None:
            limit = min(limit, self.drain_deadline - time.monotonic())
        return limit

    def closed_from_any_thread(self, conn: Any) -> None:
        if self.mux.in_loop_thread():
            self.closed(conn)
        else:
            self.mux.defer(lambda: self.closed(conn))
