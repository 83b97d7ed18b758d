"""Pools: one interface over threads, processes and greenlets.

``GeventPool`` is imported on first use, so ``import muxpool.pools`` never
imports gevent.
"""

from .base import AsyncFuture, Pool, PoolStats
from .process import ProcessPool
from .thread import ThreadPool

__all__ = ["AsyncFuture", "GeventPool", "Pool", "PoolStats", "ProcessPool", "ThreadPool"]


def __getattr__(name: str):
    if name == "GeventPool":
        from .gevent import GeventPool
        return GeventPool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
