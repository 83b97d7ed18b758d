"""``threadpool``: the loop holds every connection; handler calls go to threads.

Safe for any handler, and the engine ``pool=`` offloads from: a handler may block
(a database call, a file, ``time.sleep``) without stalling other
connections, yet an idle connection costs no thread — 5,000 idle clients
cost ``workers`` threads, not 5,000. Per-connection order is kept by the
connection itself (at most one call in flight each).

Calls and results travel in batches, because what costs here is not the
handler but waking a thread, and each woken thread then fighting the loop
for the GIL. The loop collects the calls of one iteration and hands them
over together at its end, waking one worker at most; results come back on
one queue, and only the first result after a drain asks the loop to drain
again. A worker that takes a call while more are queued wakes one helper
(one at a time): if its handler blocks, the helper takes the next call, and
so on, so blocking handlers still spread over every thread; if handlers are
quick, the helper usually finds the queue empty — the GIL keeps it waiting
until the first worker lets go (its calls done, or blocked) — and sleeps
again. Measured on a 50-connection echo: about 20 calls per hand-over, 1.7
worker wake-ups per hand-over and 25 results per drain, where the engine
used to wake a worker and the loop once per call.

``pool=`` offloads each message's ``on_message`` to any muxpool pool — a
``ProcessPool`` for CPU-bound handlers, a ``DaskPool`` to use a cluster —
while connects, disconnects and the sockets stay here. The handler then runs
on a copy in another process: it must be picklable, it sees a
:class:`RemotePeer` as ``conn`` (``peer`` only: it returns its reply), and
per-connection state on the handler object does not come back.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from ..calls import call_handler, handler_thread
from ..errors import ConnectionClosed
from ..pools.base import PoolStats
from .base import Engine

log = logging.getLogger("muxpool.server")

DEFAULT_WORKERS = 32
IDLE_TIMEOUT = 10.0  # seconds: an idle handler thread exits, so a burst's threads do not stay


class ThreadPoolEngine(Engine):
    name = "threadpool"
    per_connection = False
    can_block = True

    def __init__(self, config, pool=None):
        super().__init__(config)
        self.threads = config.workers or DEFAULT_WORKERS
        self._offload = pool  # not ours: the caller closes it
        self._mux = None
        self._in_flight = 0
        self._handlers: HandlerThreads | None = None
        self._batch: list[tuple] = []  # this iteration's calls (loop thread only)
        self._submitted = 0  # handler calls, and how they ended: [failed, completed] (loop thread)
        self._settled = [0, 0]
        self._flush_pending = False  # a flush of _batch is queued on the loop

    def start(self, mux) -> None:
        self._mux = mux
        self._handlers = HandlerThreads(self.threads, self._deliver_later, IDLE_TIMEOUT)

    def stop(self, wait: bool = True) -> None:
        if self._handlers is not None:
            self._flush()  # calls accepted before the stop still run, as before it
            self._handlers.close()
            if wait:
                self._handlers.join(self.config.drain_timeout)

    def run(self, conn, fn, arg, done) -> None:
        self._in_flight += 1
        self._submitted += 1
        if self._offload is not None and fn is conn.session.on_message:
            self._run_offloaded(conn, fn, arg, done)
            return
        self._batch.append((fn, conn, arg, done))
        if not self._flush_pending:
            self._flush_pending = True
            self._mux.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        if self._batch:
            batch, self._batch = self._batch, []
            self._handlers.submit(batch)

    def later(self, fn) -> None:
        """``fn()`` on the loop, in its place among the results (Connection.send and
        close from a handler thread): a reply reported after it goes after it.
        Through ``mux.defer`` instead, a drain of the results already queued
        there would run first, and the reply overtake what the handler sent."""
        self._handlers.report_call(fn)

    def _deliver_later(self) -> None:
        """From a worker: results are waiting and no drain is queued."""
        self._mux.defer(self._deliver)

    def _deliver(self) -> None:
        """Every result in hand, in one loop callback; then the calls those results
        started (each connection's next message) leave in one batch."""
        results = self._handlers.take_results()
        take, settled = results.popleft, self._settled
        self._flush_pending = True  # the flush below takes them
        try:
            for _ in range(len(results)):  # only those in hand now: see take_results
                done, ok, value, elapsed = take()
                if done is None:  # a handler's send or close (later), in its place
                    try:
                        value()
                    except Exception:
                        log.exception("deferred call %r failed", value)
                    continue
                self._in_flight -= 1
                settled[ok] += 1
                try:
                    done(ok, value, elapsed)
                except Exception:  # one connection's failure must not strand the others' results
                    log.exception("handling a handler's result failed")
        finally:
            self._flush()

    def _run_offloaded(self, conn, fn, message, done) -> None:
        started = time.perf_counter()
        mux = self._mux

        def settled(future) -> None:  # on the pool's thread: hop back to the loop
            error = future.exception()
            ok, value = (True, future.result()) if error is None else (False, error)
            elapsed = time.perf_counter() - started
            mux.defer(lambda: self._done(done, ok, value, elapsed))

        self._offload.submit(call_offloaded, fn, message, conn.peer).add_done_callback(settled)

    def _done(self, done, ok, value, elapsed) -> None:
        self._in_flight -= 1
        done(ok, value, elapsed)

    def spawn(self, fn, name: str) -> None:
        """Run a whole connection (a socketserver handler) on one handler thread."""
        self._handlers.submit([(fn, None, None, None)])

    def idle(self) -> bool:
        return self._in_flight == 0

    def queue_depth(self) -> int:
        return len(self._batch) + (self._handlers.queued() if self._handlers is not None else 0)

    def pools(self) -> list:
        """Its handler threads, seen as a pool (``muxpool_pool_*{pool="muxpool-handler"}``),
        and the pool it offloads messages to, if any."""
        found = [HandlerPoolView(self)] if self._handlers is not None else []
        return found + ([self._offload] if self._offload is not None else [])

    def pool_stats(self) -> PoolStats:
        handlers = self._handlers
        workers, waiting = handlers.counts()
        failed, completed = self._settled
        return PoolStats(workers=workers, idle=waiting, busy=workers - waiting,
                         queued=self.queue_depth(), completed=completed, failed=failed, cancelled=0,
                         submitted=self._submitted)

    def describe(self) -> str:
        where = f", messages offloaded to {self._offload!r}" if self._offload is not None else ""
        return f"{self.threads} handler threads{where}"


class HandlerThreads:
    """Up to ``limit`` threads taking ``(fn, conn, arg, done)`` calls from one queue.

    No future per call: a result is ``(done, ok, value, elapsed)`` on a results
    queue, and ``results_waiting()`` is called only when that queue may have
    been drained (see :meth:`_report`). A call whose ``done`` is None is a whole
    connection: ``fn()``, nothing reported.

    Every decision about who takes queued calls is made under ``_lock`` and
    looks at the queue: a worker only waits when the queue is empty, and a
    submission wakes (or starts) a worker unless one is already on its way —
    so queued calls always have a worker coming, or every worker is busy and
    will look again when its call returns.
    """

    def __init__(self, limit: int, results_waiting, idle_timeout: float | None = None) -> None:
        self.limit = limit
        self.idle_timeout = idle_timeout
        self._results_waiting = results_waiting
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._calls: collections.deque[tuple] = collections.deque()
        self._results: collections.deque[tuple] = collections.deque()
        self._report_pending = False  # results_waiting() was called and no drain began since
        self._threads: list[threading.Thread] = []  # alive: a thread removes itself as it exits
        self._waiting = 0  # workers blocked in wait()
        self._waking = False  # a worker has been woken or started and has not taken a call yet
        self._closed = False
        # How the batching does, for tests and profiles: threads woken or started,
        # threads started, and drains of the results on the loop.
        self.wakeups = self.started = self.deliveries = 0

    def submit(self, calls: list[tuple]) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the handler threads are stopped")
            self._calls.extend(calls)
            if not self._waking:
                self._wake_one_locked()

    def _wake_one_locked(self) -> None:
        if self._waiting:
            self._waking = True
            self.wakeups += 1
            self._wakeup.notify()
        elif len(self._threads) < self.limit:
            self.started += 1
            thread = threading.Thread(target=self._work, name=f"muxpool-handler-{self.started}",
                                      daemon=True)  # an abandoned handler must not hold the process
            try:
                thread.start()
            except RuntimeError:  # out of threads: the workers there are take the calls in turn
                log.exception("could not start a handler thread (%d running)", len(self._threads))
                return
            self._waking = True
            self.wakeups += 1
            self._threads.append(thread)
        # else every worker is busy: each looks at the queue when its call returns

    def queued(self) -> int:
        return len(self._calls)

    def counts(self) -> tuple[int, int]:
        """Threads alive, and how many of them wait for a call."""
        with self._lock:
            return len(self._threads), self._waiting

    def take_results(self) -> collections.deque:
        """The results queue, for the loop to take the results in hand from
        (``popleft``, ``len()`` times as it is now). Only as many as there are
        when the drain begins, so workers that keep adding cannot starve the
        sockets: a result added after the flag is cleared asks for another drain
        itself."""
        self._report_pending = False  # before reading the queue: see _report
        self.deliveries += 1
        return self._results

    def report_call(self, fn) -> None:
        """``fn`` for the loop to run when it takes the results, after those reported
        before it (from any thread)."""
        self._report((None, True, fn, 0.0))

    def _report(self, result: tuple) -> None:
        self._results.append(result)
        # Append first, then look at the flag (the order Multiplexer.defer uses):
        # a set flag means a drain is still to clear it and then read the queue.
        if not self._report_pending:
            self._report_pending = True
            self._results_waiting()

    def _work(self) -> None:
        handler_thread.active = True  # shutdown() from a handler must not wait for itself
        lock, calls, report = self._lock, self._calls, self._report
        take = calls.popleft
        with lock:
            self._waking = False  # started by _wake_one_locked: here now
        while True:
            # A queued call is taken without the lock (popleft is atomic): a batch
            # of quick calls then costs one lock round per wait, not per call.
            # Only waiting, and waking a helper, look at the queue under it.
            try:
                fn, conn, arg, done = take()
            except IndexError:
                if not self._wait_for_calls():
                    return
                continue
            if calls and not self._waking:
                with lock:
                    if calls and not self._waking:
                        self._wake_one_locked()  # a helper, in case this call blocks
            if done is None:
                try:
                    fn()
                except Exception:
                    log.exception("a connection's thread failed")
                continue
            report((done, *call_handler(fn, conn, arg)))
            del fn, conn, arg, done

    def _wait_for_calls(self) -> bool:
        """The queue looked empty: wait for a call. False: this worker exits
        (stopped, or idle for idle_timeout)."""
        calls = self._calls
        with self._lock:
            while not calls:
                if self._closed:
                    self._wakeup.notify()  # pass the stop on
                    self._threads.remove(threading.current_thread())
                    return False
                self._waiting += 1
                notified = self._wakeup.wait(self.idle_timeout)
                self._waiting -= 1
                # Cleared even on a timeout: a notify can land on a waiter whose wait
                # has just timed out, and is then lost; an extra wake-up costs less
                # than a flag that says a worker is coming when none is.
                self._waking = False
                if not notified and not calls and not self._closed:  # (closed: pass the stop on)
                    self._threads.remove(threading.current_thread())  # idle too long
                    return False
        return True

    def close(self) -> None:
        """Queued calls still run; then the workers exit."""
        with self._lock:
            self._closed = True
            self._wakeup.notify()

    def join(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        return not any(thread.is_alive() for thread in threads)


class HandlerPoolView:
    """The engine's handler threads as the pool metrics see one: a name, a bound, stats()."""

    name = "muxpool-handler"

    def __init__(self, engine: ThreadPoolEngine):
        self._engine = engine
        self.max_workers = engine.threads

    def stats(self) -> PoolStats:
        return self._engine.pool_stats()


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
