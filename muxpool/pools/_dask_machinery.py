"""The machinery under :class:`~muxpool.pools.dask.DaskPool`: settling each
task exactly once, and the housekeeper thread.

``dask.py`` holds what callers touch (construction, submitting, stopping,
``stats``); this module holds how outcomes come back, which runs on Dask's
callback thread and on the pool's housekeeper. The state both halves share is
made by ``DaskPool.__init__`` and guarded by ``self._lock``. It imports
nothing of Dask itself: it only talks to the client and futures it is given.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
import traceback
from concurrent.futures import Future

from ..errors import RemoteTraceback, SerializationError, TaskTimeout
from .base import WorkerPool, broken_error, cancel_task, deliver

log = logging.getLogger("muxpool.pools.dask")


def _call_with_kwargs(func, args, kwargs):
    # Keywords travel inside the task, so none can collide with
    # ``client.submit``'s own (``key``, ``workers``, ``priority``, ``func``...).
    return func(*args, **kwargs)


def _outcome(dask_future) -> tuple[bool, object]:
    """``(ok, value)`` of a finished or failed Dask future; a failure keeps
    the worker's traceback text as its ``__cause__``."""
    if dask_future.status == "error":
        exc = dask_future.exception()
        tb = dask_future.traceback()
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        exc.__cause__ = RemoteTraceback(text)
        return False, exc
    try:
        return True, dask_future.result()
    except Exception as exc:
        if not (isinstance(exc, TypeError) and "serializ" in str(exc)):
            raise
        err = SerializationError("result", repr(exc))  # the worker could not send it
        err.__cause__ = exc
        return False, err


class _Task:
    __slots__ = ("callback", "dask_future", "fut", "holds_slot", "limit", "settled")

    def __init__(self, fut: Future | None, callback, holds_slot: bool):
        self.fut = fut
        self.callback = callback
        self.dask_future = None
        self.settled = False
        self.holds_slot = holds_slot
        self.limit: float | None = None  # task_timeout


class DaskPoolMachinery(WorkerPool):
    """The settling and housekeeping half of DaskPool (no state of its own)."""

    # --- settling: exactly once per task -------------------------------------------

    def _settle(self, task: _Task, outcome: str | None) -> bool:
        """Claim the right to deliver ``task``'s outcome (a ``stats()`` counter,
        or ``None`` for a task that never got in); ``False`` if taken."""
        with self._lock:
            if task.settled:
                return False
            self._settle_locked(task, outcome)
            return True

    def _settle_locked(self, task: _Task, outcome: str | None) -> None:
        task.settled = True
        if outcome is not None:
            self._counts[outcome] += 1
        self._inflight.pop(task, None)
        if task.holds_slot:
            task.holds_slot = False
            self._slots.release()
        if not self._inflight:
            self._changed.notify_all()

    def _on_dask_done(self, task: _Task, dask_future) -> None:
        # On Dask's callback thread: hand over to the housekeeper, which
        # fetches the results of every task finished meanwhile in one gather.
        with self._lock:
            if not task.settled:
                self._ready.append((task, dask_future))
                if len(self._ready) == 1:
                    self._changed.notify_all()

    def _deliver_ready(self, ready: list) -> None:
        finished = [(task, df) for task, df in ready if df.status == "finished" and not task.settled]
        values = None
        if len(finished) > 1:
            try:
                values = self._client.gather([df for _task, df in finished])
            except Exception:  # one bad result spoils a gather: fetch them one by one
                values = None
        if values is not None:
            for (task, _df), value in zip(finished, values):
                if self._settle(task, "completed"):
                    task.dask_future = None
                    deliver(task.fut, task.callback, True, value)
            gathered = {id(df) for _task, df in finished}
            ready = [item for item in ready if id(item[1]) not in gathered]
        for task, df in ready:
            self._deliver_one(task, df)

    def _deliver_one(self, task: _Task, dask_future) -> None:
        if task.settled:
            return
        if dask_future.status == "cancelled":  # by someone else, or the client went away
            if self._settle(task, "cancelled"):
                cancel_task(task.fut, task.callback)
            return
        try:
            ok, value = _outcome(dask_future)
        except BaseException as exc:  # the client broke: the task hears how
            ok, value = False, exc
        if self._settle(task, "completed" if ok else "failed"):
            task.dask_future = None  # our future may live on; the worker's copy need not
            deliver(task.fut, task.callback, ok, value)

    def _on_our_future_done(self, task: _Task, fut: Future) -> None:
        if fut.cancelled() and self._settle(task, "cancelled"):
            with self._lock:
                if task.dask_future is not None:
                    self._to_cancel.append(task.dask_future)
                    task.dask_future = None
                    self._start_housekeeper_locked()
                    self._changed.notify_all()

    # --- the housekeeper: timeouts, cancellations, the end --------------------------

    def _start_housekeeper_locked(self) -> None:
        if self._housekeeper is None:
            self._housekeeper = threading.Thread(target=self._housekeep, daemon=True,
                                                 name=f"{self.name}-housekeeper")
            self._housekeeper.start()

    def _housekeep(self) -> None:
        try:
            while self._housekeep_once():
                pass
        except BaseException as exc:  # noqa: BLE001 - the pool breaks; nothing is left waiting
            self._break(exc)
        finally:
            self._close_client_and_cluster()
            self._finished.set()

    def _housekeep_once(self) -> bool:
        """One round; ``False`` once the pool is closed and nothing is in flight."""
        expired: list[_Task] = []
        with self._lock:
            while True:
                now = time.monotonic()
                timers = self._timers
                while timers and (timers[0][2].settled or timers[0][0] <= now):
                    _deadline, _n, task = heapq.heappop(timers)
                    if not task.settled:
                        self._settle_locked(task, "failed")
                        self._counts["timed_out"] += 1
                        expired.append(task)
                cancels, self._to_cancel = self._to_cancel, []
                for task in expired:
                    cancels.append(task.dask_future)
                    task.dask_future = None
                ready, self._ready = self._ready, []
                if cancels or expired or ready:
                    break
                if self._closed and not self._inflight:
                    return False
                self._changed.wait(timers[0][0] - now if timers else None)
        self._deliver_ready(ready)
        for task in expired:
            deliver(task.fut, task.callback, False, TaskTimeout(task.limit))
        self._cancel_on_scheduler(cancels)
        return True

    def _break(self, cause: BaseException) -> None:
        """The housekeeper failed: every task in flight fails with ``PoolBroken``,
        later submissions raise it, and the cluster the pool owns is closed."""
        log.error("%s: the housekeeper failed; the pool is broken", self.name, exc_info=cause)
        with self._lock:
            self._broken = cause
            self._closed = self._terminated = True
            tasks = list(self._inflight)
            cancels, self._to_cancel = self._to_cancel, []
            for task in tasks:
                self._settle_locked(task, "failed")
                if task.dask_future is not None:
                    cancels.append(task.dask_future)
                    task.dask_future = None
        for task in tasks:
            deliver(task.fut, task.callback, False, broken_error(self.name, cause))
        self._cancel_on_scheduler(cancels)

    def _cancel_on_scheduler(self, dask_futures: list) -> None:
        if not dask_futures:
            return
        try:
            self._client.cancel(dask_futures, reason="muxpool: cancelled, timed out or terminated")
        except Exception:  # the client may be closing; the futures die with it
            log.debug("%s: cancelling %d Dask futures failed", self.name, len(dask_futures),
                      exc_info=True)

    def _close_client_and_cluster(self) -> None:
        if self._owns_client:
            try:
                self._client.close()
            except Exception:
                log.warning("%s: closing the Dask client failed", self.name, exc_info=True)
        if self._cluster is not None:
            try:
                self._cluster.close()
            except Exception:
                log.warning("%s: closing the LocalCluster failed", self.name, exc_info=True)
