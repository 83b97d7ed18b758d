"""Task functions for benchmarks/pools.py.

They live in their own module, at module level, so worker processes started
with the ``forkserver`` (or ``spawn``) method can import them by name. Every
task takes exactly one argument, which keeps the benchmark drivers uniform.
"""

from __future__ import annotations

import time


def noop(i: int) -> int:
    """The cheapest possible task: measures pure pool overhead."""
    return i


def pause(seconds: float) -> None:
    """An I/O-bound stand-in: blocks without holding the GIL."""
    time.sleep(seconds)


def spin(iterations: int) -> int:
    """A CPU-bound, pure-Python loop (holds the GIL the whole time)."""
    total = 0
    for i in range(iterations):
        total += i ^ (i >> 3)
    return total
