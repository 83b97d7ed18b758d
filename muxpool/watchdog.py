"""A thread that says where the event loop is stuck, while it is stuck.

Every connection of a server waits on its one loop thread, so a handler that
blocks on the ``loop`` engine (a ``time.sleep``, a database call, a long
computation) stalls them all. ``handler_timeout`` can only act once such a
handler returns; this watchdog reports it as it happens, with the stack of
the blocked thread, so the log names the line to move to a blocking engine.

The loop counts its iterations twice, before and after each ``select()``
(:attr:`Multiplexer.ticks`: odd while waiting for events, even while running
callbacks). The watchdog samples that count; an even count that has not moved
for ``after`` seconds means the loop is stuck in a callback. That costs the
loop two integer increments per iteration and nothing per message. A loop
thread that cannot get the GIL (CPU-bound handler threads on ``threadpool``)
looks the same, and is reported too: its clients wait just as long. When
the watchdog itself did not run for a while (the whole process paused, on a
busy machine), the stall is not blamed on the loop. Nor is the time the loop
thread spent runnable but waiting for a CPU (Linux's per-thread schedstat):
on a machine with more busy threads than cores that is the machine's doing,
and no handler can be moved to fix it.

The gevent engine uses gevent's own monitor of its hub instead.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback

log = logging.getLogger("muxpool.server")

REPORT_EVERY = 10.0  # seconds: later stalls meanwhile are counted, not each logged


def run_queue_wait(native_thread_id: int | None) -> float:
    """Seconds the thread has spent runnable but waiting for a CPU, or 0.0
    where the kernel does not say (not Linux, no schedstat)."""
    if native_thread_id is None:
        return 0.0
    try:
        with open(f"/proc/{os.getpid()}/task/{native_thread_id}/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


class LoopWatchdog:
    """Logs a WARNING with the loop thread's stack when it stalls for ``after`` s."""

    def __init__(self, mux, after: float):
        self.mux = mux
        self.after = after
        self.stalls = 0  # stalls seen, reported or not
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="muxpool-loop-watchdog", daemon=True)

    def start(self) -> LoopWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _watch(self) -> None:
        # Sampling often keeps the report close to the threshold: a stall is
        # seen within ``after`` + ``period``.
        period = self.after / 10
        seen, seen_at, stalled = -1, 0.0, False
        waited_at_seen = 0.0  # the loop thread's run-queue wait when last seen moving
        last_report, unreported = -REPORT_EVERY, 0
        woke = time.monotonic()
        while not self._stop.wait(period):
            ticks, now = self.mux.ticks, time.monotonic()
            overslept, woke = now - woke > period + self.after / 2, now
            if overslept and not stalled:
                # This thread did not run either: the whole process was paused
                # (a busy machine, a debugger), which is not the loop's doing.
                seen, seen_at = ticks, now
                waited_at_seen = run_queue_wait(self.mux.native_thread_id)
                continue
            if ticks != seen or ticks % 2:  # moved, or waiting in select(): not stuck
                if stalled:
                    log.info("the event loop runs again, after %.2f s stuck", now - seen_at)
                seen, seen_at, stalled = ticks, now, False
                waited_at_seen = run_queue_wait(self.mux.native_thread_id)
                continue
            if stalled or now - seen_at < self.after:
                continue
            starved = run_queue_wait(self.mux.native_thread_id) - waited_at_seen
            if now - seen_at - starved < self.after:
                continue  # much of it was spent waiting for a CPU: keep watching
            stalled = True
            self.stalls += 1
            if now - last_report < REPORT_EVERY:
                unreported += 1
                continue
            self._report(now - seen_at, unreported)
            last_report, unreported = now, 0

    def _report(self, stuck_for: float, unreported: int) -> None:
        frame = sys._current_frames().get(self.mux.runner_id)
        where = "".join(traceback.format_stack(frame)[-12:]) if frame is not None else "(stack unavailable)\n"
        also = f" ({unreported} more stalls since the last report)" if unreported else ""
        log.warning("the event loop has been stuck for %.2f s, so every connection waits%s: a "
                    "handler that blocks belongs on a blocking engine (threadpool, threaded, "
                    "gevent). The loop thread is at:\n%s", stuck_for, also, where.rstrip())
