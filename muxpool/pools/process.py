"""ProcessPool: worker processes for CPU-bound work, safe against crashes.

Each worker has its own pair of pipes, so the parent knows exactly which task
each worker holds: a worker that dies fails only the task it was running
(``WorkerCrashed``), tasks queued behind it go to other workers, and a
replacement starts. ``multiprocessing.Pool`` cannot tell which task died and
hangs; ``ProcessPoolExecutor`` marks the whole pool broken.

One supervisor thread owns an epoll selector over the workers' result pipes
and exit sentinels; it reads results, enforces ``task_timeout`` (kill and
replace the worker), respawns, and hands queued tasks to free workers.
Submitting threads pickle outside the lock and write straight to an idle
worker's pipe (non-blocking; anything left over is flushed by the supervisor),
so a task needs no thread hop on its way out. A worker is sent its next task
only once it has answered the last: prefetching would hide the pipe's round
trip for tiny tasks, but it parks a task behind a long one while other
workers sit idle (use ``map``'s chunks to batch tiny tasks instead). That
machinery — dispatching and the supervisor — lives in :mod:`._supervisor`;
this module is what callers touch.

Workers start with the ``forkserver`` method by default: forking from a
process that runs threads (ours always does) can deadlock the child. When
``initargs`` hold synchronisation objects made for ``fork`` (the lesson's
``multiprocessing.Lock()``), a pool given no ``mp_context`` adopts ``fork``
instead, as ``multiprocessing.Pool`` would; see :mod:`._pickling`.

Nothing waits forever: if the supervisor itself fails, the pool is *broken*
(``PoolBroken``, the failure as its ``__cause__``): every pending task fails,
the workers are killed, later submissions raise, and ``join()`` returns.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import pickle
import selectors
import threading
import time
from concurrent.futures import CancelledError

from ..errors import PoolError, QueueFull, SerializationError, WorkerCrashed
from . import _memory, _pickling, _procworker
from ._worker_handle import Task, WorkerHandle, default_start_method
from ._supervisor import ProcessPoolMachinery
from .base import PoolStats, broken_error, cancel_task, closed_error, deliver

log = logging.getLogger("muxpool.pools.process")

_HARVEST_EVERY = 0.0001  # seconds between a submitter's looks at finished workers


class ProcessPool(ProcessPoolMachinery):
    """Up to ``max_workers`` processes (default: the number of cores).

    Callbacks and future callbacks run on the pool's supervisor thread: keep
    them short. ``task_timeout`` (here, or per task on ``schedule``/``run``)
    kills a worker whose task runs too long and fails that task with
    ``TaskTimeout``; ``startup_timeout`` does the same for a worker whose
    start-up (its ``initializer``) takes too long. Three start-ups failing in a
    row fail the queued tasks with ``WorkerCrashed`` naming the cause.

    Workers are recycled — replaced by a fresh process once their current
    task's result is delivered, no task lost — after ``max_tasks_per_worker``
    tasks, or when their RSS after a task passes ``max_worker_memory`` (bytes,
    or a string such as ``"200MB"`` or ``"1GiB"``; see :mod:`._memory`).
    ``stats().recycled`` counts them, ``stats().crashed`` the workers that died
    unasked.

    Raises ``ValueError`` at once when the initializer or ``initargs`` cannot
    reach the workers (see :mod:`._pickling`).
    """

    def __init__(self, max_workers: int | None = None, max_queue: int | None = None, *,
                 initializer=None, initargs: tuple = (), max_tasks_per_worker: int | None = None,
                 task_timeout: float | None = None, mp_context=None, name: str | None = None,
                 startup_timeout: float = 60.0, max_worker_memory: int | str | None = None):
        self.max_workers = max_workers or os.cpu_count() or 1
        if self.max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        if max_queue is not None and max_queue < 1:
            raise ValueError("max_queue must be >= 1 or None")
        if max_tasks_per_worker is not None and max_tasks_per_worker < 1:
            raise ValueError("max_tasks_per_worker must be >= 1 or None")
        self._ctx = _pickling.worker_context(mp_context, default_start_method(), initializer, initargs)
        self._fork = self._ctx.get_start_method() == "fork"
        self.max_queue = max_queue
        self.task_timeout = task_timeout
        self.name = name or f"ProcessPool-{id(self):x}"
        self.startup_timeout = startup_timeout
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._max_tasks = max_tasks_per_worker
        self._max_memory = _memory.parse_size(max_worker_memory)
        self.max_worker_memory = self._max_memory
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(max_queue) if max_queue else None
        self._pending: collections.deque[Task] = collections.deque()
        self._workers: dict[int, WorkerHandle] = {}  # by result fd
        self._ids = itertools.count(1)
        self._closed = False
        self._terminated = False
        self._startup_failures = 0
        self._startup_error: WorkerCrashed | None = None
        self._starting = 0  # workers whose READY has not come yet
        self._broken: BaseException | None = None  # what broke the supervisor
        self._respawn_at = 0.0
        self._uses_timeouts = task_timeout is not None
        self._handoff: list = []  # outcomes collected by _harvest_locked, delivered by the supervisor
        self._last_harvest = 0.0
        self._needs_upkeep = True  # worker exits, close, terminate: the supervisor looks again
        self._counts = {"submitted": 0, "completed": 0, "failed": 0, "cancelled": 0, "timed_out": 0,
                        "recycled": 0, "crashed": 0}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._on_wakeup)
        self._supervisor = threading.Thread(target=self._supervise, name=f"{self.name}-supervisor",
                                            daemon=True)
        self._supervisor.start()

    # --- submitting ----------------------------------------------------------------

    def _schedule(self, func, args, kwargs, fut, callback, timeout, task_timeout) -> None:
        if self._closed:
            raise broken_error(self.name, self._broken) if self._broken else closed_error(self.name)
        task_id = next(self._ids)
        try:
            if not self._fork and (problem := _pickling.main_function_problem(func)):
                raise SerializationError("function", problem)
            frame = _procworker.encode_frame(
                task_id, pickle.dumps((func, args, kwargs), pickle.HIGHEST_PROTOCOL))
        except Exception as exc:
            err = exc if isinstance(exc, SerializationError) else _pickling.unpicklable_task(
                func, args, kwargs, exc)
            if fut is not None:
                fut.set_running_or_notify_cancel()
            with self._lock:
                self._counts["submitted"] += 1
                self._counts["failed"] += 1
            deliver(fut, callback, False, err)
            return
        slots = self._slots
        if slots is not None and not slots.acquire(timeout=timeout):
            raise QueueFull(self.max_queue, timeout)
        task = Task(task_id, frame, fut, callback,
                     self.task_timeout if task_timeout is None else task_timeout, slots is not None)
        with self._lock:
            if self._closed:
                if slots is not None:
                    slots.release()
                raise broken_error(self.name, self._broken) if self._broken else closed_error(self.name)
            self._pending.append(task)
            self._counts["submitted"] += 1
            if len(self._pending) == 1:
                self._dispatch_locked()
            elif time.monotonic() - self._last_harvest > _HARVEST_EVERY:
                self._harvest_locked()
        if task.task_timeout is not None:
            self._uses_timeouts = True
            self._wake()  # the supervisor may need an earlier deadline

    # --- stopping --------------------------------------------------------------

    def _shutdown(self, cancel: bool) -> None:
        dropped: list[Task] = []
        killed: list[Task] = []
        with self._lock:
            self._closed = True
            if cancel and not self._terminated:
                self._terminated = True
                dropped = list(self._pending)
                self._pending.clear()
                for worker in self._workers.values():
                    for task in worker.inflight:
                        (killed if task.running else dropped).append(task)
                    worker.inflight.clear()
                    worker.doomed = True
                    worker.process.kill()
                self._counts["cancelled"] += len(dropped)
                self._counts["failed"] += len(killed)
                for task in dropped:
                    if task.holds_slot:
                        task.holds_slot = False
                        self._slots.release()
        self._wake()
        for task in dropped:
            cancel_task(task.fut, task.callback)
        for task in killed:
            deliver(task.fut, task.callback, False, CancelledError("the pool was terminated"))

    def _join(self, timeout: float | None) -> bool:
        if not self._closed:
            raise PoolError("join() needs close() or terminate() first")
        self._supervisor.join(timeout)
        return not self._supervisor.is_alive()

    def stats(self) -> PoolStats:
        with self._lock:
            # A recycled worker leaves the count once its last task is answered.
            workers = [w for w in self._workers.values()
                       if not w.doomed and (w.inflight or not w.retiring)]
            busy = sum(1 for w in workers if w.inflight)
            return PoolStats(workers=len(workers), idle=len(workers) - busy, busy=busy,
                             queued=len(self._pending), **self._counts)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ProcessPool {self.name!r} {state} max_workers={self.max_workers}>"
