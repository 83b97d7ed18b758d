"""ThreadPool: the lesson's hand-made thread pool, made correct and fast.

For I/O-bound work (the GIL lets one thread run Python at a time, but threads
blocked on I/O release it). Workers are threads started lazily; see
:mod:`muxpool.pools.queued` for how tasks and workers meet.
"""

from __future__ import annotations

from .queued import THREADS, QueuePool


class ThreadPool(QueuePool):
    """Up to ``max_workers`` threads, started only when needed.

    ``ThreadPool(5)`` and ``ThreadPool(5, 100)`` work positionally, as the
    lesson's did: the second number bounds the queue (``run``/``submit``
    block while it is full). Idle threads exit after ``idle_timeout`` seconds
    (``None``: never). Callbacks run on the worker thread that ran the task.
    """

    runtime = THREADS
    kind = "ThreadPool"
