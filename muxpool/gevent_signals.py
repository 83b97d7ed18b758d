"""Every signal wakes the gevent hub (``signal.set_wakeup_fd`` on a pipe it watches).

gevent's libev loop learns of a signal only when it interrupts the hub's
``epoll_wait``. One that arrives just before the hub goes to sleep (after the
loop's last signal check), or on another thread, sets Python's flag and
nothing more: the hub then sleeps until its next timer with the signal taken
and its handler not run — a Ctrl-C that did not interrupt a wait, a SIGTERM
that did not start a drain. asyncio points the wakeup fd at its loop for the
same reason; the gevent engine and GeventPool's waits do it here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

import gevent


class SignalWakeup:
    """A pipe for ``signal.set_wakeup_fd``, watched by the hub: any signal wakes it."""

    def __init__(self) -> None:
        self._fds: tuple[int, int] | None = None
        self._watcher = None

    def start(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)  # set_wakeup_fd requires it: a handler never blocks
        try:
            previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: signals are not ours to route
            previous = None
        if previous is None or previous != -1:
            if previous is not None:  # someone's own (the server's, say): theirs stays
                signal.set_wakeup_fd(previous)
            os.close(read_fd)
            os.close(write_fd)
            return
        self._fds = (read_fd, write_fd)
        self._watcher = gevent.get_hub().loop.io(read_fd, 1)
        self._watcher.ref = False  # it must not keep an otherwise finished hub running
        self._watcher.start(self._drain)

    def _drain(self) -> None:
        # The wakeup is all it is for: the hub's signal check runs the handlers.
        try:
            while os.read(self._fds[0], 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def stop(self) -> None:
        if self._fds is None:
            return
        try:
            current = signal.set_wakeup_fd(-1)
            if current not in (-1, self._fds[1]):  # replaced since: not ours to clear
                signal.set_wakeup_fd(current)
        except ValueError:
            pass
        self._watcher.stop()
        self._watcher.close()
        for fd in self._fds:
            os.close(fd)
        self._fds = self._watcher = None


@contextlib.contextmanager
def signals_wake_the_hub() -> Iterator[None]:
    """For the length of a wait on the main thread's hub (elsewhere, or with a wakeup
    fd someone else set, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wakeup = SignalWakeup()
    wakeup.start()
    try:
        yield
    finally:
        wakeup.stop()
