"""The machinery under :class:`~muxpool.pools.process.ProcessPool`: handing
tasks to workers, and the supervisor thread.

``process.py`` holds what callers touch (construction, submitting, stopping,
``stats``); this module holds what moves tasks and watches workers, which
runs mostly on the supervisor thread. The state both halves share is made by
``ProcessPool.__init__`` and guarded by ``self._lock``.

The supervisor owns an epoll selector over the workers' result pipes and exit
sentinels, plus a wake-up pipe. Each turn it reads results, enforces
``task_timeout`` and ``startup_timeout`` (kill the worker), respawns, hands
queued tasks to free workers, and then, outside the lock, delivers outcomes
(callbacks run on this thread). Should any of that raise, ``_break`` fails
every task the pool holds with ``PoolBroken`` and kills the workers, so
nothing waits for a thread that is gone.
"""

from __future__ import annotations

import logging
import os
import pickle
import selectors
import time
from concurrent.futures import CancelledError

from ..errors import RemoteTraceback, SerializationError, TaskTimeout, WorkerCrashed
from . import _procworker
from ._worker_handle import Task, WorkerHandle, startup_failed
from .base import WorkerPool, broken_error, deliver

log = logging.getLogger("muxpool.pools.process")

_STARTUP_FAILURES_BEFORE_GIVING_UP = 3


class ProcessPoolMachinery(WorkerPool):
    """The dispatching and supervising half of ProcessPool (no state of its own)."""

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
            worker.retiring = True  # it exits by itself after this task
            self._counts["recycled"] += 1
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
                         if w.inflight and w.inflight[0].task_timeout is not None and not w.doomed
                         and w.ready]  # a starting worker has startup_timeout instead
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
                if worker.inflight:  # its task_timeout counts from now, not from the start-up
                    worker.inflight[0].started = now
            elif task_id == _procworker.INIT_FAILED_ID:
                worker.init_error = pickle.loads(payload)
            else:
                self._settle_result(worker, task_id, payload, now, settled)
        if worker.stop_when_idle and not worker.inflight:
            worker.stop_when_idle = False
            self._send_stop_locked(worker)
        self._dispatch_locked()

    def _check_memory_locked(self, worker: WorkerHandle, rss: int) -> None:
        """Retire a worker whose RSS passed ``max_worker_memory``. It came in its
        task's result frame, so no other task can have been sent to it yet."""
        worker.rss = rss
        if rss <= self._max_memory or worker.retiring or worker.doomed:
            return
        log.info("%s: worker %s uses %d bytes (max_worker_memory=%d): replacing it",
                 self.name, worker.pid, rss, self._max_memory)
        worker.retiring = worker.stop_when_idle = True
        self._counts["recycled"] += 1
        self._needs_upkeep = True
        self._wake()  # from a submitting thread's harvest, the supervisor starts the replacement

    def _unwatch(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _settle_result(self, worker, task_id, payload, now, settled) -> None:
        if self._max_memory is not None:
            self._check_memory_locked(worker, _procworker.RSS.unpack_from(payload)[0])
            payload = memoryview(payload)[_procworker.RSS.size:]
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
        # Unasked: neither killed on purpose nor told to stop (or it died on its last task).
        if not self._terminated and (worker.startup_expired or not worker.doomed and (
                inflight or not worker.retiring)):
            self._counts["crashed"] += 1
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
            if worker.doomed or not worker.inflight or not worker.ready:
                continue
            task = worker.inflight[0]
            if task.task_timeout is not None and now - task.started >= task.task_timeout:
                worker.inflight.popleft()
                worker.doomed = True
                worker.process.kill()
                self._counts["failed"] += 1
                self._counts["timed_out"] += 1
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
                              self._max_tasks, self._max_memory)
        self._workers[worker.result_fd] = worker
        self._starting += 1
        self._selector.register(worker.result_fd, selectors.EVENT_READ, self._on_results)
        self._selector.register(worker.process.sentinel, selectors.EVENT_READ, self._on_exit)
