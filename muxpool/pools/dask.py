"""DaskPool: the pool API over a Dask cluster (``pip install 'muxpool[dask]'``).

Why Dask: the same calls run on worker processes of one machine or of many,
under a scheduler that balances load and survives lost workers. The pool
maps onto it thinly: a task is one ``client.submit(func, *args, pure=False)``
and settles our ``concurrent.futures.Future`` or the ``run`` callback.

Dask's ``add_done_callback`` (run on Dask's callback thread) only hands the
finished Dask future to the pool's one housekeeper thread, which fetches the
results of everything finished meanwhile with a single ``gather`` (a round
trip per batch, not per task: measured here, about 1.5x the throughput of a
``result()`` per callback). The same thread holds the ``task_timeout`` heap,
sends cancellations to the scheduler and, at the end, closes the client and
the cluster the pool owns, so callers never wait on the cluster. Settling
goes through one lock and a per-task flag: a completion, a timeout, a
``cancel()`` and ``terminate()`` race safely and exactly one of them delivers.
``max_queue`` is a semaphore on tasks in flight.

What cannot be done: Dask cannot interrupt a task that already runs in a
worker thread. ``task_timeout``, ``cancel()`` and ``terminate()`` release the
Dask future and discard the result; the call itself runs on until it
returns and occupies its worker thread meanwhile (on a cluster the pool
started, ``terminate()`` then closes it, and Dask's nanny kills a worker
still busy after its grace period of about 4 s: ``join()`` waits for that).
Nor does the client learn when a task starts, so ``task_timeout`` counts
from submission, and ``stats()`` takes the oldest in-flight tasks, one per
worker thread, to be the running ones (``terminate()`` counts those as
failed, the rest as cancelled). A worker process that dies
is replaced by its nanny; Dask reschedules the tasks it held on other workers
and fails a task with ``distributed.KilledWorker`` only once workers died
running it more than ``distributed.scheduler.allowed-failures`` times (3 by
default). Either way the pool keeps serving and nothing hangs. If the
housekeeper itself fails, the pool is broken: every task in flight and every
later submission fails with ``PoolBroken`` (the failure as its ``__cause__``).

A cluster the pool starts ignores Ctrl-C in its workers (:mod:`._dask_worker`):
a SIGINT to the terminal's process group must not kill them under the pool.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import pickle
import threading
import time
import uuid

from ..errors import MissingDependency, PoolError, QueueFull, SerializationError

try:
    import distributed
    from dask.utils import funcname
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependency("DaskPool", "dask") from exc

from ._dask_machinery import DaskPoolMachinery, _call_with_kwargs, _Task
from .base import PoolStats, broken_error, cancel_task, closed_error, deliver

log = logging.getLogger("muxpool.pools.dask")

#: The scheduler serves its health and metrics routes over HTTP even without a
#: dashboard, on port 8787 by default; a random loopback port instead leaves
#: 8787 to a real dashboard and lets several clusters start without a warning.
LOOPBACK_HTTP = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}

#: Run in each worker of a cluster the pool starts: Ctrl-C must not kill them.
WORKER_PRELOAD = "muxpool.pools._dask_worker"

#: How long ``stats()`` may reuse the scheduler's thread count (one round trip).
_WORKERS_CACHE_SECONDS = 1.0


class DaskPool(DaskPoolMachinery):
    """Tasks run on a Dask cluster.

    * No ``address`` and no ``client``: starts a loopback-only
      ``LocalCluster`` of ``n_workers`` processes with one thread each (no
      dashboard) and closes it on ``close()``/``terminate()``.
    * ``address="tcp://host:8786"``: connects a client of its own to that
      scheduler; closes the client, never the scheduler.
    * ``client=``: uses that ``distributed.Client`` and leaves it open.

    ``max_workers`` is the cluster's worker thread count when the pool
    starts. ``max_queue`` bounds tasks waiting beyond those threads, as in
    the other pools: at most ``max_workers + max_queue`` tasks are in flight,
    and ``run``/``submit`` block (``schedule``/``run`` with ``timeout=``
    raise ``QueueFull``) while that many are. ``task_timeout`` (here, or per
    task on ``schedule``/``run``) fails a task with ``TaskTimeout``. It counts
    from submission, time queued included: Dask does not tell the client when
    a task starts. Dask cannot stop the call either, so its result is
    discarded (see the module doc).
    ``cancel()`` on a future succeeds until its result has arrived, for the
    same reason.

    Callbacks and future callbacks run on the pool's housekeeper thread,
    which also delivers every other result and timeout: keep them short, and
    do not block in them (a ``run`` from a callback into a full queue would
    wait for itself).

    ``muxpool.DaskPool`` raises ``MissingDependency`` without ``dask[distributed]``.
    """

    def __init__(self, address: str | None = None, max_queue: int | None = None, *,
                 task_timeout: float | None = None, client: distributed.Client | None = None,
                 n_workers: int = 2, name: str | None = None):
        if max_queue is not None and max_queue < 1:
            raise ValueError("max_queue must be >= 1 or None")
        if task_timeout is not None and task_timeout <= 0:
            raise ValueError("task_timeout must be > 0 or None")
        if address is not None and client is not None:
            raise ValueError("give address or client, not both")
        if n_workers < 1:
            raise ValueError("n_workers must be >= 1")
        self.name = name or f"DaskPool-{id(self):x}"
        self.max_queue = max_queue
        self.task_timeout = task_timeout
        self._cluster = None
        self._owns_client = client is None
        if client is not None:
            self._client = client
        elif address is not None:
            self._client = distributed.Client(address, set_as_default=False)
        else:
            self._cluster = distributed.LocalCluster(
                n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None, scheduler_kwargs=LOOPBACK_HTTP, preload=[WORKER_PRELOAD])
            try:
                self._client = distributed.Client(self._cluster, set_as_default=False)
            except BaseException:
                self._cluster.close()
                raise
        try:
            self.max_workers = max(1, self._count_threads())
        except BaseException:
            self._close_client_and_cluster()
            raise
        self._threads = self.max_workers
        self._threads_seen_at = time.monotonic()

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # in-flight set, heap, cancels, closing
        self._slots = threading.Semaphore(self.max_workers + max_queue) if max_queue else None
        self._inflight: dict[_Task, None] = {}  # insertion-ordered: oldest first
        self._timers: list[tuple[float, int, _Task]] = []
        self._timer_ids = itertools.count()
        self._to_cancel: list = []  # Dask futures to cancel on the scheduler
        self._ready: list = []  # (task, Dask future) finished, outcome not fetched yet
        self._counts = {"submitted": 0, "completed": 0, "failed": 0, "cancelled": 0, "timed_out": 0}
        self._closed = False
        self._terminated = False
        self._broken: BaseException | None = None  # what broke the housekeeper
        self._housekeeper: threading.Thread | None = None
        self._finished = threading.Event()

    # --- submitting ------------------------------------------------------------

    def _schedule(self, func, args, kwargs, fut, callback, timeout, task_timeout) -> None:
        if self._closed:
            raise broken_error(self.name, self._broken) if self._broken else closed_error(self.name)
        slots = self._slots
        if slots is not None and not slots.acquire(timeout=timeout):
            raise QueueFull(self.max_queue, timeout)
        task = _Task(fut, callback, slots is not None)
        limit = self.task_timeout if task_timeout is None else task_timeout
        with self._lock:
            if self._closed:
                if slots is not None:
                    slots.release()
                raise broken_error(self.name, self._broken) if self._broken else closed_error(self.name)
            self._inflight[task] = None
            self._start_housekeeper_locked()
        try:
            if kwargs:
                dask_future = self._client.submit(
                    _call_with_kwargs, func, args, kwargs, pure=False,
                    key=f"{funcname(func)}-{uuid.uuid4()}")
            else:
                dask_future = self._client.submit(func, *args, pure=False)
        except Exception as exc:
            unpicklable = isinstance(exc, (TypeError, pickle.PicklingError)) and (
                "serializ" in str(exc) or "pickle" in str(exc))
            if not self._settle(task, "failed" if unpicklable else None) or not unpicklable:
                raise  # the client or the scheduler broke: the caller hears it, nothing counts
            err = SerializationError("arguments", repr(exc))
            err.__cause__ = exc
            with self._lock:
                self._counts["submitted"] += 1
            deliver(fut, callback, False, err)
            return
        with self._lock:
            self._counts["submitted"] += 1
            task.dask_future = dask_future
            if task.settled:  # terminate() or cancel() got there first
                self._to_cancel.append(dask_future)
                self._start_housekeeper_locked()
            elif limit is not None:
                task.limit = limit
                self._add_timer_locked(task, time.monotonic() + limit)
        if fut is not None:
            fut.add_done_callback(lambda f: self._on_our_future_done(task, f))
        dask_future.add_done_callback(lambda df: self._on_dask_done(task, df))

    def _add_timer_locked(self, task: _Task, deadline: float) -> None:
        timers = self._timers
        if len(timers) > 64 and len(timers) > 2 * len(self._inflight):
            # Settled tasks leave their entries behind; drop them now and then.
            timers[:] = [entry for entry in timers if not entry[2].settled]
            heapq.heapify(timers)
        heapq.heappush(timers, (deadline, next(self._timer_ids), task))
        self._start_housekeeper_locked()
        if timers[0][2] is task:
            self._changed.notify_all()  # the housekeeper sleeps until an earlier deadline

    # --- stopping ----------------------------------------------------------------------

    def _shutdown(self, cancel: bool) -> None:
        dropped: list[_Task] = []
        with self._lock:
            self._closed = True
            if cancel and not self._terminated:
                self._terminated = True
                # The oldest tasks, one per worker thread, are taken to be
                # running (as stats() does): they count as failed, the rest as
                # cancelled. Every future is cancelled either way.
                running = min(len(self._inflight), self._threads)
                for n, task in enumerate(list(self._inflight)):
                    self._settle_locked(task, "failed" if n < running else "cancelled")
                    dropped.append(task)
                    if task.dask_future is not None:
                        self._to_cancel.append(task.dask_future)
                        task.dask_future = None
            self._start_housekeeper_locked()
            self._changed.notify_all()
        for task in dropped:
            cancel_task(task.fut, task.callback)

    def _join(self, timeout: float | None) -> bool:
        if not self._closed:
            raise PoolError("join() needs close() or terminate() first")
        return self._finished.wait(timeout)

    # --- introspection -----------------------------------------------------------------

    def _count_threads(self) -> int:
        return sum(self._client.nthreads().values())

    def _worker_threads(self) -> int:
        """The cluster's thread count, asked of the scheduler at most once a second."""
        now = time.monotonic()
        if now - self._threads_seen_at >= _WORKERS_CACHE_SECONDS:
            self._threads_seen_at = now
            try:
                self._threads = self._count_threads()
            except Exception:  # a closing client: keep the last count
                log.debug("%s: cannot count the cluster's threads", self.name, exc_info=True)
        return self._threads

    def stats(self) -> PoolStats:
        """A snapshot. ``workers`` is the cluster's worker thread count (0 once
        the pool is closed and done). Dask does not tell the client when a task
        starts, so ``busy`` is approximate: the in-flight tasks, at most one per
        worker thread; the rest count as ``queued``."""
        workers = 0 if self._finished.is_set() else self._worker_threads()
        with self._lock:
            inflight = len(self._inflight)
            counts = dict(self._counts)
        busy = min(inflight, workers)
        return PoolStats(workers=workers, idle=workers - busy, busy=busy, queued=inflight - busy,
                         **counts)

    @property
    def client(self) -> distributed.Client:
        """The Dask client the pool submits through."""
        return self._client

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<DaskPool {self.name!r} {state} max_workers={self.max_workers}>"
