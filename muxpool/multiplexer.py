"""The one event loop: file descriptors, callbacks, ``defer()``, timers, stop.

Only the loop's own thread touches the poller: ``select.epoll`` itself (or
``select.poll`` where there is no epoll), not the ``selectors`` wrapper, whose
per-event key objects and list cost about a tenth of an echo's Python time.
Each registered fd has a callback ``fn(mask)``, run with the poller's own
event bits when the fd is ready (:data:`READ_EVENTS` and
:data:`WRITE_EVENTS` say what counts as readable and writable). Other threads hand
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
import select
import socket
import threading
import time
from typing import Callable

log = logging.getLogger("muxpool.multiplexer")

if hasattr(select, "epoll"):
    EVENT_READ, EVENT_WRITE = select.EPOLLIN, select.EPOLLOUT
    _ERROR_EVENTS = select.EPOLLERR | select.EPOLLHUP
else:  # poll(2)'s bits: the same values as epoll's on Linux
    EVENT_READ, EVENT_WRITE = select.POLLIN, select.POLLOUT
    _ERROR_EVENTS = select.POLLERR | select.POLLHUP
# An error or a hang-up is reported whatever was asked for: the callback must
# then read (to see EOF or the error) or write (to fail), as selectors does.
READ_EVENTS = EVENT_READ | _ERROR_EVENTS
WRITE_EVENTS = EVENT_WRITE | _ERROR_EVENTS
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


def _fd_of(fileobj) -> int:
    return fileobj if isinstance(fileobj, int) else fileobj.fileno()


class _Poll:
    """``select.poll`` with epoll's interface (seconds, ``close``): for platforms without epoll."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self.register, self.modify, self.unregister = (
            self._poll.register, self._poll.modify, self._poll.unregister)

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        return self._poll.poll(None if timeout is None else timeout * 1000)

    def close(self) -> None:
        pass


class Multiplexer:
    """An event loop over ``select.epoll`` (``select.poll`` elsewhere)."""

    EVENT_READ = EVENT_READ  # for code handed a multiplexer (metrics) that does not import this module

    def __init__(self) -> None:
        self._poller = select.epoll() if hasattr(select, "epoll") else _Poll()
        # fd -> callback; fd -> the object registered, to find a socket closed
        # before it was unregistered (its fileno() is -1 by then).
        self._callbacks: dict[int, Callable[[int], object]] = {}
        self._fileobjs: dict[int, object] = {}
        self._changed: set[int] = set()  # fds (un)registered during this batch: see _serve
        self._deferred: collections.deque[Callable[[], object]] = collections.deque()
        self._timers: list[tuple[float, int, Timer]] = []
        self._cancelled = 0  # cancelled handles still in the heap
        self._seq = itertools.count()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.register(self._wake_r, EVENT_READ, self._on_wakeup)
        self._running = False
        self._stopping = False
        self._wakeup_sent = False  # see defer()
        self._stale = False  # the batch in hand is older than the loop's state: see _serve
        # Who may touch loop state now: in_loop_thread() compares with it.
        self.thread_id: int | None = None
        self.runner_id: int | None = None  # the thread running the loop, handler calls included
        self.native_thread_id: int | None = None  # the kernel's id, for /proc
        self.driver = None  # an engine that runs the loop on its threads (engines.auto)
        self.yield_requested = False  # the driver wants the loop back at the next iteration
        # Odd while waiting in select() (or not running), even while running
        # callbacks: a watchdog thread reads it (muxpool.watchdog).
        self.ticks = 1
        # When the last poll returned: the time a batch's messages are stamped
        # with (Connection.last_active), one clock read per batch, not per message.
        self.now = time.monotonic()

    # --- registrations (loop thread only) ---------------------------------

    def register(self, fileobj, events: int, callback: Callable[[int], object]) -> None:
        """Run ``callback(mask)`` whenever ``fileobj`` (a socket or an fd) is ready
        for ``events``. ``KeyError`` if it is registered already."""
        fd = _fd_of(fileobj)
        if fd < 0:
            raise ValueError(f"cannot register {fileobj!r}: it is closed")
        if fd in self._callbacks:
            raise KeyError(f"{fileobj!r} (fd {fd}) is already registered")
        self._poller.register(fd, events)
        self._callbacks[fd] = callback
        self._fileobjs[fd] = fileobj
        self._changed.add(fd)

    def modify(self, fileobj, events: int, callback: Callable[[int], object]) -> None:
        fd = _fd_of(fileobj)
        if fd not in self._callbacks:
            raise KeyError(f"{fileobj!r} is not registered")
        self._poller.modify(fd, events)
        self._callbacks[fd] = callback

    def unregister(self, fileobj) -> None:
        fd = _fd_of(fileobj)
        if fd < 0:  # closed before it was unregistered: the kernel forgot it already
            fd = next((n for n, obj in self._fileobjs.items() if obj is fileobj), -1)
        if self._callbacks.pop(fd, None) is None:
            return  # already gone: closing twice is not an error
        del self._fileobjs[fd]
        self._changed.add(fd)
        try:
            self._poller.unregister(fd)
        except (OSError, ValueError):
            pass  # closed before it was unregistered

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
        """On the thread that runs the loop, and not inside a handler call the
        driver may move off it (auto's: the handler's ``conn.send`` defers then,
        as from a pool thread, so none can race a hand-off)."""
        return threading.get_ident() == self.thread_id and (self.driver is None
                                                            or not self.driver.in_call())

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
        so the rest of its batch of events is stale and is dropped (see _serve). ``ticks``
        moves either way (a watchdog must not take the new thread for a stuck
        one) and gets the parity of where the thread is: odd before select()."""
        self._own()
        if mid_iteration:
            self._stale = True
        odd = self.ticks % 2
        self.ticks += (1 if odd else 2) if mid_iteration else (2 if odd else 1)

    def serve(self) -> None:
        """The loop itself, on the calling thread (a driver's: see take_over)."""
        self._serve()

    def _serve(self) -> None:
        poll = self._poller.poll
        monotonic = time.monotonic
        callbacks = self._callbacks
        changed = self._changed
        get = callbacks.get
        while not self._stopping:
            # The driver's hand-back point: a thread whose handler call was handed
            # off waits for the loop; this thread parks (False: the loop is over).
            if self.yield_requested and not self.driver.yield_turn():
                return
            events = poll(self._timeout())
            self.now = monotonic()
            self.ticks += 1
            changed.clear()
            self._stale = False
            for fd, mask in events:
                # An earlier callback of this batch may have unregistered (and
                # closed) this fd, and an accept may have reused its number: the
                # event belongs to a registration that is gone. A batch left in a
                # handed-off call (auto) is stale once the loop comes back: the
                # rest of it is dropped. Either way nothing is lost: the poller
                # is level-triggered, so what is still ready is reported again.
                if changed and fd in changed:
                    continue
                callback = get(fd)
                if callback is None:
                    continue  # closed without unregister while another process holds it open
                try:
                    callback(mask)
                except Exception:
                    log.exception("callback for fd %s failed", fd)
                if self._stale:
                    break
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
        self._poller.close()
        self._callbacks.clear()
        self._fileobjs.clear()
        self._wake_r.close()
        self._wake_w.close()
