"""Unit tests for muxpool.multiplexer.Multiplexer, over real socketpairs.

Each test runs the loop on a thread of its own (the ``loop`` fixture) and talks
to it the way the server does: registrations and timers from the loop thread
(through ``defer``), ``defer`` and ``stop`` from anywhere. Nothing sleeps to
synchronise: results come back through events and futures with deadlines, and
"never happens" is checked after loop round trips that would have let it happen.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future

import pytest

from muxpool.multiplexer import EVENT_READ, EVENT_WRITE, READ_EVENTS, WRITE_EVENTS, Multiplexer

pytestmark = pytest.mark.timeout(30)

DEADLINE = 5.0  # seconds: what any single wait here may take before the test fails


class LoopThread:
    """A Multiplexer running on a thread; what run() raised, if anything, in ``error``."""

    def __init__(self, mux: Multiplexer | None = None) -> None:
        self.mux = mux or Multiplexer()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-multiplexer", daemon=True)

    def _run(self) -> None:
        try:
            self.mux.run()
        except BaseException as exc:  # reported to the test
            self.error = exc

    def start(self) -> LoopThread:
        self.thread.start()
        return self

    def call(self, fn, timeout: float = DEADLINE):
        """Run ``fn()`` on the loop thread and return its result (a round trip)."""
        future: Future = Future()

        def run():
            try:
                future.set_result(fn())
            except BaseException as exc:  # re-raised in the test
                future.set_exception(exc)

        self.mux.defer(run)
        return future.result(timeout=timeout)

    def round_trips(self, n: int = 2) -> None:
        """Let the loop go round ``n`` times: whatever was ready before now has been handled."""
        for _ in range(n):
            self.call(lambda: None)

    def finish(self) -> None:
        self.mux.stop()
        self.thread.join(DEADLINE)
        if self.thread.is_alive():  # leave it (a daemon) rather than close fds under it
            raise AssertionError("the loop did not stop")
        self.mux.close()


@pytest.fixture
def loop():
    lt = LoopThread().start()
    try:
        yield lt
    finally:
        lt.finish()
    assert lt.error is None, lt.error


@pytest.fixture
def pair():
    """A connected socketpair (non-blocking): ``(ours, peer)``; both closed afterwards."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def wait_until(predicate, timeout: float = DEADLINE, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)  # a poll with a deadline, not a synchronisation


def wait_until_idle(mux: Multiplexer) -> None:
    """Until the loop sleeps in select(): ticks odd and unchanged across a few polls."""
    seen, stable = None, 0
    deadline = time.monotonic() + DEADLINE
    while stable < 5:
        ticks = mux.ticks
        stable = stable + 1 if ticks == seen and ticks % 2 else 0
        seen = ticks
        if time.monotonic() > deadline:
            raise AssertionError(f"the loop never went idle (ticks {ticks})")
        time.sleep(0.001)


# --- defer -------------------------------------------------------------------


def test_defer_from_many_threads_runs_every_call_once_on_the_loop_thread_in_order_per_thread(loop):
    threads, per_thread = 8, 2000
    seen: dict[int, list[int]] = collections.defaultdict(list)
    where: set[int] = set()
    in_loop: set[bool] = set()
    done = threading.Event()
    count = [0]

    def record(sender: int, i: int) -> None:
        seen[sender].append(i)
        where.add(threading.get_ident())
        in_loop.add(loop.mux.in_loop_thread())
        count[0] += 1
        if count[0] == threads * per_thread:
            done.set()

    barrier = threading.Barrier(threads)

    def sender(n: int) -> None:
        barrier.wait(DEADLINE)
        for i in range(per_thread):
            loop.mux.defer(lambda i=i: record(n, i))

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: interleave the senders' defers
    workers = [threading.Thread(target=sender, args=(n,)) for n in range(threads)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join(DEADLINE)
        assert done.wait(DEADLINE), f"{count[0]} of {threads * per_thread} deferred calls ran"
    finally:
        sys.setswitchinterval(old_interval)
        barrier.abort()
        for w in workers:
            w.join(DEADLINE)
    assert where == {loop.thread.ident}
    assert in_loop == {True}
    assert loop.mux.in_loop_thread() is False  # and not from here
    assert sorted(seen) == list(range(threads))
    for n in range(threads):
        assert seen[n] == list(range(per_thread)), f"thread {n}'s calls ran out of order or twice"


def test_a_defer_that_lands_between_another_defers_append_and_its_check_still_wakes_the_loop(loop):
    """The interleaving of two threads deferring to an idle loop at once: A appends,
    B appends and checks the queue, then A checks. Replayed deterministically by a
    queue whose first append runs B's whole defer before returning to A. Each must
    not leave it to the other to wake the loop: the loop sleeps with no timeout."""
    ran = []
    both = threading.Event()

    def note(name):
        ran.append(name)
        if len(ran) == 2:
            both.set()

    class SwitchAfterFirstAppend(collections.deque):
        switched = False

        def append(self, fn):
            super().append(fn)
            if not self.switched:
                self.switched = True
                loop.mux.defer(lambda: note("B"))  # "thread B" runs here, before A looks

    loop.round_trips(1)
    loop.mux._deferred = SwitchAfterFirstAppend()  # swapped while the queue is empty
    wait_until_idle(loop.mux)
    loop.mux.defer(lambda: note("A"))
    assert both.wait(DEADLINE), f"only {ran} ran: the loop was never woken"
    assert ran == ["A", "B"]


def test_a_drain_runs_only_what_was_queued_so_a_call_that_defers_itself_cannot_starve_sockets(loop, pair):
    ours, peer = pair
    spins = [0]
    spinning = [True]
    readable = threading.Event()

    def spin():
        spins[0] += 1
        if spinning[0]:
            loop.mux.defer(spin)

    def on_read(mask):
        ours.recv(100)
        readable.set()

    loop.call(lambda: loop.mux.register(ours, EVENT_READ, on_read))
    loop.mux.defer(spin)
    wait_until(lambda: spins[0] > 100, what="the self-deferring call to run")
    peer.send(b"x")
    try:
        assert readable.wait(DEADLINE), "the socket was starved by the deferred call"
        assert spins[0] > 100
    finally:
        loop.call(lambda: spinning.__setitem__(0, False))


# --- timers ----------------------------------------------------------------------


def test_timers_fire_in_deadline_order_and_never_early(loop):
    delays = [i * 0.002 for i in range(15)] + [0.0] * 5  # the zeros tie: first scheduled, first run
    random.Random(13).shuffle(delays)
    fired: list[tuple[int, float]] = []
    done = threading.Event()

    def schedule():
        handles = []
        for index, delay in enumerate(delays):
            def fire(index=index):
                fired.append((index, time.monotonic()))
                if len(fired) == len(delays):
                    done.set()
            handles.append(loop.mux.call_later(delay, fire))
        return [(h.when, index) for index, h in enumerate(handles)]

    whens = loop.call(schedule)
    assert done.wait(DEADLINE), f"{len(fired)} of {len(delays)} timers fired"
    assert [index for index, _ in fired] == [index for _, index in sorted(whens)]
    for index, at in fired:
        assert at >= whens[index][0], f"timer {index} fired {whens[index][0] - at:.6f} s early"


def test_a_cancelled_timer_never_fires(loop):
    fired = []
    done = threading.Event()

    def schedule():
        early = loop.mux.call_later(0.01, lambda: fired.append("cancelled"))
        loop.mux.call_later(0.03, lambda: (fired.append("sentinel"), done.set()))
        early.cancel()
        early.cancel()  # twice: harmless
        return early

    early = loop.call(schedule)
    assert done.wait(DEADLINE)
    assert fired == ["sentinel"]
    assert early.cancelled


def test_a_timer_cancelled_by_one_due_at_the_same_time_does_not_fire(loop):
    fired = []
    done = threading.Event()

    def schedule():
        handles = {}
        handles["a"] = loop.mux.call_later(0.01, lambda: (fired.append("a"), handles["b"].cancel()))
        handles["b"] = loop.mux.call_later(0.01, lambda: fired.append("b"))
        loop.mux.call_later(0.02, lambda: (fired.append("sentinel"), done.set()))
        return handles

    handles = loop.call(schedule)
    assert done.wait(DEADLINE)
    assert fired == ["a", "sentinel"]
    assert handles["a"].when <= handles["b"].when


@pytest.mark.parametrize("live", [1, 1000])
def test_cancelled_timers_do_not_pile_up_behind_live_ones(live):
    """A connection arms a 300 s idle timer and cancels it when it closes: 10,000
    such connections behind long-lived ones must not leave 10,000 handles."""
    mux = Multiplexer()  # not running: the calling thread is the loop thread
    try:
        keep = [mux.call_later(300, lambda: None) for _ in range(live)]
        for _ in range(10_000):
            mux.call_later(300, lambda: None).cancel()
        assert live <= mux.pending_timers <= 2 * live + 130, mux.pending_timers
        assert not any(timer.cancelled for timer in keep)
        for timer in keep:
            timer.cancel()
        for _ in range(200):  # the next arms compact the heap again
            mux.call_later(300, lambda: None).cancel()
        assert mux.pending_timers <= 2 * live + 130
    finally:
        mux.close()


def test_timers_that_survive_a_compaction_still_fire_and_the_cancelled_ones_do_not(loop):
    fired = []
    done = threading.Event()

    def schedule():
        for i in range(500):
            keep = i % 50 == 0
            timer = loop.mux.call_later(0.01 + i * 0.0001, lambda i=i: fired.append(i))
            if not keep:
                timer.cancel()
        loop.mux.call_later(0.2, done.set)
        return loop.mux.pending_timers

    pending = loop.call(schedule)
    assert pending < 500, "nothing was compacted"
    assert done.wait(DEADLINE)
    assert fired == list(range(0, 500, 50))
    assert loop.call(lambda: loop.mux.pending_timers) == 0


def test_a_late_cancel_of_a_timer_that_already_fired_is_harmless(loop):
    fired = threading.Event()

    def arm():
        return loop.mux.call_later(0, fired.set)

    timer = loop.call(arm)
    assert fired.wait(DEADLINE)
    loop.call(timer.cancel)  # the usual pattern: a connection closes after its timer fired
    again = threading.Event()
    loop.call(lambda: loop.mux.call_later(0, again.set))
    assert again.wait(DEADLINE)
    assert loop.call(lambda: loop.mux.pending_timers) == 0


# --- stop --------------------------------------------------------------------------


def test_stop_from_another_thread_ends_run_promptly_even_with_a_timer_pending():
    lt = LoopThread().start()
    try:
        lt.call(lambda: lt.mux.call_later(300, lambda: None))
        wait_until_idle(lt.mux)
        started = time.monotonic()
        lt.mux.stop()
        lt.thread.join(DEADLINE)
        elapsed = time.monotonic() - started
        assert not lt.thread.is_alive()
        assert elapsed < 1.0, f"run() took {elapsed:.2f} s to return after stop()"
        assert lt.error is None
        assert lt.mux.ticks % 2 == 1  # not running: odd
    finally:
        lt.finish()


def test_a_stop_before_run_is_not_lost_and_a_stopped_loop_can_run_again():
    first = LoopThread()
    first.mux.stop()
    first.start()
    try:
        first.thread.join(DEADLINE)
        assert not first.thread.is_alive(), "run() missed the stop() made before it began"
        assert first.error is None
        # The same multiplexer again: that stop is spent, and it serves until the next.
        again = LoopThread(first.mux).start()
        try:
            assert again.call(lambda: "served") == "served"
            assert again.thread.is_alive()
        finally:
            again.finish()
        assert again.error is None
    finally:
        first.finish()


def test_stop_from_a_callback_ends_run_after_that_iteration(loop):
    loop.call(loop.mux.stop)
    loop.thread.join(DEADLINE)
    assert not loop.thread.is_alive()


# --- a callback that raises ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["deferred", "timer", "fd"])
def test_a_raising_callback_is_logged_and_the_loop_carries_on(kind, loop, pair, caplog):
    ours, peer = pair
    raised = threading.Event()

    def boom(*_args):
        if kind == "fd":
            ours.recv(100)
        raised.set()
        raise RuntimeError(f"boom from a {kind} callback")

    with caplog.at_level(logging.ERROR, logger="muxpool.multiplexer"):
        if kind == "deferred":
            loop.mux.defer(boom)
        elif kind == "timer":
            loop.call(lambda: loop.mux.call_later(0, boom))
        else:
            loop.call(lambda: loop.mux.register(ours, EVENT_READ, boom))
            peer.send(b"x")
        assert raised.wait(DEADLINE)
        assert loop.call(lambda: "still serving") == "still serving"
        assert loop.thread.is_alive()
    records = [r for r in caplog.records if r.name == "muxpool.multiplexer"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.ERROR
    assert records[0].exc_info[0] is RuntimeError
    assert f"boom from a {kind} callback" in str(records[0].exc_info[1])


def test_a_base_exception_from_a_callback_ends_run_and_leaves_ticks_odd():
    class Fatal(BaseException):
        pass

    def fatal():
        raise Fatal()

    lt = LoopThread().start()
    try:
        lt.mux.defer(fatal)
        lt.thread.join(DEADLINE)
        assert not lt.thread.is_alive()
        assert isinstance(lt.error, Fatal)
        assert lt.mux.ticks % 2 == 1
    finally:
        lt.finish()


# --- registrations -------------------------------------------------------------------


def test_a_registered_fd_calls_its_callback_on_the_loop_thread_with_the_mask(loop, pair):
    ours, peer = pair
    got: Future = Future()

    def on_read(mask):
        got.set_result((mask, ours.recv(100), loop.mux.in_loop_thread()))
        loop.mux.unregister(ours)

    loop.call(lambda: loop.mux.register(ours, EVENT_READ, on_read))
    loop.round_trips()
    assert not got.done(), "called before anything was readable"
    peer.send(b"ping")
    assert got.result(DEADLINE) == (EVENT_READ, b"ping", True)


def test_modify_swaps_the_events_and_the_callback(loop, pair):
    ours, peer = pair
    calls = []
    wrote, read = threading.Event(), threading.Event()

    def first(mask):
        calls.append(("first", mask))

    def on_write(mask):
        calls.append(("write", mask))
        loop.mux.modify(ours, EVENT_READ, on_read)
        wrote.set()

    def on_read(mask):
        calls.append(("read", mask))
        ours.recv(100)
        read.set()

    loop.call(lambda: loop.mux.register(ours, EVENT_READ, first))
    loop.call(lambda: loop.mux.modify(ours, EVENT_WRITE, on_write))  # writable at once
    assert wrote.wait(DEADLINE)
    peer.send(b"x")
    assert read.wait(DEADLINE)
    loop.round_trips()
    assert calls == [("write", EVENT_WRITE), ("read", EVENT_READ)]


def test_after_unregister_the_callback_never_runs(loop, pair):
    ours, peer = pair
    calls = []
    loop.call(lambda: loop.mux.register(ours, EVENT_READ, calls.append))
    loop.call(lambda: loop.mux.unregister(ours))
    peer.send(b"x")  # readable now, and stays so: nobody reads it
    loop.round_trips(3)
    assert calls == []


def test_unregister_in_a_callback_stops_another_fd_ready_in_the_same_batch(loop):
    """Two fds ready in one select(): the first callback to run unregisters and closes
    the other, whose callback must then not run (on a closed socket, or on an fd
    number a new socket has taken meanwhile)."""
    (a1, b1), (a2, b2) = socket.socketpair(), socket.socketpair()
    calls = []
    others = {}

    def make(name, sock):
        def callback(mask):
            calls.append(name)
            loop.mux.unregister(sock)  # once is enough
            other = others[name]
            loop.mux.unregister(other)
            other.close()
        return callback

    others.update({"one": a2, "two": a1})
    try:
        def arm():  # both readable before the loop's next select()
            b1.send(b"x")
            b2.send(b"x")
            loop.mux.register(a1, EVENT_READ, make("one", a1))
            loop.mux.register(a2, EVENT_READ, make("two", a2))

        loop.call(arm)
        wait_until(lambda: calls, what="a callback")
        loop.round_trips(3)
        assert len(calls) == 1, f"both ran: {calls}"
    finally:
        for s in (a1, b1, a2, b2):
            s.close()


def _two_ready(loop, on_first):
    """Two socketpairs whose read ends are ready in one select(); the first callback
    to run calls ``on_first(the_other_pair)`` and defers a marker, which runs once
    that iteration is over. Returns, once the loop has gone round, the callbacks
    that ran as (name, whether that iteration was over) in order."""
    pairs = {"one": socket.socketpair(), "two": socket.socketpair()}
    calls, iteration_over = [], []

    def make(name, other):
        def callback(mask):
            calls.append((name, bool(iteration_over)))
            data = pairs[name][0].recv(16)
            assert data, "a callback ran on a stale event: nothing to read"
            if len(calls) == 1:
                on_first(pairs[other])
                loop.mux.defer(lambda: iteration_over.append(True))
        return callback

    try:
        def arm():  # both readable before the loop's next select()
            for name, other in (("one", "two"), ("two", "one")):
                pairs[name][1].send(b"x")
                pairs[name][0].setblocking(False)
                loop.mux.register(pairs[name][0], EVENT_READ, make(name, other))

        loop.call(arm)
        wait_until(lambda: calls, what="a callback")
        loop.round_trips(3)
        return calls
    finally:
        loop.call(lambda: [loop.mux.unregister(a) for a, _b in pairs.values()])
        for a, b in pairs.values():
            a.close()
            b.close()


def test_a_batch_resumed_after_a_hand_off_drops_its_stale_events(loop):
    """auto's case: a thread gets the loop back inside a callback it was handed off
    in (take_over(mid_iteration=True)); meanwhile another thread served the other
    fd of its batch. That event is stale: its callback must not run on it."""
    def served_elsewhere_then_resumed(other):
        other[0].recv(16)  # what the thread that had the loop meanwhile did
        loop.mux.take_over(mid_iteration=True)

    calls = _two_ready(loop, served_elsewhere_then_resumed)
    assert len(calls) == 1, f"the stale event's callback ran: {calls}"


def test_what_a_dropped_batch_left_ready_is_reported_again(loop):
    """Level-triggered: dropping the rest of a resumed batch loses nothing."""
    calls = _two_ready(loop, lambda other: loop.mux.take_over(mid_iteration=True))
    assert len(calls) == 2, calls
    assert calls[1][1], f"the other fd ran in the same, stale, batch: {calls}"


def test_modify_in_a_callback_retires_the_old_callback_for_the_rest_of_the_batch(loop):
    """The first callback to run swaps the other fd's callback: the old one must not
    run for the event already in this batch; the new one gets it (level-triggered)."""
    (a1, b1), (a2, b2) = socket.socketpair(), socket.socketpair()
    calls = []
    replaced = threading.Event()

    def make(name, sock, other):
        def callback(mask):
            calls.append(name)
            sock.recv(100)
            loop.mux.unregister(sock)
            loop.mux.modify(other, EVENT_READ, replacement(other))
        return callback

    def replacement(sock):
        def callback(mask):
            calls.append("replacement")
            sock.recv(100)
            loop.mux.unregister(sock)
            replaced.set()
        return callback

    try:
        def arm():
            b1.send(b"x")
            b2.send(b"x")
            loop.mux.register(a1, EVENT_READ, make("one", a1, a2))
            loop.mux.register(a2, EVENT_READ, make("two", a2, a1))

        loop.call(arm)
        assert replaced.wait(DEADLINE)
        loop.round_trips(2)
        assert len(calls) == 2 and calls[1] == "replacement", calls
    finally:
        for s in (a1, b1, a2, b2):
            s.close()


def test_an_fd_number_reused_within_a_batch_does_not_get_the_closed_sockets_event(loop):
    """The first callback closes the other ready socket and registers a new one on
    the very same fd number (what an accept does): the event already in the batch
    was the old socket's, and must not reach the new callback."""
    (a1, b1), (a2, b2) = socket.socketpair(), socket.socketpair()
    calls, reused = [], []
    fired = threading.Event()

    def make(name, sock, other):
        def callback(mask):
            calls.append(name)
            fired.set()
            sock.recv(100)
            loop.mux.unregister(sock)
            number = other.fileno()
            loop.mux.unregister(other)
            other.close()
            twin, twin_peer = socket.socketpair()  # a quiet socket...
            if twin.fileno() != number:  # ... on the old number (the kernel's lowest free, or forced)
                os.dup2(twin.fileno(), number)
                twin.close()
                twin = socket.socket(fileno=number)
            reused.extend([twin, twin_peer])
            loop.mux.register(twin, EVENT_READ, lambda mask: calls.append(f"reused fd {number}"))
        return callback

    try:
        def arm():  # both readable before the loop's next poll
            b1.send(b"x")
            b2.send(b"x")
            loop.mux.register(a1, EVENT_READ, make("one", a1, a2))
            loop.mux.register(a2, EVENT_READ, make("two", a2, a1))

        loop.call(arm)
        assert fired.wait(DEADLINE)
        loop.round_trips(3)
        assert len(calls) == 1, f"the new socket got the old one's event: {calls}"
        loop.call(lambda: loop.mux.unregister(reused[0]))
    finally:
        for s in (a1, b1, a2, b2, *reused):
            s.close()


def test_a_peer_that_resets_wakes_a_callback_that_asked_only_to_write(loop):
    """An error is reported whatever was asked for: it reads as writable (and
    readable), so a connection waiting to write learns that its peer is gone."""
    ours, peer = socket.socketpair()
    try:
        ours.setblocking(False)
        while True:  # fill our send buffer: no longer writable
            try:
                ours.send(b"x" * 65536)
            except BlockingIOError:
                break
        masks = []
        got = threading.Event()

        def on_ready(mask):
            masks.append(mask)
            loop.mux.unregister(ours)
            got.set()

        loop.call(lambda: loop.mux.register(ours, EVENT_WRITE, on_ready))
        peer.close()  # unread data: the kernel resets
        assert got.wait(DEADLINE)
        assert masks[0] & WRITE_EVENTS and masks[0] & READ_EVENTS, masks
    finally:
        ours.close()
        peer.close()


def test_registering_an_fd_twice_is_refused_and_unregistering_twice_is_not_an_error(loop, pair):
    ours, _peer = pair
    loop.call(lambda: loop.mux.register(ours, EVENT_READ, lambda mask: None))
    with pytest.raises(KeyError):
        loop.call(lambda: loop.mux.register(ours, EVENT_READ, lambda mask: None))
    loop.call(lambda: loop.mux.unregister(ours))
    loop.call(lambda: loop.mux.unregister(ours))  # closing twice is not an error


def test_unregistering_a_socket_closed_while_registered_is_not_an_error(loop):
    ours, peer = socket.socketpair()
    try:
        loop.call(lambda: loop.mux.register(ours, EVENT_READ, lambda mask: None))
        ours.close()
        loop.call(lambda: loop.mux.unregister(ours))
        # Its fd number is free again: a new socket that takes it registers cleanly.
        again, peer2 = socket.socketpair()
        try:
            got = threading.Event()
            loop.call(lambda: loop.mux.register(again, EVENT_READ, lambda mask: got.set()))
            peer2.send(b"x")
            assert got.wait(DEADLINE)
            loop.call(lambda: loop.mux.unregister(again))
        finally:
            again.close()
            peer2.close()
    finally:
        ours.close()
        peer.close()


# --- ticks (the loop watchdog's view) -----------------------------------------------------


def test_ticks_are_odd_while_waiting_and_even_inside_every_kind_of_callback(loop, pair):
    ours, peer = pair
    inside: dict[str, int] = {}
    got_fd, got_timer = threading.Event(), threading.Event()

    def on_read(mask):
        ours.recv(100)
        inside["fd"] = loop.mux.ticks
        loop.mux.unregister(ours)
        got_fd.set()

    def on_timer():
        inside["timer"] = loop.mux.ticks
        got_timer.set()

    inside["deferred"] = loop.call(lambda: loop.mux.ticks)
    loop.call(lambda: loop.mux.register(ours, EVENT_READ, on_read))
    peer.send(b"x")
    loop.call(lambda: loop.mux.call_later(0, on_timer))
    assert got_fd.wait(DEADLINE) and got_timer.wait(DEADLINE)
    assert {kind: ticks % 2 for kind, ticks in inside.items()} == {"deferred": 0, "fd": 0, "timer": 0}
    wait_until_idle(loop.mux)  # odd while in select()
    before = loop.mux.ticks
    loop.round_trips(1)
    assert loop.mux.ticks >= before + 2, "an iteration counts twice"


def test_ticks_stand_still_and_even_while_a_callback_blocks(loop):
    """What the watchdog reads as "stuck in a callback"."""
    entered, release = threading.Event(), threading.Event()

    def block():
        entered.set()
        release.wait(DEADLINE)

    loop.mux.defer(block)
    try:
        assert entered.wait(DEADLINE)
        first = loop.mux.ticks
        loop.mux.defer(lambda: None)  # a wakeup cannot move it while the callback runs
        second = loop.mux.ticks
        assert first == second and first % 2 == 0, (first, second)
    finally:
        release.set()
    loop.round_trips(1)
    wait_until_idle(loop.mux)


def test_ticks_are_odd_before_run():
    mux = Multiplexer()
    try:
        assert mux.ticks % 2 == 1
    finally:
        mux.close()


# --- wakeup_fd -----------------------------------------------------------------------------


def test_a_byte_written_to_the_wakeup_fd_wakes_an_idle_loop(loop):
    fd = loop.mux.wakeup_fd()
    assert os.get_blocking(fd) is False  # signal.set_wakeup_fd requires it
    wait_until_idle(loop.mux)  # no timers: it would sleep forever
    before = loop.mux.ticks
    os.write(fd, b"\0")
    wait_until(lambda: loop.mux.ticks > before, what="the loop to wake")
    wait_until_idle(loop.mux)
    assert loop.call(lambda: "served") == "served"


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs SIGUSR1")
def test_a_signal_wakes_the_loop_through_set_wakeup_fd(loop):
    got = []
    old_handler = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    old_fd = signal.set_wakeup_fd(loop.mux.wakeup_fd())
    try:
        wait_until_idle(loop.mux)
        before = loop.mux.ticks
        signal.raise_signal(signal.SIGUSR1)
        wait_until(lambda: loop.mux.ticks > before, what="the signal to wake the loop")
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGUSR1, old_handler)
    assert got == [signal.SIGUSR1]
