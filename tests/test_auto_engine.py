"""The auto engine's own promises: inline until a call blocks, then the loop moves.

Each test starts real servers on 127.0.0.1 with line framing; the handler
decides what to do from the message (``sleep <seconds>``) and records where
each call ran, so a test can tell an inline call (on the thread that runs the
loop) from one that ran on another thread. Waits are events and deadlines.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from muxpool import Client, Server

pytestmark = pytest.mark.timeout(60)

DEADLINE = 10.0


class Recorder:
    """A shared handler: ``sleep S`` sleeps S seconds; anything else echoes."""

    def __init__(self):
        self.server = None
        self.calls: list[tuple[bytes, bool]] = []  # (message, ran on the loop's thread)
        self.started = threading.Semaphore(0)  # released as each sleeping call begins

    def on_message(self, conn, message: bytes) -> bytes:
        self.calls.append((message, threading.get_ident() == self.server._mux.runner_id))
        if message.startswith(b"sleep "):
            self.started.release()
            time.sleep(float(message.split()[1]))
        return b"ok " + message


@pytest.fixture
def serve():
    """``serve(**options) -> (server, app)``: an auto server, always shut down."""
    servers = []

    def make(**options):
        app = Recorder()
        srv = Server(app, port=0, engine="auto", framing="line", **options)
        app.server = srv
        servers.append(srv)
        return srv.start(), app

    yield make
    for srv in servers:
        srv.shutdown(timeout=DEADLINE)


@pytest.fixture
def connect():
    clients = []

    def make(srv):
        client = Client(*srv.address[:2], framing="line", greeting=False, timeout=DEADLINE)
        clients.append(client)
        return client.connect()

    yield make
    for client in clients:
        client.close()


def timed_request(client, message: bytes) -> float:
    started = time.monotonic()
    assert client.request(message) == b"ok " + message
    return time.monotonic() - started


def test_echo_clients_are_answered_while_another_connection_sleeps(serve, connect):
    """The mixed workload: on `loop` every echo here would wait for the 1 s sleep."""
    srv, app = serve()
    sleeper = connect(srv)
    echoes = [connect(srv) for _ in range(20)]
    sleeper.send(b"sleep 1")
    assert app.started.acquire(timeout=DEADLINE)
    slowest = max(timed_request(c, b"echo %d" % i) for i, c in enumerate(echoes))
    slowest = max(slowest, *(timed_request(c, b"again") for c in echoes))
    assert slowest < 0.5, f"an echo reply took {slowest:.2f} s while the sleeper slept"
    assert sleeper.receive() == b"ok sleep 1"
    assert srv._engine.stats()["handoffs"] >= 1


def test_a_handler_that_blocked_goes_to_a_thread_at_once_next_time(serve, connect):
    srv, app = serve(handoff_after=0.25)
    blocker, echo = connect(srv), connect(srv)
    blocker.send(b"sleep 0.6")
    assert app.started.acquire(timeout=DEADLINE)
    first = timed_request(echo, b"during the first")  # waits out handoff_after
    assert blocker.receive() == b"ok sleep 0.6"
    blocker.send(b"sleep 0.6")
    assert app.started.acquire(timeout=DEADLINE)
    second = timed_request(echo, b"during the second")
    assert blocker.receive() == b"ok sleep 0.6"
    assert first >= 0.15, f"the first blocking call stalled the loop only {first:.3f} s"
    assert second < 0.15, f"the remembered blocker stalled the loop {second:.3f} s again"
    sleeps = [on_loop for message, on_loop in app.calls if message.startswith(b"sleep")]
    assert sleeps == [True, False]  # the second started on a thread
    assert srv._engine.stats()["handoffs"] == 1


def test_a_handler_that_stops_blocking_returns_to_the_loop(serve, connect):
    srv, app = serve(handoff_after=0.05)
    client = connect(srv)
    assert client.request(b"sleep 0.2") == b"ok sleep 0.2"  # caught blocking
    for i in range(40):
        assert client.request(b"quick %d" % i) == b"ok quick %d" % i
    quick = [on_loop for message, on_loop in app.calls if message.startswith(b"quick")]
    assert quick[0] is False, "the call after a blocked one should start on a thread"
    assert quick[-10:] == [True] * 10, f"never back on the loop: {quick}"
    assert srv._engine.stats()["blocking_handlers"] == 0


def test_200_blocking_calls_wait_in_order_for_at_most_workers_threads(serve):
    before = threading.active_count()
    srv, _app = serve(workers=4, handoff_after=0.01, loop_stall_warning=None)
    socks = [socket.create_connection(srv.address[:2], timeout=DEADLINE) for _ in range(200)]
    try:
        for sock in socks:
            sock.sendall(b"sleep 0.02\n")
        most_threads = most_queued = 0
        replies = 0
        deadline = time.monotonic() + DEADLINE
        pending = list(socks)
        while pending and time.monotonic() < deadline:
            stats = srv._engine.stats()
            most_queued = max(most_queued, stats["queued"])
            most_threads = max(most_threads, threading.active_count() - before)
            sock = pending.pop(0)
            assert sock.recv(64) == b"ok sleep 0.02\n"
            replies += 1
        assert replies == 200
        # + the server thread (the monitor) and nothing else: no watchdog here
        assert most_threads <= 4 + 1, most_threads
        assert srv._engine.stats()["threads"] <= 4
        assert most_queued > 0, "the calls never waited for a thread"
    finally:
        for sock in socks:
            sock.close()


def test_per_connection_order_holds_across_a_hand_off(serve, connect):
    srv, app = serve(handoff_after=0.01)
    client, bystander = connect(srv), connect(srv)
    first = [b"m%02d" % i for i in range(30)]
    # One write, so the server reads the sleep and the 30 after it at once.
    client._sock.sendall(b"sleep 0.3\n" + b"".join(m + b"\n" for m in first))
    assert app.started.acquire(timeout=DEADLINE)
    assert timed_request(bystander, b"meanwhile") < 0.25  # the loop moved on
    later = [b"late%02d" % i for i in range(30)]
    for message in later:
        client.send(message)
    replies = [client.receive() for _ in range(1 + len(first) + len(later))]
    assert replies == [b"ok sleep 0.3"] + [b"ok " + m for m in first + later]
    assert srv._engine.stats()["handoffs"] >= 1


def test_the_stall_warning_does_not_fire_for_a_call_that_was_handed_off(serve, connect, caplog):
    srv, _app = serve(loop_stall_warning=0.1)
    client = connect(srv)
    with caplog.at_level(logging.WARNING, logger="muxpool.server"):
        assert client.request(b"sleep 0.5") == b"ok sleep 0.5"
    stuck = [r for r in caplog.records if "event loop has been stuck" in r.getMessage()]
    assert not stuck, stuck[0].getMessage()
    assert srv._engine.stats()["handoffs"] == 1


class _WhereAmI:
    """Records, inside each call: (on the loop's thread, may touch loop state)."""

    def __init__(self):
        self.server = None
        self.seen: list[tuple[bool, bool]] = []

    def on_message(self, conn, message: bytes) -> bytes:
        mux = self.server._mux
        self.seen.append((threading.get_ident() == mux.runner_id, mux.in_loop_thread()))
        return message


def test_a_call_on_the_loop_thread_defers_what_it_does_to_the_loop_and_nothing_else_does():
    # While a call runs the monitor may hand the loop to another thread, so the
    # handler's conn.send/close must defer even on the loop's thread; the loop's
    # own callbacks, between calls, must not.
    app = _WhereAmI()
    srv = Server(app, port=0, engine="auto", framing="line")
    app.server = srv
    srv.start()
    try:
        with Client(*srv.address[:2], framing="line", greeting=False, timeout=DEADLINE) as client:
            assert client.request(b"hi") == b"hi"
        assert app.seen == [(True, False)]
        between = threading.Event()
        outside = []
        srv._mux.defer(lambda: (outside.append(srv._mux.in_loop_thread()), between.set()))
        assert between.wait(DEADLINE) and outside == [True]
    finally:
        srv.shutdown(timeout=DEADLINE)


# --- the hand-off's handshake (AutoEngine._hand_off and verdict), step by step ---------
# The monitor raises the owner's flag, then reads its call; the owner clears its
# call, then reads the flag. These tests put the two threads' steps in each order
# the GIL allows, with a standby slot to hand the loop to (no loop runs).


class _Conn:
    busy = False


def _engine_with_standby():
    from muxpool.config import ServerConfig
    from muxpool.engines._auto_parts import Slot
    from muxpool.engines.auto import AutoEngine

    engine = AutoEngine(ServerConfig(engine="auto", workers=2))
    owner, standby = Slot(), Slot()
    engine._owner_slot, engine._standby = owner, [standby]
    owner.conn = _Conn()
    return engine, owner, standby


def test_a_call_that_returned_before_the_monitor_flagged_it_keeps_the_loop():
    engine, owner, standby = _engine_with_standby()
    owner.calling = 0  # the owner cleared its call 7 ...
    engine._hand_off(owner, 7)  # ... before the monitor, which saw it running, acted
    assert engine._owner_slot is owner and engine.handoffs == 0
    assert not owner.check and not owner.conn.busy and standby.task is None


def test_a_call_flagged_while_it_runs_is_handed_off_and_its_connection_waits():
    engine, owner, standby = _engine_with_standby()
    owner.calling = 7
    engine._hand_off(owner, 7)
    assert engine._owner_slot is standby and standby.wake.is_set() and engine.handoffs == 1
    assert owner.conn.busy  # before the new owner reads: what arrives meanwhile waits
    owner.calling = 0  # the call returns; the owner reads its flag, and asks
    assert owner.check and engine.verdict(owner, 7) == (True, True)
    assert not owner.check  # lowered for when it owns the loop again


def test_a_call_flagged_with_no_thread_free_stays_on_the_loop_and_is_remembered():
    engine, owner, _standby = _engine_with_standby()
    engine._standby, engine._workers = [], [threading.current_thread()] * 2  # all busy
    owner.calling = 7
    engine._hand_off(owner, 7)
    assert engine._owner_slot is owner and engine.handoffs == 0 and owner.stuck == 7
    owner.calling = 0
    assert owner.check and engine.verdict(owner, 7) == (False, True)  # kept the loop; it blocked
