"""The auto engine's parts: its threads' mailboxes, its memory of blocking
handlers, its monitor's sampling, its inline path (its connections'
``handle_inline``), and what it does to a connection around a call (as
Connection._call_done does: write the reply or close, then the next)."""

from __future__ import annotations

import threading
import time

from ..calls import frame_reply
from ..errors import ProtocolError
from ..stats import handler_failed as count_failure

_IDLE_PERIOD = 0.01  # s between samples, at most, while no call runs (Go's sysmon: 10 ms)
_CPU_HANDOFF = 0.05  # s a call busy on the CPU runs before it is handed off all the same
_FIRST_NEEDED = 8  # quick calls in a row that forgive a handler caught blocking once
MOST_NEEDED = 1024  # ... however often it was caught
LOOP, EXIT = "loop", "exit"
current = threading.local()  # .slot: the engine thread's own Slot (AutoEngine.in_call)


class LoopGone(BaseException):
    """The loop stopped while this thread's handed-off call ran: drop its result."""


class Slot:
    """One engine thread's mailbox: the task it is given, and its wake-up; and,
    while it runs the loop, the call in progress (see auto's module)."""

    __slots__ = ("task", "wake", "calling", "conn", "check", "stuck")

    def __init__(self, task=None):
        self.task = task
        self.wake = threading.Event()
        self.calling = 0  # the number of this thread's handler call on the loop (0: none)
        self.conn = None  # ... and its connection (busy from the hand-off on)
        self.check = False  # the monitor may have taken the call: ask it (AutoEngine.verdict)
        self.stuck = 0  # the call the monitor found no thread to take over


class Memory:
    """What the engine knows of one handler caught blocking (see auto's Memory)."""

    __slots__ = ("blocking", "needed", "streak")

    def __init__(self):
        self.blocking, self.needed, self.streak = True, _FIRST_NEEDED, 0

    def returned(self, quickly: bool) -> None:
        """A call of it, on a thread, returned: ``needed`` quick ones in a row forgive it."""
        if self.blocking:
            self.streak = self.streak + 1 if quickly else 0
            self.blocking = self.streak < self.needed

    def caught(self) -> None:
        """Caught blocking again; if it was forgiven, forgive it later next time."""
        if not self.blocking:
            self.blocking, self.streak = True, 0
            self.needed = min(self.needed * 2, MOST_NEEDED)


def watch(engine) -> None:
    """The monitor (run()'s caller): sample the owner's call until the loop ends;
    hand off one that has run handoff_after mostly off the CPU.

    A sample that finds a call of an iteration it had not seen (``calling``
    holds the loop's tick) times that iteration: the next comes
    handoff_after later, so an iteration held up by a call that blocks is
    handed off (in whichever call then runs) between one and two
    handoff_after after it was first seen. A sample that finds none (the loop in select, or
    between calls: most of an echo server's time) doubles the wait, up to
    ``_IDLE_PERIOD``, which bounds how late a call is first seen. Each sample
    costs: the thread's wake-up (about 40 us of CPU on a VM) and the GIL,
    taken from the loop; at one sample per handoff_after / 2, always, echo
    lost measurably to ``loop``."""
    fastest = max(engine.handoff_after, 0.0002)
    period, seen, seen_at, seen_cpu = fastest, 0, 0.0, 0.0
    ended = engine._ended
    # time.sleep, not ended.wait(period): a timed Event.wait allocates and
    # juggles locks in Python, and costs the loop about 1% at 100 samples a
    # second; the end is seen one period late at most.
    while not ended.is_set():
        time.sleep(period)
        owner = engine._owner_slot
        calling, now = owner.calling, time.monotonic()
        if not calling or ended.is_set():
            period = max(fastest, min(period * 2, _IDLE_PERIOD))
            continue
        period = fastest
        if calling != seen:
            seen, seen_at, seen_cpu = calling, now, _cpu(engine.mux.runner_id)
            continue
        ran = now - seen_at
        if ran >= engine.handoff_after and (ran >= _CPU_HANDOFF
                                            or _cpu(engine.mux.runner_id) - seen_cpu < ran / 2):
            engine._hand_off(owner, calling)


def _cpu(runner_id) -> float:
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(runner_id))
    except (AttributeError, OSError, TypeError):
        return 0.0  # no per-thread clock: every long call counts as blocked


def reply(conn, ok, value) -> bool:
    """Write the reply; False: the call failed or its reply cannot be framed (closing)."""
    if not ok:
        conn.busy = False
        conn.call_failed(value)
        return False
    if value is not None and not conn.closed:
        data = frame_reply(conn.encode, value, conn.peer, conn_id=conn.id)
        if data is None:
            conn.busy = False
            count_failure(conn)
            conn.close_when_done(drop_backlog=True)
            return False
        conn.write(data)
    return True


def settle(conn) -> None:
    """What Connection._call_done does after a call: the next one, or finish."""
    conn.busy = False
    if conn.held:
        return  # flush() answers them, then the backlog, in order
    conn.after_call()


def to_backlog(conn, on_message, messages) -> None:
    """Ahead of the backlog (it holds what arrived after them); they run
    through the engine, and _call_done counts them again."""
    if conn.counted:
        conn.messages -= len(messages)
    conn.backlog.extendleft((on_message, message) for message in reversed(messages))
    conn.backlog_bytes += sum(map(len, messages))


def inline_path(engine):
    """The auto engine's Connection.handle_inline (the server makes it its
    connections' method), and the function that binds it to the engine's
    multiplexer (at start): loop's fast path, each call guarded.

    One function, written out (as Connection.handle_inline is): each
    helper call, attribute or check per message cost requests/s against
    ``loop``; what does not change once the engine starts (the
    multiplexer, its deferred queue, the memory) is a closure's cell, not
    an attribute read per read. The guard per call is the loop's tick
    stored and cleared and a flag read: no lock (see auto's module)."""
    memory = engine._memory
    mux = deferred = None

    def bind(multiplexer) -> None:
        nonlocal mux, deferred
        mux, deferred = multiplexer, multiplexer._deferred

    def handle_inline(conn, messages: list) -> None:
        on_message = conn.session.on_message
        if memory and engine.threads > 1:  # (one thread: nowhere else to go)
            known = memory.get(getattr(on_message, "__func__", on_message))
            if known is not None and known.blocking:
                engine._to_threads(conn, on_message, messages)
                return
        slot = engine._owner_slot
        pending = len(deferred) if deferred else 0
        number = mux.ticks  # this iteration's calls: the monitor times them as one run
        slot.conn = conn
        waiting = iter(messages)  # what is left of them once one call goes off the fast path
        for message in waiting:
            slot.calling = number  # conn.send/close defer meanwhile (AutoEngine.in_call)
            try:
                value = on_message(conn, message)
            except (Exception, SystemExit) as exc:  # sys.exit() in a handler ends that call, not the server
                slot.calling = 0
                if slot.check or (deferred and len(deferred) != pending):
                    off_fast_path(engine, conn, on_message, list(waiting), False, exc, slot, number)
                else:  # closed at once, as on loop
                    conn.call_failed(exc)
                return
            slot.calling = 0
            # The call deferred something (a conn.send): nothing had been, nearly always.
            if slot.check or (deferred and len(deferred) != pending):
                off_fast_path(engine, conn, on_message, list(waiting), True, value, slot, number)
                return
            if value is not None and not conn.closed:
                try:
                    data = conn.encode(value)
                except (ProtocolError, TypeError) as exc:
                    conn.reply_refused(exc)
                    return
                conn.write(data)
            if conn.closing or conn.closed:
                return  # the handler closed it: the rest of this read is dropped
            # A slow reader: flush() runs the rest.
            if conn.outbuf and len(conn.outbuf) > conn.config.write_high_water:
                conn.held = list(waiting)
                return

    return handle_inline, bind


def off_fast_path(engine, conn, on_message, rest, ok, value, slot, number) -> None:
    """Call ``number`` blocked (handed off or not) or deferred something
    (or failed after either): its reply goes after what it sent, the rest of the read after
    the reply, ahead of the backlog (where a close can drop them or not)."""
    handed, caught = engine.verdict(slot, number) if slot.check else (False, False)
    if handed:
        engine._reclaim(slot)  # the monitor marked the connection busy as it took the loop
    else:
        conn.busy = True
    if caught:
        engine._caught(getattr(on_message, "__func__", on_message))
    to_backlog(conn, on_message, rest)
    engine._in_flight += 1
    engine.mux.defer(lambda: engine._resume(conn, ok, value))
