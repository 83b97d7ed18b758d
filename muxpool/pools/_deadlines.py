"""Deadlines: one daemon thread that runs an action when its deadline passes.

ThreadPool's ``task_timeout`` uses it: a thread cannot be stopped, so at the
deadline the task's future is failed with ``TaskTimeout`` from here, and the
thread runs on in the background. One thread and one heap serve every task of
a pool (a ``threading.Timer`` per task would cost a thread start each); a
cancelled entry stays in the heap, inert, until its time comes.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable

log = logging.getLogger("muxpool.pools")


class Deadlines:
    def __init__(self, name: str):
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[list] = []
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, delay: float, action: Callable[[], None]) -> list:
        """Run ``action`` in ``delay`` seconds; returns a handle for :meth:`cancel`."""
        entry = [time.monotonic() + delay, next(self._ids), action]
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"{self._name}-deadlines",
                                                daemon=True)
                self._thread.start()
            elif self._heap[0] is entry:
                self._cond.notify()
        return entry

    @staticmethod
    def cancel(entry: list) -> None:
        entry[2] = None

    def _run(self) -> None:
        """Fire due actions; the thread ends once the heap is empty (a later
        ``add`` starts another)."""
        while True:
            with self._cond:
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._thread = None
                    return
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                action = heapq.heappop(self._heap)[2]
            try:
                action()
            except BaseException:  # noqa: BLE001 - one bad action must not stop the others
                log.exception("%s: a deadline action failed", self._name)
