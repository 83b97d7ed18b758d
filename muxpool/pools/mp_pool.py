"""``muxpool.Pool``: ``multiprocessing.Pool``'s API on top of :class:`ProcessPool`.

Code written for ``multiprocessing.Pool`` moves over by changing the import,
and gains what ProcessPool adds: a worker that dies fails only its own task
(``WorkerCrashed``) where ``multiprocessing.Pool`` hangs, nothing is left
pending by ``terminate()`` (its results fail with ``CancelledError``), and the
lesson's shared objects work through ``initargs`` (see :mod:`._pickling`).

Kept from the standard library, on purpose: ``map``/``starmap`` return lists
and read the whole iterable first; ``map_async``/``starmap_async``/
``apply_async`` return :class:`AsyncResult` (``get(timeout)`` raises
``multiprocessing.TimeoutError``) and run ``callback``/``error_callback``
*before* ``get()`` returns; ``imap``/``imap_unordered`` feed the pool from a
background thread, so their results keep coming after ``close()``; a pool
that is not running raises ``ValueError``; ``with Pool() as p:`` ends with
``terminate()``, not ``close()``. Different: an argument or result that
cannot be pickled fails its task with ``SerializationError`` (the original
error as ``__cause__``) instead of ``MaybeEncodingError``; a worker's
traceback is muxpool's ``RemoteTraceback`` (``.text``).
"""

from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing
import threading
from typing import Any, Callable, Iterable

from .base import PoolStats, _map_chunk, _starmap_chunk
from .process import ProcessPool

log = logging.getLogger("muxpool.pools")

_RUN, _CLOSE, _TERMINATE = "RUN", "CLOSE", "TERMINATE"


class AsyncResult:
    """``multiprocessing.pool.AsyncResult``: the outcome of ``apply_async``."""

    def __init__(self, callback: Callable | None = None, error_callback: Callable | None = None):
        self._event = threading.Event()
        self._callback = callback
        self._error_callback = error_callback
        self._ok = False
        self._value: Any = None

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._ok

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        if not self._event.wait(timeout):
            raise multiprocessing.TimeoutError
        if self._ok:
            return self._value
        raise self._value

    def _set(self, ok: bool, value: Any) -> None:
        """Record the outcome, run the user's callback, and only then wake ``get()``."""
        self._ok, self._value = ok, value
        callback = self._callback if ok else self._error_callback
        if callback is not None:
            try:
                callback(value)
            except BaseException:  # noqa: BLE001 - must not reach the pool's thread
                log.exception("%s callback %r raised", "" if ok else "error", callback)
        self._callback = self._error_callback = None
        self._event.set()


ApplyResult = AsyncResult


class MapResult(AsyncResult):
    """The outcome of ``map_async``: the list of every chunk's results, in order,
    or the first failure."""

    def __init__(self, chunks: int, callback, error_callback):
        super().__init__(callback, error_callback)
        self._lock = threading.Lock()
        self._parts: list = [None] * chunks
        self._remaining = chunks
        if chunks == 0:
            self._set(True, [])

    def _chunk_done(self, index: int, ok: bool, value: Any) -> None:
        with self._lock:
            if self._remaining <= 0:
                return  # already failed
            if ok:
                self._parts[index] = value
                self._remaining -= 1
                if self._remaining:
                    return
                value = list(itertools.chain.from_iterable(self._parts))
            else:
                self._remaining = 0
            self._parts = []
        self._set(ok, value)


class IMapIterator:
    """What ``imap``/``imap_unordered`` return: results as they are ready, in
    order or in completion order; ``next(timeout)`` raises
    ``multiprocessing.TimeoutError``. An exception raised by the input
    iterable is raised after the results of the items read before it."""

    def __init__(self, ordered: bool):
        self._ordered = ordered
        self._cond = threading.Condition(threading.Lock())
        self._ready: dict[int, tuple[bool, Any]] = {}  # chunk index (or arrival order) -> outcome
        self._arrived = 0
        self._taken = 0
        self._chunks: int | None = None  # known once the feeder is done
        self._input_error: BaseException | None = None
        self._buffer: list = []

    def __iter__(self):
        return self

    def __next__(self):
        return self.next()

    def next(self, timeout: float | None = None) -> Any:
        while not self._buffer:
            ok, chunk = self._next_chunk(timeout)
            if not ok:
                raise chunk
            self._buffer = list(reversed(chunk))
        return self._buffer.pop()

    def _next_chunk(self, timeout: float | None) -> tuple[bool, Any]:
        with self._cond:
            while True:
                key = self._taken
                if key in self._ready:
                    self._taken += 1
                    return self._ready.pop(key)
                if self._chunks is not None and self._taken >= self._chunks:
                    error, self._input_error = self._input_error, None
                    if error is not None:
                        return False, error
                    raise StopIteration
                if not self._cond.wait(timeout):
                    raise multiprocessing.TimeoutError

    def _chunk_done(self, index: int, ok: bool, value: Any) -> None:
        with self._cond:
            key = index if self._ordered else self._arrived
            self._arrived += 1
            self._ready[key] = (ok, value)
            self._cond.notify_all()

    def _fed(self, chunks: int, error: BaseException | None) -> None:
        with self._cond:
            self._chunks, self._input_error = chunks, error
            self._cond.notify_all()


class Pool:
    """``multiprocessing.Pool(processes, initializer, initargs, maxtasksperchild,
    context)`` on a :class:`ProcessPool` (``context`` is its ``mp_context``).
    Beyond the standard library: ``max_worker_memory`` (ProcessPool's) and
    ``stats()``."""

    def __init__(self, processes: int | None = None, initializer: Callable | None = None,
                 initargs: Iterable = (), maxtasksperchild: int | None = None, context=None, *,
                 max_worker_memory: int | str | None = None):
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (type(maxtasksperchild) is not int or maxtasksperchild <= 0):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._pool = ProcessPool(processes, initializer=initializer, initargs=tuple(initargs),
                                 max_tasks_per_worker=maxtasksperchild, mp_context=context,
                                 max_worker_memory=max_worker_memory)
        self.name = self._pool.name
        self.max_workers = self._pool.max_workers
        self._processes = self._pool.max_workers
        self._state = _RUN
        self._lock = threading.Lock()
        self._feeders: list[threading.Thread] = []
        self._feeding = 0  # imap feeders still submitting: the ProcessPool closes after them

    def _check_running(self) -> None:
        if self._state != _RUN:
            raise ValueError("Pool not running")

    # --- one call -------------------------------------------------------------------

    def apply(self, func: Callable, args: Iterable = (), kwds: dict | None = None) -> Any:
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable, args: Iterable = (), kwds: dict | None = None,
                    callback: Callable | None = None, error_callback: Callable | None = None) -> AsyncResult:
        self._check_running()
        result = AsyncResult(callback, error_callback)
        self._pool._schedule(func, tuple(args), kwds or None, None, result._set, None, None)
        return result

    # --- map ----------------------------------------------------------------------------

    def map(self, func: Callable, iterable: Iterable, chunksize: int | None = None) -> list:
        return self._map_async(_map_chunk, func, iterable, chunksize, None, None).get()

    def starmap(self, func: Callable, iterable: Iterable, chunksize: int | None = None) -> list:
        return self._map_async(_starmap_chunk, func, iterable, chunksize, None, None).get()

    def map_async(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
                  callback: Callable | None = None, error_callback: Callable | None = None) -> MapResult:
        return self._map_async(_map_chunk, func, iterable, chunksize, callback, error_callback)

    def starmap_async(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
                      callback: Callable | None = None, error_callback: Callable | None = None) -> MapResult:
        return self._map_async(_starmap_chunk, func, iterable, chunksize, callback, error_callback)

    def _map_async(self, run_chunk, func, iterable, chunksize, callback, error_callback) -> MapResult:
        self._check_running()
        items = iterable if hasattr(iterable, "__len__") else list(iterable)
        if chunksize is None:  # multiprocessing.Pool's rule: about four chunks per worker
            chunksize, extra = divmod(len(items), self._processes * 4)
            chunksize += bool(extra)
        chunks = _chunked(items, max(1, chunksize))
        result = MapResult(len(chunks), callback, error_callback)
        for index, chunk in enumerate(chunks):
            self._pool.run(run_chunk, (func, chunk), functools.partial(result._chunk_done, index))
        return result

    def imap(self, func: Callable, iterable: Iterable, chunksize: int = 1) -> IMapIterator:
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func: Callable, iterable: Iterable, chunksize: int = 1) -> IMapIterator:
        return self._imap(func, iterable, chunksize, ordered=False)

    def _imap(self, func, iterable, chunksize: int, ordered: bool) -> IMapIterator:
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        result = IMapIterator(ordered)
        feeder = threading.Thread(target=self._feed, args=(result, func, iter(iterable), chunksize),
                                  name=f"{self._pool.name}-imap", daemon=True)
        with self._lock:
            self._feeders = [t for t in self._feeders if t.is_alive()] + [feeder]
            self._feeding += 1
        feeder.start()
        return result

    def _feed(self, result: IMapIterator, func, items, chunksize: int) -> None:
        """Submit every chunk (a background thread, as in multiprocessing), even after close()."""
        count, error = 0, None
        try:
            while self._state != _TERMINATE and (chunk := tuple(itertools.islice(items, chunksize))):
                self._pool.run(_map_chunk, (func, chunk), functools.partial(result._chunk_done, count))
                count += 1
        except BaseException as exc:  # noqa: BLE001 - the input's error, raised in its place
            error = exc
        finally:
            result._fed(count, error)
            with self._lock:
                self._feeding -= 1
            self._close_if_fed()

    def stats(self) -> PoolStats:
        """The underlying :class:`ProcessPool`'s :class:`PoolStats`."""
        return self._pool.stats()

    # --- lifetime -------------------------------------------------------------------------

    def _close_if_fed(self) -> None:
        """The ProcessPool closes once close() was called and no imap is still feeding it."""
        with self._lock:
            if self._state == _CLOSE and not self._feeding:
                self._pool.close()

    def close(self) -> None:
        if self._state == _RUN:
            self._state = _CLOSE
        self._close_if_fed()

    def terminate(self) -> None:
        self._state = _TERMINATE
        self._pool.terminate()

    def join(self) -> None:
        if self._state == _RUN:
            raise ValueError("Pool is still running")
        for feeder in list(self._feeders):
            feeder.join()
        self._pool.join()

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc_info) -> None:
        self.terminate()

    def __repr__(self) -> str:
        return f"<muxpool.Pool state={self._state} pool_size={self._processes}>"


def _chunked(items, chunksize: int) -> list[tuple]:
    it = iter(items)
    return list(iter(lambda: tuple(itertools.islice(it, chunksize)), ()))
