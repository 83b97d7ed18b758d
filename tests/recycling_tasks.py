"""Tasks for the recycling and metrics tests, run in ProcessPool workers: module-level,
so forkserver workers can import them, and light (no pytest) since every recycled
worker imports this module afresh."""

from __future__ import annotations

import os

MIB = 1 << 20

#: What a leaking task keeps alive for the rest of the worker's life.
held: list[bytes] = []


def rss() -> int:
    """This process's resident set size, in bytes (read as the pool does)."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def pid_and_rss(_ignored=None) -> tuple[int, int]:
    return os.getpid(), rss()


def hold(mib: int) -> tuple[int, int]:
    """Leak ``mib`` MiB (every page written, so resident), and report pid and RSS."""
    held.append(b"\x01" * (mib * MIB))
    return os.getpid(), rss()


def spike(mib: int) -> tuple[int, int]:
    """Use ``mib`` MiB for a moment and give it back (one mmap'd block, unmapped when freed)."""
    block = b"\x01" * (mib * MIB)
    del block
    return os.getpid(), rss()


def fail_if(x: int, bad: bool) -> int:
    if bad:
        raise ValueError(f"task {x} fails on purpose")
    return x
