"""The one selectors loop: file descriptors, callbacks, ``defer()``, timers, stop.

Only the loop's own thread touches the selector. Each registration's ``data``
is the callback ``fn(mask)`` to run when the fd is ready. Other threads hand
work to the loop with :meth:`Multiplexer.defer`, which queues the function and
writes one byte to a wakeup socketpair — but only when no wakeup is already
on its way, so a burst of replies costs one wakeup. Each drain runs at most
the functions that were queued when it started, so a thread that defers in a
tight loop cannot starve the sockets. Stopping uses the same wakeup: nothing polls.

Timers are a heap of ``(when, seq, handle)``; a cancelled handle stays in the
heap and is skipped when it comes due, which keeps ``cancel`` O(1). Cancelled
handles behind a live one would otherwise stay for their whole delay (an idle
timer of 300 s per closed connection, behind a long-lived connection's), so
the heap is rebuilt without them once they are over half of it, as asyncio does.

A signal arriving on any thread wakes the loop: :meth:`Multiplexer.wakeup_fd`
is the descriptor to hand to ``signal.set_wakeup_fd``.

The loop's thread may change while it runs: an engine that sets ``driver``
(``auto``) runs the loop on threads of its own, one at a time, and moves it
from a thread stuck in a handler to another (:meth:`take_over`). ``run()``'s
caller then only waits (``driver.drive``); ``thread_id``, ``runner_id`` and
``ticks`` always describe whichever thread runs the loop now.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from typing import Callable

log = logging.getLogger("muxpool.multiplexer")

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE
_COMPACT_AT = 64  # cancelled handles: below this, rebuilding the heap is not worth it


class Timer:
    """A handle for a pending :meth:`Multiplexer.call_later`; ``cancel()`` it."""

    __slots__ = ("when", "fn", "cancelled", "_mux")

    def __init__(self, when: float, fn: Callable[[], object], mux: "Multiplexer | None" = None):
        self.when = when
        self.fn = fn
        self.cancelled = False
        self._mux = mux  # None once the timer has left the heap

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        self.fn = None
        if self._mux is not None:
            self._mux._cancelled += 1


class Multiplexer:
    """An event loop over ``selectors.DefaultSelector`` (epoll on Linux)."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._deferred: collections.deque[Callable[[], object]] = collections.deque()
        self._timers: list[tuple[float, int, Timer]] = []
        self._cancelled = 0  # cancelled handles still in the heap
        self._seq = itertools.count()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, EVENT_READ, self._on_wakeup)
        self._running = False
        self._stopping = False
        self._wakeup_sent = False  # see defer()
        self._keys_changed = False  # a callback modified or unregistered an fd: see run()
        # Who may touch loop state now: in_loop_thread() compares with it. None
        # while an auto handler call runs on the loop thread (it may be handed off).
        self.thread_id: int | None = None
        self.runner_id: int | None = None  # the thread running the loop, handler calls included
        self.native_thread_id: int | None = None  # the kernel's id, for /proc
        self.driver = None  # an engine that runs the loop on its threads (engines.auto)
        self.yield_requested = False  # the driver wants the loop back at the next iteration
        # Odd while waiting in select() (or not running), even while running
        # callbacks: a watchdog thread reads it (muxpool.watchdog).
        self.ticks = 1

    # --- registrations (loop thread only) ---------------------------------

    def register(self, fileobj, events: int, callback: Callable[[int], object]) -> None:
        self._selector.register(fileobj, events, callback)

    def modify(self, fileobj, events: int, callback: Callable[[int], object]) -> None:
        self._selector.modify(fileobj, events, callback)
        self._keys_changed = True

    def unregister(self, fileobj) -> None:
        try:
            self._selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass  # already gone: closing twice is not an error
        self._keys_changed = True

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` after this iteration's callbacks (loop thread only): a
        :meth:`defer` without the wakeup byte, which the loop does not need."""
        self._deferred.append(fn)

    def call_later(self, delay: float, fn: Callable[[], object]) -> Timer:
        timer = Timer(time.monotonic() + delay, fn, self)
        timers = self._timers
        heapq.heappush(timers, (timer.when, next(self._seq), timer))
        if self._cancelled > _COMPACT_AT and 2 * self._cancelled > len(timers):
            self._compact_timers()
        return timer

    def _compact_timers(self) -> None:
        live = [entry for entry in self._timers if not entry[2].cancelled]
        for _when, _seq, timer in self._timers:
            if timer.cancelled:
                timer._mux = None
        heapq.heapify(live)
        self._timers[:] = live  # in place: the loop may be iterating over this very list
        self._cancelled = 0

    @property
    def pending_timers(self) -> int:
        """Timer handles in the heap, cancelled ones included (for tests and stats)."""
        return len(self._timers)

    def wakeup_fd(self) -> int:
        """The descriptor whose write wakes the loop (for ``signal.set_wakeup_fd``)."""
        return self._wake_w.fileno()

    def in_loop_thread(self) -> bool:
        return threading.get_ident() == self.thread_id

    # --- from any thread --------------------------------------------------

    def defer(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` on the loop thread soon. Safe from any thread."""
        self._deferred.append(fn)
        # Append first, then look. "Was fn alone in the queue?" is not enough:
        # two threads can both append before either looks, both see two, and
        # neither wakes a sleeping loop. So look at a flag instead: it is set by
        # whoever sends the wakeup byte, and cleared by the loop just before it
        # reads the queue; a set flag means that read is still to come, and it
        # will find fn. A burst of defers still costs one wakeup.
        if not self._wakeup_sent:
            self._wakeup_sent = True
            self._wake()

    def stop(self) -> None:
        """Make :meth:`run` return after the current iteration. Safe from any thread."""
        self._stopping = True
        self._wake()

    def wake(self) -> None:
        """End the loop's current wait in select(). Safe from any thread."""
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wakeup is already pending, or the loop is closed

    # --- the loop ----------------------------------------------------------

    def run(self) -> None:
        """Serve until :meth:`stop`. Callbacks that raise are logged, never fatal."""
        self._running = True
        try:
            if self.driver is not None:
                self.driver.drive(self)  # the loop runs on the driver's threads until it stops
            else:
                self._own()
                self._serve()
        finally:
            self._own()  # what follows the loop (closing everything) runs here
            self.ticks |= 1
            self._running = False
            self._stopping = False

    def _own(self) -> None:
        self.thread_id = self.runner_id = threading.get_ident()
        self.native_thread_id = threading.get_native_id()

    def take_over(self, mid_iteration: bool = False) -> None:
        """The calling thread runs the loop from now on (the driver decided so).

        ``mid_iteration``: it resumes an iteration it left in a handler call,
        so its batch of events is stale: each key is checked again. ``ticks``
        moves either way (a watchdog must not take the new thread for a stuck
        one) and gets the parity of where the thread is: odd before select()."""
        self._own()
        self._keys_changed = True
        odd = self.ticks % 2
        self.ticks += (1 if odd else 2) if mid_iteration else (2 if odd else 1)

    def serve(self) -> None:
        """The loop itself, on the calling thread (a driver's: see take_over)."""
        self._serve()

    def _serve(self) -> None:
        select = self._selector.select
        keys = self._selector.get_map()
        while not self._stopping:
            # The driver's hand-back point: a thread whose handler call was handed
            # off waits for the loop; this thread parks (False: the loop is over).
            if self.yield_requested and not self.driver.yield_turn():
                return
            events = select(self._timeout())
            self.ticks += 1
            self._keys_changed = False
            for key, mask in events:
                # An earlier callback of this batch may have unregistered
                # (and closed) this fd, or swapped its callback: the event
                # belongs to a registration that is gone.
                if self._keys_changed and keys.get(key.fd) is not key:
                    continue
                try:
                    key.data(mask)
                except Exception:
                    log.exception("callback for fd %s failed", key.fd)
            if self._timers:
                self._run_due_timers()
            self._wakeup_sent = False  # before the read of the queue: see defer()
            if self._deferred:
                self._run_deferred()
            self.ticks += 1

    def _timeout(self) -> float | None:
        if self._deferred:
            return 0
        timers = self._timers
        while timers and timers[0][2].cancelled:
            self._forget(heapq.heappop(timers)[2])
        if not timers:
            return None
        return max(0.0, timers[0][0] - time.monotonic())

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)[2]
            if timer.cancelled:
                self._forget(timer)
                continue
            fn, timer.fn = timer.fn, None
            timer._mux = None
            timer.cancelled = True
            try:
                fn()
            except Exception:
                log.exception("timer %r failed", fn)

    def _forget(self, timer: Timer) -> None:
        """A cancelled handle has left the heap."""
        if timer._mux is not None:
            timer._mux = None
            self._cancelled -= 1

    def _on_wakeup(self, mask: int) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _run_deferred(self) -> None:
        deferred = self._deferred
        for _ in range(len(deferred)):  # only what was queued when the drain began
            if not deferred:
                break  # another thread ran the loop meanwhile (a hand-off) and drained it
            fn = deferred.popleft()
            try:
                fn()
            except Exception:
                log.exception("deferred call %r failed", fn)

    def close(self) -> None:
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
