"""``threadpool``: the loop holds every connection; handler calls go to a pool.

The default engine, because it is safe for any handler: a handler may block
(a database call, a file, ``time.sleep``) without stalling other
connections, yet an idle connection costs no thread — 5,000 idle clients
cost ``workers`` threads, not 5,000. Results come back to the loop through
``defer()``; per-connection order is kept by the connection itself.

``pool=`` offloads each message's ``on_message`` to any muxpool pool — a
``ProcessPool`` for CPU-bound handlers, a ``DaskPool`` to use a cluster —
while connects, disconnects and the sockets stay here. The handler then runs
on a copy in another process: it must be picklable, it sees a
:class:`RemotePeer` as ``conn`` (``peer`` only: it returns its reply), and
per-connection state on the handler object does not come back.
"""

from __future__ import annotations

import time

from ..calls import call_handler, handler_thread
from ..errors import ConnectionClosed
from ..pools import ThreadPool
from .base import Engine

DEFAULT_WORKERS = 32


class ThreadPoolEngine(Engine):
    name = "threadpool"
    per_connection = False
    can_block = True

    def __init__(self, config, pool=None):
        super().__init__(config)
        self.threads = config.workers or DEFAULT_WORKERS
        self._pool = None
        self._offload = pool  # not ours: the caller closes it
        self._mux = None
        self._in_flight = 0

    def start(self, mux) -> None:
        self._mux = mux
        # Unbounded queue on purpose: the loop must never block on it, and
        # each connection has at most one call queued (see Connection).
        self._pool = ThreadPool(self.threads, name="muxpool-handler")

    def stop(self, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.close()
            if wait:
                self._pool.join(self.config.drain_timeout)

    def run(self, conn, fn, arg, done) -> None:
        self._in_flight += 1
        if self._offload is not None and fn is conn.session.on_message:
            self._run_offloaded(conn, fn, arg, done)
        else:
            self._pool.run(self._call, (fn, conn, arg, done))

    def _run_offloaded(self, conn, fn, message, done) -> None:
        started = time.perf_counter()
        mux = self._mux

        def settled(future) -> None:  # on the pool's thread: hop back to the loop
            error = future.exception()
            ok, value = (True, future.result()) if error is None else (False, error)
            elapsed = time.perf_counter() - started
            mux.defer(lambda: self._done(done, ok, value, elapsed))

        self._offload.submit(call_offloaded, fn, message, conn.peer).add_done_callback(settled)

    def _call(self, fn, conn, arg, done) -> None:
        handler_thread.active = True
        try:
            ok, value, elapsed = call_handler(fn, conn, arg)
        finally:
            handler_thread.active = False
        self._mux.defer(lambda: self._done(done, ok, value, elapsed))

    def _done(self, done, ok, value, elapsed) -> None:
        self._in_flight -= 1
        done(ok, value, elapsed)

    def spawn(self, fn, name: str) -> None:
        """Run a whole connection (a socketserver handler) on one pool thread."""
        self._pool.run(fn)

    def idle(self) -> bool:
        return self._in_flight == 0

    def queue_depth(self) -> int:
        return self._pool.stats().queued if self._pool is not None else 0

    def describe(self) -> str:
        where = f", messages offloaded to {self._offload!r}" if self._offload is not None else ""
        return f"{self.threads} handler threads{where}"


class RemotePeer:
    """What an offloaded handler sees as ``conn``: where the message came from."""

    __slots__ = ("peer",)

    def __init__(self, peer):
        self.peer = peer

    def send(self, message: bytes) -> None:
        raise ConnectionClosed("an offloaded handler runs in another process: return the reply")

    close = send


def call_offloaded(on_message, message: bytes, peer):
    """Runs in the offload pool's worker: the handler, with a stand-in connection."""
    return on_message(RemotePeer(peer), message)
