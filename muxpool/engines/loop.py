"""``loop``: the handler runs on the loop thread itself.

The fastest engine for handlers that never block (pure computation on the
message, in-memory state): no thread hop, no locks. One blocking call stalls
every connection, so it is not the default.
"""

from __future__ import annotations

import time

from .base import Engine


class LoopEngine(Engine):
    name = "loop"
    per_connection = False  # messages run on the loop, connections stay on it
    can_block = False
    inline = True  # connections may call the handler directly (Connection.handle_inline)

    def __init__(self, config):
        super().__init__(config)
        self._server = None

    def start(self, server) -> None:
        self._server = server

    def run(self, conn, fn, arg) -> None:
        started = time.perf_counter()
        try:
            value = fn(conn, arg)
        except (Exception, SystemExit) as exc:  # sys.exit() in a handler ends that call, not the server
            self._server.handler_done(conn, False, exc, time.perf_counter() - started)
        else:
            self._server.handler_done(conn, True, value, time.perf_counter() - started)

    def describe(self) -> str:
        return "handlers on the loop thread"
