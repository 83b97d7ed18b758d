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


class ThreadedEngine:
    name = "threaded"
    per_connection = True
    can_block = True

    def __init__(self, config):
        self.config = config

    def start(self, server) -> None:
        pass

    def stop(self) -> None:
        pass  # connection threads end with their connections; the server drains them

    def spawn(self, fn, name: str) -> None:
        threading.Thread(target=fn, name=name, daemon=True).start()

    def make_lock(self):
        return threading.Lock()

    def idle(self) -> bool:
        return True

    def queue_depth(self) -> int:
        return 0

    def describe(self) -> str:
        return f"a thread per connection, at most {self.config.max_connections}"
