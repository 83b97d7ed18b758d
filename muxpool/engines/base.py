"""What an engine does when it has nothing special to do."""

from __future__ import annotations

import threading


class Engine:
    """Defaults for the engine interface (see :mod:`muxpool.engines`)."""

    name = "engine"
    per_connection = False
    can_block = True
    kernel_timeouts = False  # stream connections: may the kernel time blocking calls?
    watches_its_loop = False  # True: it reports a stalled loop itself (else muxpool.watchdog does)

    def __init__(self, config):
        self.config = config

    def start(self, server) -> None:
        pass

    def stop(self, wait: bool = True) -> None:
        """The server has closed every connection; ``wait``: for handler calls
        still running (up to drain_timeout), else abandon them."""

    def make_lock(self):
        return threading.Lock()

    def idle(self) -> bool:
        return True

    def queue_depth(self) -> int:
        return 0

    def describe(self) -> str:
        return self.name
