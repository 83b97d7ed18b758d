"""Keeping asynchronous signals off threads that cannot act on them.

The kernel hands a process-directed signal (``kill(pid, SIGTERM)``) to any
thread that does not block it. Python runs its handlers on the main thread
only, and only when that thread next runs Python code: a signal that lands on
a helper thread while the main thread sleeps in its poll is noticed when
something else wakes the poll, which on an idle server may be never. A helper
thread started inside :func:`blocked` inherits a mask that leaves every such
signal to the threads that can take it.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

# Raised by the kernel for a fault of the thread itself: never blocked.
SYNCHRONOUS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL,
                         signal.SIGABRT, signal.SIGTRAP, signal.SIGSYS})
ASYNCHRONOUS = frozenset(signal.valid_signals()) - SYNCHRONOUS


@contextlib.contextmanager
def blocked(signals=ASYNCHRONOUS) -> Iterator[set]:
    """Block ``signals`` in this thread for the block's length; yields the previous mask.
    A signal that arrives meanwhile stays pending and is delivered on the way out."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield previous
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
