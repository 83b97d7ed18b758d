"""Server options and handler forms, on every engine of the conformance suite.

Parametrized over ``ENGINES`` from ``test_server_conformance`` (one list: a new
engine joins both files at once). Line framing unless a test says otherwise,
so messages may be pipelined. Servers are always shut down at teardown;
waits are events, replies or polls with deadlines, never bare sleeps. What a
test observes crosses processes (prefork serves in forked workers): see the
conformance module's docstring.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time

import pytest
import server_apps
from support.engines import SERVER_ENGINES as ENGINES
from support.lines import first_line
from support.servers import (
    GREETING,
    PREFIX,
    Peer,
    capturing_server_log,
    engine_options,
    held_connections,
    in_process_only,
    serves_in_process,
    serving_processes,
    start_server,
    stop_servers,
)
from support.waiting import DEADLINE, wait_for

from muxpool import Client, Server

pytestmark = pytest.mark.timeout(60)

#: Engines on which a handler may block without stalling other connections.
BLOCKING_ENGINES = [e for e in ENGINES if e != "loop"]


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


@pytest.fixture
def make_server(engine):
    """``make_server(app=None, framing="line", **options)``: started, always shut down."""
    servers: list[Server] = []

    def make(app=None, framing="line", **options):
        options.setdefault("port", 0)
        srv = Server(app, engine=engine, framing=framing, **engine_options(engine), **options)
        servers.append(srv)
        return start_server(srv)

    yield make
    stop_servers(servers)


@pytest.fixture
def server_log(tmp_path):
    """``server_log(level)``: ``muxpool.server`` records from every process (see the conformance module)."""
    with capturing_server_log(tmp_path) as capture:
        yield capture


@pytest.fixture
def closing():
    """``closing(obj)`` registers a socket / Client / Peer to close at teardown."""
    things = []

    def register(obj):
        things.append(obj)
        return obj

    yield register
    for obj in things:
        obj.close()


def line_client(address, closing, **options) -> Client:
    host, port = address[:2]
    return closing(Client(host, port, framing="line", timeout=DEADLINE, **options)).connect()


def connection_for(srv: Server, local_port: int):
    """The server's connection whose peer is our socket's local port (or None)."""
    for conn in list(srv._connections.values()):
        if isinstance(conn.peer, tuple) and conn.peer[1] == local_port:
            return conn
    return None


# --- timeouts and limits -----------------------------------------------------------------


def test_idle_timeout_closes_a_silent_client_but_not_an_active_one(make_server, closing):
    srv = make_server(idle_timeout=0.3)
    active = line_client(srv.address, closing)
    # The server's idle clock starts when it accepts, before this test sees the greeting
    # (up to 80 ms later on a busy machine): time from before connecting.
    started = time.monotonic()
    silent = closing(Peer(srv.address, "line", timeout=5.0))
    assert silent.receive() == GREETING
    done = threading.Event()
    result = {}

    def wait_for_close():
        try:
            result["end"] = silent.receive()
        except Exception as exc:  # a timeout: the silent client was never closed
            result["end"] = exc
        result["after"] = time.monotonic() - started
        done.set()

    watcher = threading.Thread(target=wait_for_close, daemon=True)
    watcher.start()
    # The active client keeps talking every 0.1 s (pacing is the behaviour under test).
    count = 0
    while not done.is_set() or time.monotonic() - started < 1.0:
        assert active.request(b"tick %d" % count) == b"response: tick %d" % count
        count += 1
        done.wait(0.1)
    watcher.join(DEADLINE)
    assert result["end"] is None, f"silent client not closed: {result['end']!r}"
    assert 0.3 <= result["after"] < 3.0
    assert active.request(b"still open") == b"response: still open"



@pytest.mark.parametrize("busy", [None, "busy, try later"])
def test_max_connections_serves_that_many_and_closes_the_rest_at_once(make_server, closing, busy):
    srv = make_server(max_connections=5, busy_message=busy)
    # Each prefork worker is a whole server with these options: the limit holds per worker.
    limit = 5 * serving_processes(srv)
    served, rejected = [], []
    started = time.monotonic()
    for i in range(limit + 15):
        sock = closing(socket.create_connection(srv.address, timeout=DEADLINE))
        first = first_line(sock)
        if first == GREETING + b"\n":
            served.append(sock)
        else:
            # Told at once, not left waiting in a queue nobody serves.
            assert first == (b"" if busy is None else busy.encode() + b"\n"), first
            assert sock.recv(1024) == b""
            rejected.append(sock)
    took = time.monotonic() - started
    assert len(served) == limit and len(rejected) == 15, (len(served), len(rejected))
    assert took < 5.0, f"{limit + 15} connects took {took:.1f} s"
    assert held_connections(srv) == limit
    # A slot freed is a slot served.
    served.pop().close()
    wait_for(lambda: held_connections(srv) < limit, what="the closed client's slot freed")
    newcomer = line_client(srv.address, closing)
    assert newcomer.request(b"server is up") == b"response: server is up"
    for sock in served:
        sock.sendall(b"still here\n")
        assert first_line(sock) == b"response: still here\n"


def test_slow_reader_is_bounded_then_closed_after_write_timeout(make_server, closing, server_log, engine):
    log = server_log(logging.WARNING)
    high_water = 64 * 1024
    srv = make_server(write_high_water=high_water, write_timeout=0.5)
    other = line_client(srv.address, closing)
    hog = closing(socket.create_connection(srv.address, timeout=DEADLINE))
    port = hog.getsockname()[1]
    # The server's output buffer can be sampled only where the server runs in this
    # process; a prefork worker's is out of reach, so there the bound goes unchecked.
    sample_buffer = serves_in_process(engine)
    if sample_buffer:
        wait_for(lambda: connection_for(srv, port), what="the server to accept the slow reader")
    hog.setblocking(False)
    message = b"x" * 4000 + b"\n"
    chunk = message * 16
    sent = 0
    biggest = 0
    closed_at = None
    started = time.monotonic()
    deadline = started + 20
    while time.monotonic() < deadline:
        if sample_buffer and (conn := connection_for(srv, port)) is not None:
            biggest = max(biggest, len(conn.outbuf))
        try:
            sent += hog.send(chunk)
        except BlockingIOError:
            select_writable(hog, 0.02)  # blocked: wait a little for room, then poll again
        except (BrokenPipeError, ConnectionResetError):
            # Closed by the server: it closes with our unread requests in its receive
            # buffer, so the kernel resets the connection and our next send fails.
            closed_at = time.monotonic()
            break
    assert closed_at is not None, f"the slow reader was never closed ({sent} bytes sent)"
    if sample_buffer:
        wait_for(lambda: connection_for(srv, port) is None, what="the server to drop the slow reader")
    # The client pushed megabytes; the server held at most about one read's worth of
    # replies beyond the high-water mark (reading pauses between reads, not mid-read).
    assert sent > 8 * high_water
    assert biggest < 8 * high_water, f"output buffer grew to {biggest} bytes"
    assert other.request(b"unaffected") == b"response: unaffected"
    wait_for(lambda: any("write_timeout" in r["message"] and str(port) in r["message"]
                         for r in log.records()), what="a write_timeout log record")


def select_writable(sock, timeout: float) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_WRITE)
        return bool(sel.select(timeout))


@pytest.mark.parametrize("engine", BLOCKING_ENGINES, indirect=True)
def test_handler_timeout_closes_the_connection(make_server, closing, server_log, request):
    log = server_log(logging.ERROR)
    app = server_apps.BlockOn(delay=2.0)
    request.addfinalizer(app.release.set)  # let the pool thread go before shutdown
    srv = make_server(app, handler_timeout=0.2)
    other = line_client(srv.address, closing)
    victim = closing(Peer(srv.address, "line"))
    port = victim.local_port
    assert victim.receive() == GREETING
    victim.send(b"slow")
    assert app.started.wait(DEADLINE)
    started = time.monotonic()
    assert victim.receive() is None  # closed by the server
    assert time.monotonic() - started < 1.0
    assert other.request(b"fine") == b"response: fine"
    wait_for(lambda: any(r["levelno"] >= logging.ERROR and "handler_timeout" in r["message"]
                         and str(port) in r["message"] for r in log.records()),
             what="an ERROR record about handler_timeout")
    app.release.set()
    assert other.request(b"still fine") == b"response: still fine"


# --- addresses -------------------------------------------------------------------------------


def _ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback_works(), reason="no IPv6 loopback")


@needs_ipv6
def test_ipv6_loopback(make_server, closing):
    srv = make_server(host="::1")
    assert srv.address[0] == "::1"
    client = closing(Client("::1", srv.address[1], framing="line", timeout=DEADLINE)).connect()
    assert client.greeting == GREETING
    assert client.request(b"over v6") == b"response: over v6"


@needs_ipv6
@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="no dual-stack IPv6 sockets")
def test_dualstack_accepts_ipv4_and_ipv6(make_server, closing):
    srv = make_server(host="::", dualstack=True)
    port = srv.address[1]
    for host in ("127.0.0.1", "::1"):
        client = closing(Client(host, port, framing="line", timeout=DEADLINE)).connect()
        assert client.greeting == GREETING
        assert client.request(host.encode()) == PREFIX + host.encode()


def test_unix_socket(make_server, closing, tmp_path):
    path = str(tmp_path / "s.sock")
    srv = make_server(unix_path=path)
    assert srv.address == path
    for i in range(2):
        client = closing(Client(unix_path=path, framing="line", timeout=DEADLINE)).connect()
        assert client.greeting == GREETING
        assert client.request(b"unix %d" % i) == b"response: unix %d" % i
    srv.shutdown(timeout=10)
    assert not os.path.exists(path), "shutdown left the socket file behind"


# --- handler forms ------------------------------------------------------------------------------


def test_function_handler(make_server, closing):
    srv = make_server(server_apps.shout)
    client = line_client(srv.address, closing, greeting=False)  # a function never greets
    assert client.request(b"abc") == b"shout: ABC"
    assert client.request(b"x y") == b"shout: X Y"


def test_class_handler_has_state_per_connection(make_server, closing):
    srv = make_server(server_apps.Counter)
    a = line_client(srv.address, closing)
    b = line_client(srv.address, closing)
    assert a.greeting == b.greeting == b"counter ready"
    assert [a.request(b"."), a.request(b".")] == [b"1", b"2"]
    assert b.request(b".") == b"1"
    assert a.request(b".") == b"3"
    assert b.request(b".") == b"2"


def test_instance_handler_is_shared_by_connections(make_server, closing, engine):
    in_process_only(engine, "each worker has its own copy of the handler instance, so connections "
                    "share it only when the kernel hands them to the same worker")
    srv = make_server(server_apps.Counter())
    a = line_client(srv.address, closing)
    b = line_client(srv.address, closing)
    assert a.request(b".") == b"1"
    assert b.request(b".") == b"2"
    assert a.request(b".") == b"3"


def test_conn_send_inside_a_handler_comes_before_the_reply(make_server, closing):
    srv = make_server(server_apps.TwoReplies)
    client = line_client(srv.address, closing)
    for i in range(20):
        client.send(b"m%d" % i)  # pipelined: order must hold across requests too
    got = [client.receive() for _ in range(40)]
    want = [part for i in range(20) for part in (b"first: m%d" % i, b"second: m%d" % i)]
    assert got == want


def test_on_disconnect_called_once_per_connection(make_server, closing, tmp_path):
    path = tmp_path / "disconnects.jsonl"  # the handlers may run in worker processes
    srv = make_server(server_apps.recording_class(path))
    ports = []
    for i in range(3):
        peer = closing(Peer(srv.address, "line"))
        assert peer.receive() == GREETING
        peer.send(b"hi %d" % i)
        assert peer.receive() == b"response: hi %d" % i
        ports.append(peer.local_port)
        peer.close()  # a clean close by the client
    wait_for(lambda: len(server_apps.read_records(path)) >= 3, what="on_disconnect for 3 closed clients")
    left_open = closing(Peer(srv.address, "line"))
    assert left_open.receive() == GREETING
    ports.append(left_open.local_port)
    srv.shutdown(timeout=10)  # closes the last one; every handler call is over when it returns
    assert left_open.receive() is None
    final = server_apps.read_records(path)
    assert len(final) == 4, final
    assert len({r["instance"] for r in final}) == 4  # one instance per connection
    assert [r["error"] for r in final] == [None] * 4
    assert sorted(r["peer"][1] for r in final) == sorted(ports)


# --- stats ---------------------------------------------------------------------------------------


def test_stats_interval_logs_messages_per_second(make_server, closing, caplog, engine, request):
    # The prefork supervisor logs in this process, so caplog sees its stats line too.
    caplog.set_level(logging.INFO, logger="muxpool.server")
    srv = make_server(stats_interval=0.2)
    client = line_client(srv.address, closing)
    for i in range(10):
        assert client.request(b"%d" % i) == b"response: %d" % i

    def stats_lines():  # every engine's periodic line mentions messages; no other record does
        return [message for r in caplog.records
                if r.name == "muxpool.server" and "messages" in (message := r.getMessage())]

    lines = wait_for(stats_lines, what="a stats line")
    assert any("messages/s" in line for line in lines), lines
