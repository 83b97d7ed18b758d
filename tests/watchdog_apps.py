"""A handler that blocks whatever runs it, for ``tests/test_loop_watchdog.py``.

Given ``block``, ``spin_until_released`` busy-waits (no sleep, no I/O that gevent could turn
into a switch) until the file named by ``WATCHDOG_RELEASE`` exists, so it
blocks a loop thread or the gevent hub for exactly as long as the test wants.
It first creates ``WATCHDOG_RELEASE + ".started"``, so the test knows it runs.
"""

from __future__ import annotations

import os
import time

SPIN_CAP = 30.0  # seconds: a test that dies never leaves a server spinning for ever


def spin_until_released(message: bytes, conn) -> bytes:
    """``block`` spins until released; anything else is echoed at once."""
    if message != b"block":
        return b"response: " + bytes(message)
    release = os.environ["WATCHDOG_RELEASE"]
    with open(release + ".started", "w"):
        pass
    give_up = time.monotonic() + SPIN_CAP
    while not os.path.exists(release) and time.monotonic() < give_up:
        pass
    return b"released: " + bytes(message)
