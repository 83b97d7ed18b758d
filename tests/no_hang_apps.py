"""Apps for ``test_no_hang.py``, served by ``muxpool serve`` in a gevent-patched process."""

from __future__ import annotations

import logging
import os

RELEASE_ENV = "NO_HANG_RELEASE"  # a path: the lock holder lets go once it exists


def hold_the_log_lock(message: bytes, conn) -> bytes:
    """On ``hold``: a real thread (as gevent's monitor thread is) takes the root log
    handler's lock and keeps it until the file named by $NO_HANG_RELEASE exists (at
    most 10 s); the reply comes once the lock is held. Anything else is echoed."""
    if message != b"hold":
        return message
    from gevent.monkey import get_original

    start_thread = get_original("_thread", "start_new_thread")
    real_sleep = get_original("time", "sleep")
    monotonic = get_original("time", "monotonic")
    lock = logging.getLogger().handlers[0].lock
    held: list[bool] = []

    def hold() -> None:
        with lock:
            held.append(True)
            deadline = monotonic() + 10.0
            while not os.path.exists(os.environ[RELEASE_ENV]) and monotonic() < deadline:
                real_sleep(0.005)

    start_thread(hold, ())
    deadline = monotonic() + 10.0
    while not held and monotonic() < deadline:
        real_sleep(0.001)  # a real thread starting up: nothing to wait on but its flag
    return b"held"


def start_a_thread(message: bytes, conn) -> bytes:
    """On ``thread``: start a real thread that takes signals (as gevent's thread pool
    does for a handler's DNS lookup) and idles until $NO_HANG_RELEASE exists (at most
    10 s); the reply is its kernel thread id. Anything else is echoed."""
    if message != b"thread":
        return message
    from gevent.monkey import get_original

    start_thread = get_original("_thread", "start_new_thread")
    native_id = get_original("threading", "get_native_id")
    real_sleep = get_original("time", "sleep")
    monotonic = get_original("time", "monotonic")
    ids: list[int] = []

    def idle() -> None:
        ids.append(native_id())
        deadline = monotonic() + 10.0
        while not os.path.exists(os.environ[RELEASE_ENV]) and monotonic() < deadline:
            real_sleep(0.005)

    start_thread(idle, ())
    deadline = monotonic() + 10.0
    while not ids and monotonic() < deadline:
        real_sleep(0.001)  # a real thread starting up: nothing to wait on but its flag
    return b"%d" % ids[0]
