"""``auto``: handlers run inline on the loop until one blocks; then the loop moves.

Go's answer to "which engine?" (sysmon hands a blocked goroutine's scheduler
to another thread), made to fit a CPython loop. The calls cannot be moved,
so the *loop* is: a handler call runs on the loop thread, with ``loop``'s
fast path; when it has run ``handoff_after`` seconds off the CPU, another
thread takes the multiplexer over and serves every other connection; the
blocked thread finishes its call and gets the loop back (below). At most
``workers`` threads exist (the one running the loop included).

The threads. ``Multiplexer.run()``'s caller (the server thread) never runs
callbacks: it is the *monitor*. It samples the call in progress every
``handoff_after`` (backing off to ``_IDLE_PERIOD`` while it finds none: see
``watch``), and hands off a call that has run ``handoff_after`` while its
thread used under half of that on the CPU; a call busy on the CPU holds the
GIL, so no other thread could serve anyway (that is prefork's job), and is
handed off only after ``_CPU_HANDOFF``. The loop runs on the engine's
threads, one at a time: the *owner*. The others run calls of handlers known
to block (a queue, in order), wait blocked in a handed-off call, or stand by.

Exactly one owner. Before a call the owner stores the loop's tick
(``mux.ticks``, which moves with each iteration and each take-over) in
``slot.calling``: the calls of one iteration share it, so the monitor sees
whether the loop has moved on since its last sample, as Go's sysmon
compares a P's ``schedtick``; between calls, with ``calling`` cleared, it
hands nothing off. While it is set, ``conn.send``/``close``
from the handler defer, as from a pool thread (``in_call``, which
``mux.in_loop_thread`` asks), so none can race a hand-off. After the call
the owner clears ``calling`` and then reads ``slot.check``. The monitor, under ``_lock``,
raises ``check`` and then reads ``calling``: of two threads that each write
one field and then read the other's (one at a time, under the GIL), at least
one sees the other's write. So either the call had returned and the monitor
lowers the flag again and leaves the loop where it is, or the owner sees the
flag and asks the monitor, under the same lock, whether it is still the
owner (``verdict``). Nothing else decides, and a call the monitor never
flagged costs no lock.

Getting the loop back. A thread whose call was handed off still has the
loop's frames on its stack (select's batch, a read, a run of a backlog), so
it must not re-enter ``mux.serve()`` (each hand-off would add a stack) nor
unwind them (their ``finally`` blocks touch state). It asks for the loop
back instead (``mux.yield_requested``) and waits; the owner, at the top of
its next iteration, where its stack holds no loop state, hands it the loop
and stands by there, and the thread resumes its old iteration as if its call
had just been long (``take_over(mid_iteration=True)``: the rest of that stale
batch is dropped; what is still ready is reported again). Stacks stay one
loop frame deep.

Order. The connection whose call blocked is marked ``busy`` by the monitor
as it hands the call off (the fast path itself never sets it), and stays
busy until that call's reply is written on the loop: what it sends meanwhile waits in its backlog,
with the same backpressure as on ``threadpool``. A reply goes after what the
handler sent with ``conn.send`` (deferred), so when anything was deferred
during a call, the reply and the rest of that read follow through ``defer``.

Memory. A handler caught blocking (key: its function, so every connection
of a class shares it) sends its calls to threads at once. A count, not a
clock: it is forgiven after ``needed`` calls in a row return within
``handoff_after``, and ``needed`` doubles (to ``MOST_NEEDED``) each time it
is caught again. Evidence comes from calls, so a rarely called handler that
always blocks is not forgotten merely because time passed, and one that
blocks now and then stalls the loop for ``handoff_after`` ever more rarely.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from ..calls import call_handler, handler_thread
from ._auto_parts import (EXIT, LOOP, LoopGone, Memory, Slot, current, inline_path, reply, settle,
                          to_backlog, watch)
from .base import Engine
from .threadpool import DEFAULT_WORKERS

log = logging.getLogger("muxpool.server")


class AutoEngine(Engine):
    name = "auto"
    per_connection = False
    can_block = True
    inline = True

    def __init__(self, config):
        super().__init__(config)
        self.threads = config.workers or DEFAULT_WORKERS
        self.handoff_after = config.handoff_after
        self.mux = None
        self._lock = threading.Lock()
        self._owner_slot: Slot | None = None
        self._standby: list[Slot] = []
        self._reclaimers: collections.deque[Slot] = collections.deque()
        self._jobs: collections.deque = collections.deque()
        self._workers: list[threading.Thread] = []
        self._memory: dict = {}
        self._in_flight = 0  # results on their way to the loop (loop thread only)
        self._handed = 0  # handed-off calls not yet back on the loop
        self._running_jobs = 0
        self.handoffs = 0
        self._finished = False
        self._ended = threading.Event()
        # its connections' handle_inline (_auto_parts), bound to the multiplexer at start
        self.inline_method, self._bind_inline = inline_path(self)

    # --- the monitor: run()'s caller --------------------------------------------

    def start(self, mux) -> None:
        self.mux = mux
        self._bind_inline(mux)
        mux.driver = self

    def drive(self, mux) -> None:
        """Run the loop on a thread of ours; watch its calls until it stops."""
        with self._lock:
            self._owner_slot = self._spawn(Slot(LOOP))
        try:
            watch(self)
        except BaseException:  # Ctrl-C here, say: what follows run() must not race the loop
            mux.stop()
            self._ended.wait(self.config.drain_timeout)
            raise

    def _hand_off(self, owner: Slot, call: int) -> None:
        with self._lock:
            if self._owner_slot is not owner or self._finished:
                return
            # Flag the call, then see it still runs: the owner clears ``calling``
            # before it reads the flag, so one of the two sees the other.
            flagged, owner.check = owner.check, True
            if owner.calling != call:
                owner.check = flagged  # it returned: the owner keeps the loop
                return
            if self._reclaimers:  # its call is done: it resumes at once
                slot = self._reclaimers.popleft()
            elif self._standby:
                slot = self._standby.pop()
            elif len(self._workers) < self.threads:
                slot = None
            else:
                if owner.stuck != call:
                    owner.stuck = call
                    log.warning("all %d auto engine threads are blocked in handlers: the loop "
                                "waits for one (queued=%d)", self.threads, len(self._jobs))
                return
            if slot is None:
                slot = self._spawn(Slot(LOOP))
            else:
                slot.task = LOOP
                slot.wake.set()
            if owner.conn is not None:
                owner.conn.busy = True  # what it is sent meanwhile waits, in order
            self._owner_slot = slot
            self._handed += 1
            self.handoffs += 1

    def in_call(self) -> bool:
        """For Multiplexer.in_loop_thread: this thread is inside a handler call
        (on the loop, or handed off): what it does to the loop must defer."""
        slot = getattr(current, "slot", None)
        return slot is not None and slot.calling != 0

    def verdict(self, slot: Slot, number: int) -> tuple[bool, bool]:
        """The owner, after call ``number`` returned with its flag up:
        ``(handed, caught)``: was the loop taken from it, did it block at all."""
        with self._lock:
            slot.check = False
            handed = self._owner_slot is not slot
            return handed, handed or slot.stuck == number

    # --- the engine's threads -----------------------------------------------------

    def _spawn(self, slot: Slot) -> Slot:
        """Start a thread (under _lock) that begins with ``slot``'s task."""
        thread = threading.Thread(target=self._thread_main, args=(slot,), daemon=True,
                                  name=f"muxpool-auto-{len(self._workers) + 1}")
        self._workers.append(thread)
        thread.start()
        return slot

    def _thread_main(self, slot: Slot) -> None:
        handler_thread.active = True  # shutdown() from any call here must not wait for itself
        current.slot = slot
        try:
            while (task := self._next_task(slot)) is not EXIT:
                if task is LOOP:
                    self.mux.take_over()
                    self.mux.serve()
                    self._loop_over()
                    return
                self._run_job(task)
        except LoopGone:
            pass

    def _next_task(self, slot: Slot):
        """The loop, a queued call, or EXIT: what this thread does next."""
        while True:
            with self._lock:
                if slot.task is not None:
                    task, slot.task = slot.task, None
                    return task
                if self._finished:
                    return EXIT
                if self._jobs:
                    self._running_jobs += 1
                    return self._jobs.popleft()
                slot.wake.clear()
                self._standby.append(slot)
            slot.wake.wait()
            with self._lock:
                if slot in self._standby:
                    self._standby.remove(slot)

    def yield_turn(self) -> bool:
        """The owner, between iterations: give the loop to a thread whose handed-off
        call is done, and stand by here. False: the loop ended meanwhile."""
        mine = self._owner_slot
        with self._lock:
            if not self._reclaimers:
                self.mux.yield_requested = False
                return True
            slot = self._reclaimers.popleft()
            self.mux.yield_requested = bool(self._reclaimers)
            slot.task = LOOP
            self._owner_slot = slot
            slot.wake.set()
        while (task := self._next_task(mine)) is not EXIT:
            if task is LOOP:
                self.mux.take_over()
                return True
            self._run_job(task)
        return False

    def _reclaim(self, slot: Slot) -> None:
        """This thread's call was handed off and has returned: wait for the loop back."""
        with self._lock:
            if self._finished:
                raise LoopGone
            slot.task = None
            slot.wake.clear()
            self._reclaimers.append(slot)
            self.mux.yield_requested = True
        self.mux.wake()
        while True:
            slot.wake.wait()
            with self._lock:
                if slot.task is LOOP:
                    slot.task = None
                    self._handed -= 1
                    break
                if self._finished:
                    raise LoopGone
                slot.wake.clear()
        self.mux.take_over(mid_iteration=True)

    def _loop_over(self) -> None:
        with self._lock:
            self._finished = True
            for slot in [*self._standby, *self._reclaimers]:
                slot.wake.set()
        self._ended.set()

    def stop(self, wait: bool = True) -> None:
        self._loop_over()
        with self._lock:
            self._jobs.clear()  # their connections are closed
        if wait:
            deadline = time.monotonic() + self.config.drain_timeout
            for thread in list(self._workers):
                if thread is not threading.current_thread():
                    thread.join(max(0.0, deadline - time.monotonic()))

    # --- the owner: handler calls on the loop thread ---------------------------------

    def _inline_call(self, fn, conn, arg):
        """``fn(conn, arg)`` on the loop thread, handed off if it blocks:
        ``(ok, value, caught)``; caught: it blocked (handed off or not)."""
        slot = self._owner_slot
        slot.conn = None  # busy already (dispatch)
        slot.calling = number = self.mux.ticks
        try:
            value, ok = fn(conn, arg), True
        except (Exception, SystemExit) as exc:  # sys.exit() in a handler ends that call, not the server
            value, ok = exc, False
        slot.calling = 0
        handed, caught = self.verdict(slot, number) if slot.check else (False, False)
        if handed:
            self._reclaim(slot)
        return ok, value, caught

    def run(self, conn, fn, arg, done) -> None:
        key = getattr(fn, "__func__", fn)
        memory = self._memory.get(key)
        if memory is not None and memory.blocking and self.threads > 1:
            self._queue((conn, fn, arg, done, key))
            return
        deferred = self.mux._deferred
        pending = len(deferred)
        started = time.perf_counter()
        ok, value, caught = self._inline_call(fn, conn, arg)
        elapsed = time.perf_counter() - started
        if caught:
            self._caught(key)
        if caught or len(deferred) != pending:  # after what the handler sent
            self._in_flight += 1
            self.mux.defer(lambda: self._deliver(done, ok, value, elapsed))
        else:
            done(ok, value, elapsed)

    def _deliver(self, done, ok, value, elapsed) -> None:
        self._in_flight -= 1
        done(ok, value, elapsed)


    def _resume(self, conn, ok, value) -> None:
        """The loop, after a call that was handed off or deferred something."""
        self._in_flight -= 1
        reply(conn, ok, value)
        settle(conn)
        if conn.ctx.draining:
            conn.ctx.check_drained()

    # --- calls on threads ----------------------------------------------------------

    def _to_threads(self, conn, on_message, messages) -> None:
        to_backlog(conn, on_message, messages)
        conn.run_next()

    def _queue(self, job) -> None:
        self._in_flight += 1
        self._push(job)

    def spawn(self, fn, name: str) -> None:
        """A whole connection (a socketserver handler) on one of our threads."""
        self._push(fn)

    def _push(self, job) -> None:
        """Wake a standby thread for ``job``, or start one while under ``workers``."""
        with self._lock:
            self._jobs.append(job)
            if self._standby:
                self._standby.pop().wake.set()
            elif len(self._workers) < self.threads:
                self._spawn(Slot())

    def _run_job(self, job) -> None:
        try:
            if not isinstance(job, tuple):
                job()  # a socketserver connection, start to end
                return
            conn, fn, arg, done, key = job
            ok, value, elapsed = call_handler(fn, conn, arg)
            self.mux.defer(lambda: self._job_done(done, key, ok, value, elapsed))
        finally:
            with self._lock:
                self._running_jobs -= 1

    def _job_done(self, done, key, ok, value, elapsed) -> None:
        self._in_flight -= 1
        memory = self._memory.get(key)
        if memory is not None:
            memory.returned(elapsed < self.handoff_after)
        done(ok, value, elapsed)

    def _caught(self, key) -> None:
        memory = self._memory.get(key)
        if memory is None:
            self._memory[key] = Memory()
        else:
            memory.caught()

    # --- for the server --------------------------------------------------------------

    def idle(self) -> bool:
        return self._in_flight == 0 and self._handed == 0

    def queue_depth(self) -> int:
        return len(self._jobs)

    def stats(self) -> dict:
        """Threads and where they are; ``queued``: calls waiting for a thread."""
        with self._lock:
            return {"threads": len(self._workers), "most": self.threads,
                    "standby": len(self._standby), "blocked_handed_off": self._handed,
                    "running_calls": self._running_jobs, "queued": len(self._jobs),
                    "handoffs": self.handoffs,
                    "blocking_handlers": sum(m.blocking for m in self._memory.values())}

    def describe(self) -> str:
        return (f"handlers on the loop thread, up to {self.threads} threads take over from one "
                f"blocked {self.handoff_after * 1000:g} ms")
