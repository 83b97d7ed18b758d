"""Workers pulling calls from one queue: the engine under ThreadPool and GeventPool.

The lesson's pool could strand a task: a worker decided to exit while a task
was being queued. Here every decision that changes who will take the queued
work — queue a task, start a worker, go idle, retire an idle worker — happens
under one lock and looks at the queue length, so a queued task always has a
worker that will take it. Workers start lazily: one starts when queued tasks
outnumber the idle workers (checked when a task is queued and again whenever
a worker leaves the idle state), up to ``max_workers``.

A worker takes tasks without the lock while the queue has any; idle workers
are counted in a list whose ``append``/``pop`` are atomic, so going idle and
coming back take no lock either. The lock is only taken to retire an idle
worker, where it guards against the lesson's race. Stop is one sentinel that each worker
passes on before it exits, so it always queues behind the accepted work.

What differs between threads and greenlets (the queue, the semaphore, how a
worker starts) comes from a small ``Runtime``.

``task_timeout``: a thread cannot be stopped, so at the deadline the task's
future fails with ``TaskTimeout`` (from :mod:`._deadlines`' thread), the
thread is *abandoned* — it leaves the worker count, so a replacement can start,
finishes the call in the background, discards its result and exits.
GeventPool interrupts the greenlet instead (see :mod:`.gevent`).

A failure in the workers' own bookkeeping (not in a task or a callback, which
are caught) breaks the pool: the task in hand and every queued one fail with
``PoolBroken``, later submissions raise it, and ``join()`` returns.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import PoolError, QueueFull, TaskTimeout
from ._deadlines import Deadlines
from .base import (PoolStats, WorkerPool, broken_error, call_callback, cancel_task, closed_error, deliver,
                   settle_future)

log = logging.getLogger("muxpool.pools")

_STOP = object()


@dataclass(frozen=True)
class Runtime:
    """How workers are made: threads, or greenlets."""

    make_queue: Callable[[], Any]        # put / get(timeout=) / get_nowait / qsize
    make_semaphore: Callable[[int], Any]  # acquire(timeout=) / release
    make_event: Callable[[], Any]
    start_worker: Callable[[Callable[[], None], str], Any]  # returns a handle with join(timeout)
    empty: type[Exception] = queue.Empty


def _start_thread(target: Callable[[], None], name: str) -> threading.Thread:
    # Daemon: an unclosed pool must not keep the interpreter alive for
    # idle_timeout seconds; close()/join() or the context manager finish work.
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


THREADS = Runtime(
    make_queue=queue.SimpleQueue,
    make_semaphore=threading.Semaphore,
    make_event=threading.Event,
    start_worker=_start_thread,
)


class _Tally:
    """A worker's own counters: written by that worker only, summed by stats()."""

    __slots__ = ("completed", "failed", "cancelled", "current", "abandoned")

    def __init__(self) -> None:
        self.completed = self.failed = self.cancelled = 0
        self.current = None  # the queue item in hand, while its outcome is not delivered
        self.abandoned = False  # its task timed out: it leaves the pool when the call returns


class QueuePool(WorkerPool):
    """A pool of up to ``max_workers`` workers sharing one FIFO queue."""

    runtime: Runtime = THREADS
    kind = "QueuePool"

    def __init__(self, max_workers: int, max_queue: int | None = None, *,
                 idle_timeout: float | None = 10.0, task_timeout: float | None = None,
                 name: str | None = None):
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        if max_queue is not None and max_queue < 1:
            raise ValueError("max_queue must be >= 1 or None")
        self.max_workers = max_workers
        self.max_queue = max_queue
        self.idle_timeout = idle_timeout
        self.task_timeout = task_timeout
        self.name = name or f"{self.kind}-{id(self):x}"
        rt = self.runtime
        self._queue = rt.make_queue()
        self._slots = rt.make_semaphore(max_queue) if max_queue else None
        self._lock = threading.Lock()  # never held across a blocking call, so fine for greenlets
        self._workers: dict[Any, _Tally] = {}
        self._handles: list[Any] = []
        self._idle: list[int] = []  # one entry per worker blocked waiting for a task
        self._serial = 0
        self._closed = False
        self._retired = _Tally()  # counters of workers that have exited
        self._timed_out = 0
        self._submitted = 0
        self._broken: BaseException | None = None
        self._deadlines: Deadlines | None = None

    # --- submitting ------------------------------------------------------------

    def _schedule(self, func, args, kwargs, fut, callback, timeout, task_timeout) -> None:
        slots = self._slots
        if slots is not None and not slots.acquire(timeout=timeout):
            raise QueueFull(self.max_queue, timeout)
        with self._lock:
            if self._closed:
                if slots is not None:
                    slots.release()
                raise broken_error(self.name, self._broken) if self._broken else closed_error(self.name)
            limit = self.task_timeout if task_timeout is None else task_timeout
            self._queue.put((func, args, kwargs, fut, callback, limit))
            self._submitted += 1
            if len(self._idle) < self._queue.qsize() and len(self._workers) < self.max_workers:
                self._start_worker_locked()

    def _start_worker_locked(self) -> None:
        tally = _Tally()
        self._serial += 1
        handle = self.runtime.start_worker(lambda: self._work(tally), f"{self.name}-{self._serial}")
        self._workers[tally] = handle
        self._handles.append(handle)

    # --- the worker --------------------------------------------------------------

    def _work(self, tally: _Tally) -> None:
        try:
            self._work_loop(tally)
        except BaseException as exc:  # noqa: BLE001 - tasks and callbacks are caught inside
            self._break(tally, exc)

    def _work_loop(self, tally: _Tally) -> None:
        get_nowait = self._queue.get_nowait
        empty = self.runtime.empty
        slots = self._slots
        while True:
            try:
                item = get_nowait()
            except empty:
                item = self._wait_idle(tally)
            if item is _STOP:
                self._queue.put(_STOP)  # pass it on to the next worker
                self._retire(tally)
                return
            if item is None:
                return  # idled out and retired
            tally.current = item
            if slots is not None:
                slots.release()
            func, args, kwargs, fut, callback, limit = item
            del item
            if fut is not None and not fut.set_running_or_notify_cancel():
                tally.cancelled += 1
                tally.current = None
                continue
            if limit is not None:
                if not self._run_with_deadline(tally, func, args, kwargs, fut, callback, limit):
                    return  # abandoned: it timed out, and the pool has moved on without it
                continue
            try:
                value = func(*args, **kwargs) if kwargs else func(*args)
            except BaseException as exc:  # noqa: BLE001 - delivered, not swallowed
                tally.failed += 1
                if fut is not None:
                    settle_future(fut, False, exc)
                if callback is not None:
                    call_callback(callback, False, exc)
                del exc
            else:
                tally.completed += 1
                if fut is not None:
                    settle_future(fut, True, value)
                if callback is not None:
                    call_callback(callback, True, value)
                del value
            tally.current = None
            del func, args, kwargs, fut, callback

    # --- task_timeout ----------------------------------------------------------------

    def _run_with_deadline(self, tally, func, args, kwargs, fut, callback, limit) -> bool:
        """Run one task under ``limit``; False if it timed out (this worker is abandoned)."""
        claim = threading.Lock()  # whoever takes it first delivers: the worker or the deadline
        entry = self._deadline_thread().add(
            limit, lambda: self._expire(tally, claim, fut, callback, limit))
        try:
            outcome = True, (func(*args, **kwargs) if kwargs else func(*args))
        except BaseException as exc:  # noqa: BLE001 - delivered, not swallowed
            outcome = False, exc
        if not claim.acquire(False):
            tally.current = None
            return False  # the result is discarded: the caller already has TaskTimeout
        Deadlines.cancel(entry)
        if outcome[0]:
            tally.completed += 1
        else:
            tally.failed += 1
        tally.current = None
        deliver(fut, callback, *outcome)
        return True

    def _deadline_thread(self) -> Deadlines:
        if self._deadlines is None:
            with self._lock:
                if self._deadlines is None:
                    self._deadlines = Deadlines(self.name)
        return self._deadlines

    def _expire(self, tally: _Tally, claim, fut, callback, limit: float) -> None:
        if not claim.acquire(False):
            return  # the task finished first
        with self._lock:
            self._timed_out += 1
            tally.failed += 1
            tally.abandoned = True
            handle = self._workers.get(tally)
            self._retire_locked(tally)  # it no longer counts; join() does not wait for it
            if handle is not None and handle in self._handles:
                self._handles.remove(handle)
            if self._queue.qsize() > len(self._idle) and len(self._workers) < self.max_workers \
                    and not self._closed:
                self._start_worker_locked()
        deliver(fut, callback, False, TaskTimeout(limit))

    # --- a broken pool --------------------------------------------------------------

    def _break(self, tally: _Tally, cause: BaseException) -> None:
        """A worker's bookkeeping failed: fail what it held and everything queued."""
        with self._lock:
            first = self._broken is None
            if first:
                self._broken = cause
            self._closed = True
            failed = [tally.current] if tally.current is not None else []
            tally.current = None
            try:
                failed += self._drain_locked()
            except BaseException:  # noqa: BLE001 - the queue itself may be what broke
                log.debug("%s: draining a broken queue failed", self.name, exc_info=True)
            self._queue.put(_STOP)  # the other workers finish their task and exit
            tally.failed += len(failed)
            self._retire_locked(tally)
        if first:
            log.error("%s: a worker's bookkeeping failed; the pool is broken", self.name,
                      exc_info=cause)
        for _func, _args, _kwargs, fut, callback, _limit in failed:
            deliver(fut, callback, False, broken_error(self.name, cause))

    def _wait_idle(self, tally: _Tally) -> Any:
        """Block for the next task as an idle worker; ``None`` means retired."""
        queue_ = self._queue
        idle = self._idle
        while True:
            idle.append(1)
            try:
                item = queue_.get(timeout=self.idle_timeout)
            except self.runtime.empty:
                with self._lock:
                    idle.pop()
                    if queue_.qsize() == 0:
                        self._retire_locked(tally)
                        return None
                continue
            idle.pop()
            # While this worker was counted idle, a submitter may have relied
            # on it; now that it is busy, start another if the queue needs one.
            if len(idle) < queue_.qsize() and len(self._workers) < self.max_workers:
                with self._lock:
                    if (len(idle) < queue_.qsize() and len(self._workers) < self.max_workers
                            and not self._closed):
                        self._start_worker_locked()
            return item

    def _retire(self, tally: _Tally) -> None:
        with self._lock:
            self._retire_locked(tally)

    def _retire_locked(self, tally: _Tally) -> None:
        self._workers.pop(tally, None)
        retired = self._retired
        retired.completed += tally.completed
        retired.failed += tally.failed
        retired.cancelled += tally.cancelled
        tally.completed = tally.failed = tally.cancelled = 0

    # --- stopping ------------------------------------------------------------------

    def _shutdown(self, cancel: bool) -> None:
        dropped = []
        with self._lock:
            already = self._closed
            self._closed = True
            if cancel:
                dropped = self._drain_locked()
                self._retired.cancelled += len(dropped)
            if cancel or not already:
                self._queue.put(_STOP)
        for _func, _args, _kwargs, fut, callback, _limit in dropped:
            cancel_task(fut, callback)

    def _drain_locked(self) -> list:
        """Empty the queue (the stop sentinel included) and free its slots."""
        dropped = []
        while True:
            try:
                item = self._queue.get_nowait()
            except self.runtime.empty:
                return dropped
            if item is not _STOP:
                dropped.append(item)
                if self._slots is not None:
                    self._slots.release()

    def _join(self, timeout: float | None) -> bool:
        if not self._closed:
            raise PoolError("join() needs close() or terminate() first")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                handles = list(self._handles)
            for handle in handles:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                handle.join(remaining)
            with self._lock:
                if not self._workers:
                    self._handles.clear()
                    return True
                self._handles = [h for h in self._handles if _alive(h)]
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def stats(self) -> PoolStats:
        with self._lock:
            workers = len(self._workers)
            idle = len(self._idle)
            queued = self._queue.qsize()
            if self._closed and queued:
                queued -= 1  # the stop sentinel is not work
            totals = [self._retired, *self._workers]
            completed = sum(t.completed for t in totals)
            failed = sum(t.failed for t in totals)
            cancelled = sum(t.cancelled for t in totals)
        return PoolStats(workers=workers, idle=idle, busy=workers - idle, queued=max(0, queued),
                         completed=completed, failed=failed, cancelled=cancelled,
                         timed_out=self._timed_out, submitted=self._submitted)

    def _completion_signal(self):
        return self.runtime.make_event()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.name!r} {state} max_workers={self.max_workers}>"


def _alive(handle: Any) -> bool:
    alive = getattr(handle, "is_alive", None)
    return alive() if alive is not None else not handle.dead
