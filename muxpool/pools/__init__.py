"""Pools: one interface over threads, processes, greenlets and Dask, and
``Pool``, a ``multiprocessing.Pool`` drop-in on top of ``ProcessPool``.

``GeventPool`` and ``DaskPool`` are imported on first use, so ``import
muxpool.pools`` never imports gevent or dask.
"""

from .base import AsyncFuture, PoolStats, WorkerPool
from .mp_pool import AsyncResult, Pool
from .process import ProcessPool
from .thread import ThreadPool

__all__ = ["AsyncFuture", "AsyncResult", "DaskPool", "GeventPool", "Pool", "PoolStats", "ProcessPool",
           "ThreadPool", "WorkerPool"]


def __getattr__(name: str):
    if name == "GeventPool":
        from .gevent import GeventPool
        return GeventPool
    if name == "DaskPool":
        from .dask import DaskPool
        return DaskPool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
