"""The threadpool engine hands calls and results over in batches: what that must keep.

Batching changes who wakes whom, so these tests aim where a batch could go wrong:
many connections pipelining (every reply, each connection's order), blocking
handlers sharing one batch (they must still spread over the threads), a handler
raising or overrunning handler_timeout amid the others' calls, and a stop while
calls wait for a thread. Real servers on loopback; waits are replies, events or
deadline-bound polls; every server and socket is closed in ``finally``.
"""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest
from support.servers import Peer
from support.waiting import wait_for

from muxpool import Server
from muxpool.engines import threadpool

DEADLINE = 10.0


class Echo:
    def on_message(self, conn, message):
        return b"echo " + message


class WaitForAll:
    """Each call waits at a barrier for ``parties`` calls in all: they only get
    past it if that many run at once, on as many threads."""

    def __init__(self, parties: int):
        self.barrier = threading.Barrier(parties, timeout=DEADLINE)

    def on_message(self, conn, message):
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            return b"alone " + message
        return b"together " + message


class Gate:
    """``b"hold"`` blocks until ``release`` is set; anything else is echoed."""

    def __init__(self):
        self.holding = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()  # a held call has returned

    def on_message(self, conn, message):
        if message == b"hold":
            self.holding.set()
            self.release.wait(DEADLINE)
            self.returned.set()
        elif message == b"boom":
            raise RuntimeError("boom requested by the test")
        return b"echo " + message


@contextlib.contextmanager
def serving(app, **options):
    srv = Server(app, port=0, engine="threadpool", framing="line", **options).start()
    peers: list[Peer] = []
    try:
        yield srv, lambda: peers.append(Peer(srv.address, "line")) or peers[-1]
    finally:
        release = getattr(app, "release", None)
        if release is not None:
            release.set()  # a held handler must not make the shutdown wait
        for peer in peers:
            peer.close()
        srv.shutdown(timeout=DEADLINE)


def test_every_pipelined_reply_arrives_in_each_connections_order():
    connections, depth = 40, 150
    with serving(Echo(), workers=8) as (srv, connect):
        peers = [connect() for _ in range(connections)]
        for index, peer in enumerate(peers):  # all sent before any is read: batches fill up
            peer.send(*(b"%d-%d" % (index, n) for n in range(depth)))
        for index, peer in enumerate(peers):
            replies = [peer.receive() for _ in range(depth)]
            assert replies == [b"echo %d-%d" % (index, n) for n in range(depth)]
        handlers = srv._engine._handlers
        calls = connections * depth
        # Per call, the old engine woke a worker and wrote a wakeup byte for the loop.
        assert handlers.wakeups < calls / 2, (handlers.wakeups, calls)
        assert handlers.deliveries < calls / 2, (handlers.deliveries, calls)


def test_blocking_calls_in_one_batch_spread_over_the_threads():
    # Eight calls that block until all eight run: if one worker took a batch and
    # ran it in turn, the first would wait at the barrier alone and fail it.
    parties = 8
    with serving(WaitForAll(parties), workers=parties) as (srv, connect):
        peers = [connect() for _ in range(parties)]
        for index, peer in enumerate(peers):
            peer.send(b"%d" % index)
        assert [peer.receive() for peer in peers] == [b"together %d" % i for i in range(parties)]


def test_a_blocked_call_does_not_hold_up_calls_queued_after_it():
    gate = Gate()
    with serving(gate, workers=4) as (srv, connect):
        held = connect()
        held.send(b"hold")
        assert gate.holding.wait(DEADLINE)
        others = [connect() for _ in range(10)]
        for index, peer in enumerate(others):
            peer.send(b"%d" % index)
        assert [peer.receive() for peer in others] == [b"echo %d" % i for i in range(10)]
        gate.release.set()
        assert held.receive() == b"echo hold"


def test_a_quick_reply_is_not_held_behind_a_call_of_the_same_batch_that_blocks():
    # One worker takes a batch of two: a quick call, then one that blocks. A
    # worker that held results back, to wake the loop once per batch, would
    # strand this reply until the blocked call returns.
    gate = Gate()
    with serving(gate, workers=1) as (srv, connect):
        quick, slow = connect(), connect()
        wait_for(srv._engine.idle, what="both connections' on_connect")
        paused, resume = threading.Event(), threading.Event()

        def pause_the_loop():
            paused.set()
            resume.wait(DEADLINE)

        srv._mux.defer(pause_the_loop)  # both requests then arrive in one poll, quick's first
        assert paused.wait(DEADLINE)
        try:
            quick.send(b"quick")
            slow.send(b"hold")
        finally:
            resume.set()
        assert gate.holding.wait(DEADLINE)
        assert quick.receive() == b"echo quick"
        assert not gate.returned.is_set(), "the quick reply came only once the blocked call returned"
        gate.release.set()
        assert slow.receive() == b"echo hold"


def test_a_raising_handler_closes_only_its_connection_amid_a_batch(caplog):
    gate = Gate()
    with serving(gate, workers=4) as (srv, connect):
        peers = [connect() for _ in range(12)]
        bad = peers[5]
        for index, peer in enumerate(peers):
            if peer is bad:
                peer.send(b"boom", b"never answered")
            else:
                peer.send(b"%d-a" % index, b"%d-b" % index)
        assert bad.receive() is None  # closed, the message after the failure dropped
        for index, peer in enumerate(peers):
            if peer is not bad:
                assert [peer.receive(), peer.receive()] == [b"echo %d-a" % index, b"echo %d-b" % index]
        assert any("handler failed" in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_call_over_handler_timeout_ends_its_connection_while_the_others_go_on():
    gate = Gate()
    with serving(gate, workers=2, handler_timeout=0.3, loop_stall_warning=None) as (srv, connect):
        held, other = connect(), connect()
        held.send(b"hold")
        assert gate.holding.wait(DEADLINE)
        other.send(b"meanwhile")
        assert other.receive() == b"echo meanwhile"
        assert held.receive() is None  # the server gave up on it (a reset or EOF)
        gate.release.set()
        other.send(b"after")
        assert other.receive() == b"echo after"
        wait_for(srv._engine.idle, what="the late call's result to come back")


def test_stop_while_calls_wait_for_a_thread_still_answers_them():
    gate = Gate()
    with serving(gate, workers=1) as (srv, connect):
        held = connect()
        held.send(b"hold")
        assert gate.holding.wait(DEADLINE)
        waiting = [connect() for _ in range(6)]
        for index, peer in enumerate(waiting):
            peer.send(b"%d" % index)
        wait_for(lambda: srv._engine.queue_depth() == len(waiting), what="six calls queued")
        stopper = threading.Thread(target=srv.shutdown, kwargs={"timeout": DEADLINE})
        stopper.start()
        try:
            gate.release.set()
            assert held.receive() == b"echo hold"
            assert [peer.receive() for peer in waiting] == [b"echo %d" % i for i in range(6)]
        finally:
            stopper.join(DEADLINE)
        assert srv._stopped.is_set()
        assert all(peer.receive() is None for peer in waiting)  # then closed, as a drain does


def test_the_handler_threads_are_bounded_and_started_only_when_needed():
    parties = 3
    with serving(WaitForAll(parties), workers=3) as (srv, connect):
        handlers = srv._engine._handlers
        assert handlers.started == 0  # no call yet: no thread
        peers = [connect() for _ in range(2 * parties)]
        for index, peer in enumerate(peers):
            peer.send(b"%d" % index)
        assert [peer.receive() for peer in peers] == [b"together %d" % i for i in range(2 * parties)]
        assert handlers.started == 3


def test_a_stopped_engines_threads_exit():
    gate = Gate()
    with serving(gate, workers=4) as (srv, connect):
        peer = connect()
        peer.send(b"x")
        assert peer.receive() == b"echo x"
        threads = list(srv._engine._handlers._threads)
    assert threads and not any(thread.is_alive() for thread in threads)


@pytest.mark.parametrize("workers", [1, 3])
def test_a_whole_connection_on_a_handler_thread_socketserver_style(workers):
    import socketserver

    class Upper(socketserver.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                self.wfile.write(line.upper())

    srv = Server(Upper, port=0, engine="threadpool", workers=workers).start()
    try:
        with socket.create_connection(srv.address[:2], timeout=DEADLINE) as sock:
            sock.sendall(b"abc\n")
            assert sock.makefile("rb").readline() == b"ABC\n"
    finally:
        srv.shutdown(timeout=DEADLINE)


def test_idle_handler_threads_exit_and_new_calls_start_others(monkeypatch):
    monkeypatch.setattr(threadpool, "IDLE_TIMEOUT", 0.2)
    with serving(WaitForAll(2), workers=2) as (srv, connect):
        handlers = srv._engine._handlers
        first = [connect(), connect()]
        for peer in first:
            peer.send(b"a")
        assert [peer.receive() for peer in first] == [b"together a"] * 2
        wait_for(lambda: not handlers._threads, what="the idle threads to exit")
        for peer in first:  # both again at once: two threads, started afresh
            peer.send(b"b")
        assert [peer.receive() for peer in first] == [b"together b"] * 2
        assert handlers.started == 4


def test_threads_timing_out_as_calls_arrive_strand_no_call(monkeypatch):
    # Idle waits that end just as calls come: a wake-up landing on a worker whose
    # wait has timed out must not leave the queue with nobody coming for it.
    monkeypatch.setattr(threadpool, "IDLE_TIMEOUT", 0.001)
    with serving(Echo(), workers=3) as (srv, connect):
        peers = [connect() for _ in range(5)]
        for round_ in range(300):
            for peer in peers:
                peer.send(b"%d" % round_)
            assert [peer.receive() for peer in peers] == [b"echo %d" % round_] * 5
