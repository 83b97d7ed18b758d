"""``threaded``: a thread per connection, on blocking sockets.

``socketserver.ThreadingMixIn`` without its unbounded threads: at most
``max_connections`` connection threads exist; further clients wait in the
listen backlog. Simple and fast for a moderate number of busy connections
whose handlers block; each connection costs a thread (about 8 MiB of
reserved stack, a few dozen KiB resident) whether it is busy or idle — for
many mostly idle clients, ``threadpool`` holds them with no thread each.
"""

from __future__ import annotations

import queue
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

    def start(self, mux) -> None:
        # Thread.start() waits until the new thread runs, which with hundreds of
        # threads wanting the GIL can take a switch interval (5 ms) each: on the
        # loop thread that stalls accepting, and in a burst the listen queue
        # overflows. The loop hands the start to this thread instead.
        self._starts: queue.SimpleQueue = queue.SimpleQueue()
        self._starter = threading.Thread(target=_with_signals_blocked, args=(self._start_threads,),
                                         name="muxpool-thread-starter", daemon=True)
        self._starter.start()

    def spawn(self, fn, name: str) -> None:
        self._starts.put((fn, name))

    def _start_threads(self) -> None:
        # Started from here, connection threads inherit its blocked signals.
        while (job := self._starts.get()) is not None:
            fn, name = job
            threading.Thread(target=fn, name=name, daemon=True).start()

    def stop(self, wait: bool = True) -> None:
        self._starts.put(None)  # after the connections it was given, which the server has closed

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
