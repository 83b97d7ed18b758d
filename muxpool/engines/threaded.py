"""``threaded``: a thread per connection, on blocking sockets.

``socketserver.ThreadingMixIn`` without its unbounded threads: at most
``max_connections`` connection threads exist; further clients wait in the
listen backlog. Simple and fast for a moderate number of busy connections
whose handlers block; each connection costs a thread (about 8 MiB of
reserved stack, a few dozen KiB resident) whether it is busy or idle — for
many mostly idle clients, ``threadpool`` holds them with no thread each.
"""

from __future__ import annotations

import signal
import threading

from .base import Engine

# Signals the kernel raises for a fault of the thread itself: never blocked.
_SYNCHRONOUS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT,
                signal.SIGTRAP, signal.SIGSYS}


class ThreadedEngine(Engine):
    """Connection threads end with their connections; the server drains them."""

    name = "threaded"
    per_connection = True
    can_block = True
    kernel_timeouts = True  # real threads: SO_RCVTIMEO/SO_SNDTIMEO, no poll per recv

    def spawn(self, fn, name: str) -> None:
        threading.Thread(target=_with_signals_blocked, args=(fn,), name=name, daemon=True).start()

    def describe(self) -> str:
        return f"a thread per connection, at most {self.config.max_connections}"


def _with_signals_blocked(fn) -> None:
    """Run ``fn`` with asynchronous signals blocked in this thread, so the kernel hands
    SIGTERM and the like to another thread. Python runs signal handlers on the main
    thread anyway; what a signal delivered here would do is cut a blocked send short
    (a partial count, which the connection must take for a write timeout) and lose
    the rest of a reply just as a drain begins."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals() - _SYNCHRONOUS)
    fn()
