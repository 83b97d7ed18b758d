"""``threaded``: a thread per connection, on blocking sockets.

``socketserver.ThreadingMixIn`` without its unbounded threads: at most
``max_connections`` connection threads exist; further clients wait in the
listen backlog. Simple and fast for a moderate number of busy connections
whose handlers block; each connection costs a thread (about 8 MiB of
reserved stack, a few dozen KiB resident) whether it is busy or idle — for
many mostly idle clients, ``threadpool`` holds them with no thread each.
"""

from __future__ import annotations

import threading

from .base import Engine


class ThreadedEngine(Engine):
    """Connection threads end with their connections; the server drains them."""

    name = "threaded"
    per_connection = True
    can_block = True
    kernel_timeouts = True  # real threads: SO_RCVTIMEO/SO_SNDTIMEO, no poll per recv

    def spawn(self, fn, name: str) -> None:
        threading.Thread(target=fn, name=name, daemon=True).start()

    def describe(self) -> str:
        return f"a thread per connection, at most {self.config.max_connections}"
