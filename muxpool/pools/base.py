"""One pool interface over threads, processes, greenlets (and later Dask).

A backend implements three primitives — ``_schedule`` (queue one call),
``_shutdown(cancel)`` and ``_join`` — plus ``stats``. Everything users touch
(the lesson's ``run(func, args, callback)``, ``submit``, ``schedule``, ``map``,
``imap_unordered``, ``multiprocessing.Pool``'s ``apply``/``apply_async``,
``close``/``terminate``/``join`` and the context manager) lives here once, so a
new backend gets the whole API and the whole conformance suite for free.

Results travel as ``(ok, value)`` pairs and land in a real
``concurrent.futures.Future`` or in a ``callback(success, result)``; a task
has exactly one of those sinks, so the callback path allocates no Future.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from ..errors import PoolBroken, PoolClosed

log = logging.getLogger("muxpool.pools")

Callback = Callable[[bool, Any], Any]


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool. ``completed`` counts successes, ``failed`` tasks
    that raised (crashes and timeouts included), ``cancelled`` tasks dropped
    before they ran; once the pool is idle, ``submitted`` is their sum."""

    workers: int
    idle: int
    busy: int
    queued: int
    completed: int
    failed: int
    cancelled: int
    #: tasks failed with ``TaskTimeout`` (also counted in ``failed``): their worker
    #: process was killed, their greenlet interrupted, or, on threads and Dask, the
    #: call ran on in the background with its result discarded
    timed_out: int = 0
    #: tasks accepted (a submission that raised, ``QueueFull`` or ``PoolClosed``, is not)
    submitted: int = 0
    #: workers replaced on purpose (ProcessPool's ``max_tasks_per_worker`` and
    #: ``max_worker_memory``); always 0 where workers are not recycled
    recycled: int = 0
    #: worker processes that died unasked (not killed for a timeout or ``terminate()``)
    crashed: int = 0


class AsyncFuture(Future):
    """A ``Future`` that also answers ``multiprocessing.pool.AsyncResult``'s
    questions. As there, ``apply_async``'s ``callback``/``error_callback`` run
    before the result is set, so they have run when ``get()`` returns."""

    apply_callbacks: tuple | None = None  # (callback, error_callback), set per instance

    def set_result(self, result: Any) -> None:
        self._run_apply_callback(0, result)
        super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        self._run_apply_callback(1, exception)
        super().set_exception(exception)

    def _run_apply_callback(self, which: int, value: Any) -> None:
        callbacks, self.apply_callbacks = self.apply_callbacks, None
        if callbacks is None or callbacks[which] is None or self.cancelled():
            return
        try:
            callbacks[which](value)
        except BaseException:  # noqa: BLE001 - never into the pool's thread
            log.exception("apply_async callback %r raised", callbacks[which])

    def get(self, timeout: float | None = None) -> Any:
        return self.result(timeout)

    def ready(self) -> bool:
        return self.done()

    def successful(self) -> bool:
        if not self.done():
            raise ValueError(f"{self!r} not ready")
        return not self.cancelled() and self.exception() is None

    def wait(self, timeout: float | None = None) -> None:
        try:
            self.exception(timeout)
        except (TimeoutError, CancelledError):
            pass


def call_callback(callback: Callback, ok: bool, value: Any) -> None:
    """Run a user's ``callback(success, result)``; its errors are logged, never lost
    and never allowed to kill the worker that delivers them."""
    try:
        callback(ok, value)
    except BaseException:  # noqa: BLE001 - SystemExit in a callback must not end a worker
        log.exception("pool callback %r raised", callback)


def deliver(fut: Future | None, callback: Callback | None, ok: bool, value: Any) -> None:
    """Hand a task's outcome to its sink."""
    if fut is not None:
        settle_future(fut, ok, value)
    if callback is not None:
        call_callback(callback, ok, value)


def settle_future(fut: Future, ok: bool, value: Any) -> None:
    """Set a future's outcome. Its done-callbacks run here: ``Future`` logs their
    ``Exception``s, but a ``SystemExit`` or other ``BaseException`` would
    escape into the pool's thread, so it is logged here instead."""
    try:
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
    except InvalidStateError:
        pass  # the caller cancelled it meanwhile; nobody waits for the value
    except BaseException:  # noqa: BLE001 - the future is settled; only a callback raised
        log.exception("a done-callback of %r raised", fut)


def broken_error(name: str, cause: BaseException) -> PoolBroken:
    """The one error every pending and later task of a broken pool gets."""
    err = PoolBroken(f"{name} is broken: its machinery failed with {cause!r}")
    err.__cause__ = cause
    return err


def cancel_task(fut: Future | None, callback: Callback | None) -> None:
    """Drop a queued task: its future is cancelled, its callback told so."""
    if fut is not None:
        fut.cancel()
    if callback is not None:
        call_callback(callback, False, CancelledError())


def _map_chunk(func: Callable, chunk: tuple) -> list:
    return list(map(func, chunk))


def _starmap_chunk(func: Callable, chunk: tuple) -> list:
    return list(itertools.starmap(func, chunk))


class WorkerPool:
    """The interface every muxpool pool shares. Subclasses provide
    ``_schedule``, ``_shutdown``, ``_join`` and ``stats``."""

    #: Future class handed out; GeventPool swaps in one that waits cooperatively.
    future_class: type[Future] = Future
    async_future_class: type[AsyncFuture] = AsyncFuture
    #: How many chunks ``map`` keeps in flight per worker.
    map_window_per_worker = 2

    max_workers: int

    # --- primitives ---------------------------------------------------------

    def _schedule(self, func: Callable, args: tuple, kwargs: dict | None,
                  fut: Future | None, callback: Callback | None,
                  timeout: float | None, task_timeout: float | None) -> None:
        raise NotImplementedError

    def _shutdown(self, cancel: bool) -> None:
        raise NotImplementedError

    def _join(self, timeout: float | None) -> bool:
        raise NotImplementedError

    def stats(self) -> PoolStats:
        raise NotImplementedError

    # --- the lesson's API ---------------------------------------------------

    def run(self, func: Callable, args: Iterable = (), callback: Callback | None = None,
            *, timeout: float | None = None, task_timeout: float | None = None) -> None:
        """Queue ``func(*args)``; call ``callback(success, result)`` when it ends.

        ``result`` is the return value, or the exception on failure (a
        ``CancelledError`` if ``terminate()`` dropped the task). Blocks while
        the queue is full; with ``timeout`` raises ``QueueFull`` instead.
        Raises ``PoolClosed`` after ``close()``/``terminate()``.
        """
        self._schedule(func, tuple(args), None, None, callback, timeout, task_timeout)

    def close(self) -> None:
        """Refuse new work; every queued task still runs, then the workers exit."""
        self._shutdown(cancel=False)

    def terminate(self) -> None:
        """Refuse new work and cancel every queued task; returns at once.

        Running thread/greenlet tasks finish, then their workers exit; process
        workers are killed.
        """
        self._shutdown(cancel=True)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every worker has exited; ``True`` if they all did in time."""
        return self._join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
        self.join()

    # --- futures ------------------------------------------------------------

    def submit(self, func: Callable, /, *args, **kwargs) -> Future:
        """``Executor.submit``: every keyword goes to ``func``; blocks while the
        queue is full. Use :meth:`schedule` for a queue or task timeout."""
        fut = self.future_class()
        self._schedule(func, args, kwargs or None, fut, None, None, None)
        return fut

    def schedule(self, func: Callable, args: Iterable = (), kwargs: dict | None = None, *,
                 timeout: float | None = None, task_timeout: float | None = None) -> Future:
        """``submit`` with options: ``timeout`` bounds the wait for queue space
        (``QueueFull``), ``task_timeout`` the run time (``TaskTimeout``, where the
        backend can stop a running task)."""
        fut = self.future_class()
        self._schedule(func, tuple(args), kwargs or None, fut, None, timeout, task_timeout)
        return fut

    # --- multiprocessing.Pool compatibility ------------------------------------

    def apply(self, func: Callable, args: Iterable = (), kwds: dict | None = None) -> Any:
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable, args: Iterable = (), kwds: dict | None = None,
                    callback: Callable[[Any], Any] | None = None,
                    error_callback: Callable[[BaseException], Any] | None = None) -> AsyncFuture:
        fut = self.async_future_class()
        if callback is not None or error_callback is not None:
            fut.apply_callbacks = (callback, error_callback)
        self._schedule(func, tuple(args), kwds or None, fut, None, None, None)
        return fut

    # --- map ---------------------------------------------------------------------

    def _window(self) -> int:
        return max(2, self.max_workers * self.map_window_per_worker)

    def _chunks(self, func: Callable, iterables: tuple, chunksize: int) -> Iterator[tuple]:
        """Yield ``(callable, args)`` pairs, one per task, lazily."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        single = len(iterables) == 1
        items = iter(iterables[0]) if single else zip(*iterables)
        if chunksize == 1:
            if single:
                for item in items:
                    yield func, (item,)
            else:
                yield from ((func, args) for args in items)
            return
        # A chunk is a plain tuple of items: cheapest to build and to pickle.
        run_chunk = _map_chunk if single else _starmap_chunk
        while chunk := tuple(itertools.islice(items, chunksize)):
            yield run_chunk, (func, chunk)

    def map(self, func: Callable, *iterables: Iterable, chunksize: int = 1) -> Iterator:
        """Lazy, ordered ``map``: at most a small window of tasks is in flight,
        so an endless iterable works. A task's exception is raised when the
        iteration reaches it."""
        results = self._ordered(self._chunks(func, iterables, chunksize))
        # Chunks come back as lists; chain flattens them in C, not per item in Python.
        return itertools.chain.from_iterable(results) if chunksize > 1 else results

    def _ordered(self, tasks: Iterator[tuple]) -> Iterator:
        in_flight: collections.deque[Future] = collections.deque()
        window = self._window()
        try:
            for fn, args in tasks:
                fut = self.future_class()
                self._schedule(fn, args, None, fut, None, None, None)
                in_flight.append(fut)
                while len(in_flight) >= window or (in_flight and in_flight[0].done()):
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        finally:
            for fut in in_flight:  # the consumer stopped early or a task failed
                fut.cancel()

    def imap_unordered(self, func: Callable, *iterables: Iterable, chunksize: int = 1) -> Iterator:
        """Like :meth:`map`, in completion order."""
        chunked = chunksize > 1
        tasks = self._chunks(func, iterables, chunksize)
        finished: collections.deque[tuple[bool, Any]] = collections.deque()
        signal = self._completion_signal()
        window = self._window()
        in_flight = 0

        def on_done(ok: bool, value: Any) -> None:
            finished.append((ok, value))
            signal.set()

        exhausted = False
        while True:
            while not exhausted and in_flight < window:
                try:
                    fn, args = next(tasks)
                except StopIteration:
                    exhausted = True
                    break
                self._schedule(fn, args, None, None, on_done, None, None)
                in_flight += 1
            if in_flight == 0:
                return
            while not finished:
                signal.wait()
                signal.clear()
            ok, value = finished.popleft()
            in_flight -= 1
            if not ok:
                raise value
            if chunked:
                yield from value
            else:
                yield value

    def _completion_signal(self):
        """An Event-like object the completion callbacks set (overridden for gevent)."""
        return threading.Event()


def closed_error(name: str) -> PoolClosed:
    return PoolClosed(f"{name} is closed: it accepts no new work")
