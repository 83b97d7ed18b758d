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
workers sit idle (use ``map``'s chunks to batch tiny tasks instead).

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

from ..errors import PoolError, QueueFull, RemoteTraceback, SerializationError, TaskTimeout, WorkerCrashed
from . import _pickling, _procworker
from ._worker_handle import Task, WorkerHandle, default_start_method, startup_failed
from .base import PoolStats, WorkerPool, broken_error, cancel_task, closed_error, deliver

log = logging.getLogger("muxpool.pools.process")

_STARTUP_FAILURES_BEFORE_GIVING_UP = 3
_HARVEST_EVERY = 0.0001  # seconds between a submitter's looks at finished workers


class ProcessPool(WorkerPool):
    """Up to ``max_workers`` processes (default: the number of cores).

    Callbacks and future callbacks run on the pool's supervisor thread: keep
    them short. ``task_timeout`` (here, or per task on ``schedule``/``run``)
    kills a worker whose task runs too long and fails that task with
    ``TaskTimeout``; ``startup_timeout`` does the same for a worker whose
    start-up (its ``initializer``) takes too long. Three start-ups failing in a
    row fail the queued tasks with ``WorkerCrashed`` naming the cause.

    Raises ``ValueError`` at once when the initializer or ``initargs`` cannot
    reach the workers (see :mod:`._pickling`).
    """

    def __init__(self, max_workers: int | None = None, max_queue: int | None = None, *,
                 initializer=None, initargs: tuple = (), max_tasks_per_worker: int | None = None,
                 task_timeout: float | None = None, mp_context=None, name: str | None = None,
                 startup_timeout: float = 60.0):
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
        self._counts = {"completed": 0, "failed": 0, "cancelled": 0}
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
            if len(self._pending) == 1:
                self._dispatch_locked()
            elif time.monotonic() - self._last_harvest > _HARVEST_EVERY:
                self._harvest_locked()
        if task.task_timeout is not None:
            self._uses_timeouts = True
            self._wake()  # the supervisor may need an earlier deadline

    def _harvest_locked(self) -> None:
        """A submitting thread that holds the GIL can starve the supervisor for a
        whole switch interval (5 ms), leaving finished workers idle. So while it
        queues work, it collects finished results itself, now and then, and hands
        the next tasks straight to those workers; the supervisor still delivers
        the outcomes (callbacks keep running on its thread)."""
        self._last_harvest = time.monotonic()
        handoff = self._handoff
        was_empty = not handoff
        for worker in self._workers.values():
            if worker.inflight and not worker.doomed:
                self._read_results(worker, handoff, unwatch_at_eof=False)
        if was_empty and handoff:
            self._wake()

    def _dispatch_locked(self) -> None:
        """Hand pending tasks to idle workers."""
        pending = self._pending
        if not pending:
            return
        for worker in self._workers.values():
            if worker.inflight or worker.retiring or worker.doomed:
                continue
            while pending:
                task = pending.popleft()
                if task.holds_slot:
                    task.holds_slot = False
                    self._slots.release()
                if self._begin(task, time.monotonic()):
                    self._send_locked(worker, task)
                    break
            if not pending:
                return

    def _begin(self, task: Task, now: float) -> bool:
        """``task`` becomes its worker's current one; False if its caller cancelled it.

        Only then is its future marked running: a task prefetched behind
        another can still be cancelled, as if it were queued.
        """
        task.started = now
        if task.dropped:
            return False
        if task.running or task.fut is None:
            return True
        if task.fut.set_running_or_notify_cancel():
            task.running = True
            return True
        task.dropped = True
        self._counts["cancelled"] += 1
        return False

    def _send_locked(self, worker: WorkerHandle, task: Task) -> None:
        worker.inflight.append(task)
        worker.sent += 1
        if self._max_tasks is not None and worker.sent >= self._max_tasks:
            worker.retiring = True
        self._write_locked(worker, task.frame)

    def _write_locked(self, worker: WorkerHandle, frame: bytes) -> None:
        if worker.write(frame):
            self._wake()  # the supervisor registers for writability and flushes

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or closed at the very end

    # --- the supervisor thread -----------------------------------------------------

    def _supervise(self) -> None:
        try:
            with self._lock:
                for _ in range(self.max_workers):
                    self._start_worker_locked()
            while True:
                events = self._selector.select(self._next_timeout())
                settled: list = []
                with self._lock:
                    if self._handoff:  # outcomes a submitting thread collected
                        settled.extend(self._handoff)
                        self._handoff.clear()
                    for key, mask in events:
                        key.data(key, mask, settled)
                    if self._uses_timeouts or self._starting:
                        self._expire_locked(settled)
                    # While open, results alone change nothing to look after: skip the
                    # upkeep then, it is most of a tiny task's cost. Once closed, the
                    # last result is what lets the workers be stopped.
                    if self._needs_upkeep or self._closed or not events:
                        self._needs_upkeep = False
                        self._maintain_locked(settled)
                    finished = self._closed and not self._workers
                for task, ok, value in settled:
                    deliver(task.fut, task.callback, ok, value)
                del settled
                if finished:
                    return
        except BaseException as exc:  # noqa: BLE001 - the pool breaks; nothing is left waiting
            self._break(exc)
        finally:
            with self._lock:
                wake_r, wake_w, self._wake_r, self._wake_w = self._wake_r, self._wake_w, -1, -1
            self._selector.close()
            os.close(wake_r)
            os.close(wake_w)

    def _break(self, cause: BaseException) -> None:
        """The supervisor failed: fail every task it held, kill every worker."""
        log.error("%s: the supervisor failed; the pool is broken", self.name, exc_info=cause)
        with self._lock:
            self._broken = cause
            self._closed = self._terminated = True
            tasks = list(self._pending) + [t for w in self._workers.values() for t in w.inflight]
            self._pending.clear()
            workers = list(self._workers.values())
            self._workers.clear()
            tasks = [t for t in tasks if not t.dropped]
            self._counts["failed"] += len(tasks)
        for task in tasks:
            if task.holds_slot:
                task.holds_slot = False
                self._slots.release()
            deliver(task.fut, task.callback, False, broken_error(self.name, cause))
        for worker in workers:
            try:
                worker.process.kill()
                worker.close()
            except Exception:  # noqa: BLE001 - the rest must still be killed
                log.debug("%s: reaping worker %s failed", self.name, worker.pid, exc_info=True)

    def _next_timeout(self) -> float | None:
        if not self._uses_timeouts and not self._respawn_at and not self._starting:
            return None
        with self._lock:
            deadlines = [w.inflight[0].started + w.inflight[0].task_timeout
                         for w in self._workers.values()
                         if w.inflight and w.inflight[0].task_timeout is not None and not w.doomed]
            if self._starting:
                deadlines += [w.started_at + self.startup_timeout for w in self._workers.values()
                              if not w.ready and not w.doomed]
            if self._respawn_at and len(self._workers) < self.max_workers:
                deadlines.append(self._respawn_at)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _on_wakeup(self, key, mask, settled) -> None:
        self._needs_upkeep = True
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        for worker in self._workers.values():
            if worker.outbuf:
                self._watch_writes(worker, True)

    def _watch_writes(self, worker: WorkerHandle, on: bool) -> None:
        try:
            if on:
                self._selector.register(worker.task_fd, selectors.EVENT_WRITE, self._on_writable)
            else:
                self._selector.unregister(worker.task_fd)
        except (KeyError, ValueError):
            pass  # already in that state

    def _on_writable(self, key, mask, settled) -> None:
        worker = next((w for w in self._workers.values() if w.task_fd == key.fd), None)
        if worker is not None and worker.flush():
            self._watch_writes(worker, False)

    def _on_results(self, key, mask, settled) -> None:
        worker = self._workers.get(key.fd)
        if worker is not None:
            self._read_results(worker, settled)

    def _read_results(self, worker: WorkerHandle, settled: list, unwatch_at_eof: bool = True) -> None:
        frames, eof = worker.read_frames()
        if eof and unwatch_at_eof:  # the exit sentinel follows; stop watching this fd
            self._unwatch(worker.result_fd)
        now = time.monotonic()
        for task_id, payload in frames:
            if task_id == _procworker.READY_ID:
                worker.ready = True
                self._starting -= 1
                self._startup_failures = 0
            elif task_id == _procworker.INIT_FAILED_ID:
                worker.init_error = pickle.loads(payload)
            else:
                self._settle_result(worker, task_id, payload, now, settled)
        self._dispatch_locked()

    def _unwatch(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _settle_result(self, worker, task_id, payload, now, settled) -> None:
        inflight = worker.inflight
        if inflight and inflight[0].id == task_id:
            task = inflight.popleft()
        else:  # a task that timed out (or was terminated) answered after all
            task = next((t for t in inflight if t.id == task_id), None)
            if task is None:
                return
            inflight.remove(task)
        if inflight:
            self._begin(inflight[0], now)
        if task.dropped:
            return
        try:
            ok, value, tb_text = pickle.loads(payload)
        except BaseException as exc:  # noqa: BLE001 - a SystemExit from a __reduce__ fails this task only
            log.warning("%s: the result of task %s cannot be unpickled: %r", self.name, task_id, exc)
            ok, value, tb_text = False, SerializationError("result", f"cannot unpickle: {exc!r}"), None
            value.__cause__ = exc
        if tb_text and isinstance(value, BaseException):
            value.__cause__ = RemoteTraceback(tb_text)
        self._counts["completed" if ok else "failed"] += 1
        settled.append((task, ok, value))

    def _on_exit(self, key, mask, settled) -> None:
        self._needs_upkeep = True
        worker = next((w for w in self._workers.values() if w.process.sentinel == key.fd), None)
        if worker is None:
            return
        self._read_results(worker, settled)  # what it answered before dying still counts
        for fd in (worker.result_fd, worker.process.sentinel, worker.task_fd):
            self._unwatch(fd)
        worker.close()
        del self._workers[worker.result_fd]
        exitcode = worker.process.exitcode
        inflight = list(worker.inflight)
        worker.inflight.clear()
        if not worker.ready:
            self._starting -= 1
        if not worker.ready and (not worker.doomed or worker.startup_expired) and not self._terminated:
            self._startup_failures += 1
            self._respawn_at = time.monotonic() + min(2.0, 0.05 * 2 ** self._startup_failures)
            self._startup_error = startup_failed(worker, self.startup_timeout)
            log.error("%s: %s", self.name, self._startup_error)
        elif inflight and not worker.doomed and not self._terminated:
            crashed = inflight.pop(0)
            self._counts["failed"] += 1
            log.warning("%s: worker %s died (exit code %s) running task %s",
                        self.name, worker.pid, exitcode, crashed.id)
            settled.append((crashed, False, WorkerCrashed(worker.pid, exitcode)))
        self._requeue_locked(inflight, settled)

    def _requeue_locked(self, tasks: list[Task], settled: list) -> None:
        """Tasks a dead worker never started go back to the front of the queue."""
        for task in reversed(tasks):
            if task.dropped:
                continue
            if self._terminated:
                settled.append((task, False, CancelledError()))
            else:
                self._pending.appendleft(task)

    def _expire_locked(self, settled: list) -> None:
        now = time.monotonic()
        if self._starting:
            for worker in self._workers.values():
                if not worker.ready and not worker.doomed and now - worker.started_at >= self.startup_timeout:
                    worker.doomed = worker.startup_expired = True
                    worker.process.kill()
        for worker in self._workers.values():
            if worker.doomed or not worker.inflight:
                continue
            task = worker.inflight[0]
            if task.task_timeout is not None and now - task.started >= task.task_timeout:
                worker.inflight.popleft()
                worker.doomed = True
                worker.process.kill()
                self._counts["failed"] += 1
                settled.append((task, False, TaskTimeout(task.task_timeout)))

    def _maintain_locked(self, settled: list) -> None:
        """Keep the worker count up while there is or may be work."""
        if self._terminated:
            return
        if self._startup_failures >= _STARTUP_FAILURES_BEFORE_GIVING_UP and self._pending:
            err = self._startup_error
            while self._pending:
                self._counts["failed"] += 1
                settled.append((self._pending.popleft(), False, err))
        if self._closed and not self._pending and not any(w.inflight for w in self._workers.values()):
            for worker in list(self._workers.values()):
                if not worker.retiring:
                    worker.retiring = True
                    self._send_stop_locked(worker)
            return
        if time.monotonic() < self._respawn_at:
            self._needs_upkeep = True  # come back when the back-off ends
            return
        self._respawn_at = 0.0
        live = sum(1 for w in self._workers.values() if not w.retiring and not w.doomed)
        while live < self.max_workers and not (self._closed and not self._pending):
            self._start_worker_locked()
            live += 1
        self._dispatch_locked()

    def _send_stop_locked(self, worker: WorkerHandle) -> None:
        self._write_locked(worker, _procworker.encode_frame(0, b""))

    def _start_worker_locked(self) -> None:
        worker = WorkerHandle(self._ctx, f"{self.name}-worker", self._initializer, self._initargs,
                              self._max_tasks)
        self._workers[worker.result_fd] = worker
        self._starting += 1
        self._selector.register(worker.result_fd, selectors.EVENT_READ, self._on_results)
        self._selector.register(worker.process.sentinel, selectors.EVENT_READ, self._on_exit)

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
            workers = [w for w in self._workers.values() if not w.doomed]
            busy = sum(1 for w in workers if w.inflight)
            return PoolStats(workers=len(workers), idle=len(workers) - busy, busy=busy,
                             queued=len(self._pending), **self._counts)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ProcessPool {self.name!r} {state} max_workers={self.max_workers}>"
