"""muxpool: concurrent network services and worker pools.

One pool API over threads, processes and greenlets; one server handler under
any concurrency engine. This module declares the public surface once; it
never imports gevent, dask or prometheus_client (``GeventPool`` loads gevent
on first use, ``PoolCollector`` prometheus_client when one is made).
"""

from .errors import (
    AppError,
    ConfigError,
    HandlerError,
    ConnectionBroken,
    ConnectionClosed,
    HandlerTimeout,
    LocalProtocolError,
    MessageTooLarge,
    MissingDependency,
    MuxpoolError,
    PoolBroken,
    PoolClosed,
    PoolError,
    ProtocolError,
    QueueFull,
    RemoteError,
    RemoteProtocolError,
    RemoteTraceback,
    SerializationError,
    TaskTimeout,
    WorkerCrashed,
)
from .client import Client
from .framing import FRAMERS, LengthFramer, LineFramer, RawFramer, make_framer
from .handlers import EchoService
from .metrics import PoolCollector
from .pools import AsyncFuture, AsyncResult, Pool, PoolStats, ProcessPool, ThreadPool, WorkerPool
from .config import ServerConfig
from .conn import Conn
from .server import Server
from .serving import serve
from .prefork import PreforkServer

__version__ = "0.1.0"

__all__ = [
    "AppError",
    "ConfigError",
    "HandlerError",
    "AsyncFuture",
    "AsyncResult",
    "Client",
    "Conn",
    "EchoService",
    "FRAMERS",
    "LengthFramer",
    "LineFramer",
    "RawFramer",
    "Server",
    "ServerConfig",
    "make_framer",
    "serve",
    "ConnectionBroken",
    "ConnectionClosed",
    "DaskPool",
    "GeventPool",
    "HandlerTimeout",
    "LocalProtocolError",
    "MessageTooLarge",
    "MissingDependency",
    "MuxpoolError",
    "Pool",
    "PreforkServer",
    "PoolBroken",
    "PoolClosed",
    "PoolCollector",
    "PoolError",
    "PoolStats",
    "ProcessPool",
    "ProtocolError",
    "QueueFull",
    "RemoteError",
    "RemoteProtocolError",
    "RemoteTraceback",
    "SerializationError",
    "TaskTimeout",
    "ThreadPool",
    "WorkerPool",
    "WorkerCrashed",
]


def __getattr__(name: str):
    # GeventPool and DaskPool load their optional dependency on first use.
    if name in ("GeventPool", "DaskPool"):
        from . import pools

        return getattr(pools, name)
    raise AttributeError(f"module 'muxpool' has no attribute {name!r}")
