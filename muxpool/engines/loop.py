"""``loop``: the handler runs on the loop thread itself.

The fastest engine for handlers that never block (pure computation on the
message, in-memory state): no thread hop, no locks. One blocking call stalls
every connection, so it is not the default.
"""

from __future__ import annotations

from ..calls import call_handler
from .base import Engine


class LoopEngine(Engine):
    name = "loop"
    per_connection = False  # messages run on the loop, connections stay on it
    can_block = False
    inline = True  # connections may call the handler directly (Connection.handle_inline)

    def run(self, conn, fn, arg, done) -> None:
        done(*call_handler(fn, conn, arg))

    def describe(self) -> str:
        return "handlers on the loop thread"
