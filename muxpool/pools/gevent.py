"""GeventPool: the pool API over greenlets (``pip install muxpool[gevent]``).

Greenlets suit many concurrent I/O waits in a gevent program. Like every
gevent object, the pool belongs to the thread whose hub runs it: submit from
greenlets of that thread. Its futures wait cooperatively, so ``fut.result()``
works without monkey-patching; ``concurrent.futures.wait``/``as_completed``
block the hub unless ``threading`` is monkey-patched.

``task_timeout`` interrupts the task's greenlet with ``TaskTimeout`` at the
deadline (at its next cooperative wait); the greenlet then serves on.
"""

from __future__ import annotations

from concurrent.futures import Future

from ..errors import MissingDependency, TaskTimeout

try:
    import gevent
    import gevent.event
    import gevent.lock
    import gevent.queue
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependency("GeventPool", "gevent") from exc

from ..gevent_signals import signals_wake_the_hub
from .base import AsyncFuture, deliver
from .queued import QueuePool, Runtime


class GeventFuture(Future):
    """A ``concurrent.futures.Future`` whose waits yield to the gevent hub."""

    def _wait_cooperatively(self, timeout: float | None) -> None:
        if self.done():
            return
        ready = gevent.event.Event()
        self.add_done_callback(lambda _f: ready.set())
        with signals_wake_the_hub():  # a Ctrl-C must end the wait, however it lands
            ready.wait(timeout)

    def result(self, timeout: float | None = None):
        self._wait_cooperatively(timeout)
        return super().result(timeout=0)

    def exception(self, timeout: float | None = None):
        self._wait_cooperatively(timeout)
        return super().exception(timeout=0)


class GeventAsyncFuture(AsyncFuture, GeventFuture):
    pass


def _start_greenlet(target, name):
    greenlet = gevent.spawn(target)
    greenlet.name = name
    return greenlet


GREENLETS = Runtime(
    make_queue=gevent.queue.Queue,
    make_semaphore=gevent.lock.Semaphore,
    make_event=gevent.event.Event,
    start_worker=_start_greenlet,
    empty=gevent.queue.Empty,
)


class GeventPool(QueuePool):
    """Up to ``max_workers`` greenlets, started only when needed."""

    runtime = GREENLETS
    kind = "GeventPool"
    future_class = GeventFuture
    async_future_class = GeventAsyncFuture

    def __init__(self, max_workers: int, max_queue: int | None = None, *,
                 idle_timeout: float | None = 10.0, task_timeout: float | None = None,
                 name: str | None = None):
        super().__init__(max_workers, max_queue, idle_timeout=idle_timeout,
                         task_timeout=task_timeout, name=name)

    def _run_with_deadline(self, tally, func, args, kwargs, fut, callback, limit) -> bool:
        """A greenlet can be interrupted: ``TaskTimeout`` is raised inside the task
        at its first cooperative wait past the deadline (a task that never yields
        cannot be interrupted, and nothing else runs meanwhile either)."""
        expired = TaskTimeout(limit)
        try:
            with gevent.Timeout(limit, expired):
                value = func(*args, **kwargs) if kwargs else func(*args)
        except BaseException as exc:  # noqa: BLE001 - delivered, not swallowed
            ok, value = False, exc
            if exc is expired:
                with self._lock:
                    self._timed_out += 1
        else:
            ok = True
        if ok:
            tally.completed += 1
        else:
            tally.failed += 1
        tally.current = None
        deliver(fut, callback, ok, value)
        return True
