"""Overload is told, not hidden; what a server holds stays bounded.

* Far past ``max_connections``, every client is either served or closed at
  once (after ``busy_message``, when set): none waits on a connection that the
  kernel would have dropped from a full accept queue, with no one to serve it.
* Cancelled timers do not pile up: a connection's idle timer, cancelled when it
  closes, behind a long-lived connection's, left the heap only when due (300 s).
* ``--unix`` takes over only a dead server's socket, never a regular file or a
  live server's socket, and a server unlinks only the socket it created.
"""

from __future__ import annotations

import selectors
import socket
import time

import pytest
from support.engines import CLI_ENGINES as ENGINES
from support.engines import needs_gevent
from support.served import cli_server
from support.waiting import DEADLINE, wait_for

from muxpool import Server
from muxpool.multiplexer import Multiplexer

pytestmark = pytest.mark.timeout(90)

GREETING = b"Hello client-side"


@pytest.mark.parametrize("engine", ENGINES)
def test_clients_past_max_connections_are_served_or_closed_at_once(engine, tmp_path, nofile_limit):
    needs_gevent(engine)
    clients, limit = 1500, 100
    assert nofile_limit >= clients + 512, nofile_limit
    with cli_server(engine, tmp_path / "server.log", "--max-connections", str(limit),
                    "--busy-message", "busy", "--access-log") as server:
        # The readiness probe's connection holds a slot until the server has seen it
        # close (on threaded, its thread reports that): all `limit` are free once its
        # access-log line is out, which the server writes after freeing the slot.
        wait_for(lambda: " reason=" in server.log(), what="the readiness probe's connection to close")
        selector = selectors.DefaultSelector()
        socks = []
        started = time.monotonic()
        for _ in range(clients):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(server.address)
            selector.register(sock, selectors.EVENT_READ)
            socks.append(sock)
        outcome: dict[socket.socket, bytes] = {}
        waited = []
        deadline = started + 20
        while len(outcome) < clients and time.monotonic() < deadline:
            for key, _ in selector.select(0.5):
                sock = key.fileobj
                try:
                    data = sock.recv(64)
                except ConnectionResetError:
                    data = b"reset"
                outcome[sock] = data
                waited.append(time.monotonic() - started)
                selector.unregister(sock)
        for sock in socks:
            sock.close()
        selector.close()
        server.check_running()
    served = sum(1 for data in outcome.values() if data.startswith(GREETING))
    told = sum(1 for data in outcome.values() if data in (b"busy", b""))
    stranded = clients - len(outcome)
    print(f"\n[overload] {engine}: {clients} clients at max_connections={limit}: {served} served, "
          f"{told} closed at once, {stranded} left waiting; the last answered after "
          f"{max(waited):.2f} s")
    assert stranded == 0, f"{stranded} clients were left waiting"
    assert served + told == clients, sorted({d for d in outcome.values()})
    assert served >= limit


def test_the_timer_heap_stays_bounded_behind_a_long_lived_timer():
    mux = Multiplexer()
    try:
        mux.call_later(3600, lambda: None)  # a long-lived connection's idle timer, say
        for _ in range(20_000):
            mux.call_later(300, lambda: None).cancel()
        assert mux.pending_timers < 200, mux.pending_timers
        live = [mux.call_later(1, lambda: None) for _ in range(500)]
        for _ in range(5_000):
            mux.call_later(300, lambda: None).cancel()
        assert 501 <= mux.pending_timers < 1200, mux.pending_timers
        assert not any(t.cancelled for t in live)
    finally:
        mux.close()


@pytest.mark.parametrize("engine", ["loop", "auto", "threadpool"])
def test_connection_churn_leaves_no_timers_behind_a_long_lived_connection(engine):
    with Server(port=0, engine=engine, idle_timeout=300).start() as srv:
        keeper = socket.create_connection(srv.address, timeout=DEADLINE)
        assert keeper.recv(64) == GREETING
        for _ in range(1_500):
            with socket.create_connection(srv.address, timeout=DEADLINE) as sock:
                assert sock.recv(64) == GREETING
        wait_for(lambda: len(srv._connections) == 1, what="the churned connections closed")
        # Each closed connection cancelled its 300 s idle timer; compaction removed them.
        assert srv._mux.pending_timers < 300, srv._mux.pending_timers
        keeper.close()


# --- Unix socket paths ---------------------------------------------------------------------------


def test_unix_refuses_a_path_that_is_not_a_socket(tmp_path):
    path = tmp_path / "precious.txt"
    path.write_text("not a socket")
    with pytest.raises(OSError, match="is not a socket"):
        Server(unix_path=str(path))
    assert path.read_text() == "not a socket"


def test_unix_refuses_a_live_servers_socket_and_takes_over_a_dead_ones(tmp_path):
    path = str(tmp_path / "s.sock")
    with Server(unix_path=path).start():
        with pytest.raises(OSError, match="another server is listening"):
            Server(unix_path=path)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            assert sock.recv(64) == GREETING
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # a server that died without unlinking its socket
    stale.close()
    with Server(unix_path=path).start():
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            assert sock.recv(64) == GREETING


def test_a_stopping_server_leaves_a_newer_servers_socket_alone(tmp_path):
    path = tmp_path / "s.sock"
    old = Server(unix_path=str(path)).start()
    try:
        path.unlink()  # someone removed it; a new server binds the same path
        with Server(unix_path=str(path)).start():
            old.shutdown()
            assert path.exists(), "the old server unlinked the new server's socket"
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
                assert sock.recv(64) == GREETING
        assert not path.exists()  # the new one removed its own
    finally:
        old.shutdown()
