"""Engines decide only where a handler call runs.

Each engine is a small module found through :data:`ENGINES` and imported on
first use, so ``import muxpool`` never pulls in an optional dependency. An
engine class takes the :class:`~muxpool.config.ServerConfig` and provides:

* ``can_block`` — may a handler block? (``loop``: no; it refuses
  socketserver handlers with a clear message);
* ``per_connection`` — does each connection get its own thread or greenlet
  (``threaded``, ``gevent``), or do messages go through the loop?
* ``start(server)`` / ``stop()`` — set up and tear down (pools, processes);
* ``run(conn, fn, arg)`` — message engines: run ``fn(conn, arg)`` somewhere,
  then call ``server.handler_done(conn, ok, value, elapsed)`` on the loop thread;
* ``spawn(fn, name)`` and ``make_lock()`` — engines that can block: run a
  whole connection (``fn``) on its own thread, greenlet or pool thread;
* ``idle()`` — no call in flight; ``queue_depth()``; ``describe()`` for logs.

Calls for one connection never overlap: the connection queues the next one
until the engine reports the previous one done.
"""

from __future__ import annotations

import importlib

ENGINES = {
    "loop": "muxpool.engines.loop:LoopEngine",
    "threadpool": "muxpool.engines.threadpool:ThreadPoolEngine",
    "threaded": "muxpool.engines.threaded:ThreadedEngine",
    "gevent": "muxpool.engines.gevent:GeventEngine",
    "auto": "muxpool.engines.auto:AutoEngine",
    # Not an engine of a Server but a server of its own, made by Server(engine="prefork"):
    # a supervisor whose worker processes each run a Server with worker_engine.
    "prefork": "muxpool.prefork:PreforkServer",
}
SUPERVISING_ENGINES = frozenset({"prefork"})

DEFAULT_ENGINE = "threadpool"


def load_engine(name: str):
    """The engine class called ``name``; ``ValueError`` names the choices."""
    try:
        target = ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINES)}") from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def patch_for_gevent() -> None:
    """Monkey-patch the standard library for the gevent engine, with a clear
    error when gevent is missing."""
    try:
        from gevent import monkey
    except ImportError as exc:
        from ..errors import MissingDependency

        raise MissingDependency("the gevent engine", "gevent") from exc
    monkey.patch_all()
