"""One conformance suite for every server engine, under every framing (design habit 9).

Every test here runs for each engine in ``ENGINES`` times each framing in
``FRAMINGS``. A new engine (``threaded``, ``prefork``, ``gevent``) joins the
whole suite by adding its name to ``ENGINES``: the tests use only what a
user of :class:`muxpool.Server` sees (bytes on a loopback socket, log
records, ``address``, ``connections``, ``shutdown``), never engine internals.

``make_server`` starts servers on port 0 and always shuts them down at
teardown (a prefork server's worker processes are checked gone);
``connect`` makes :class:`muxpool.Client` objects speaking the
server's framing and always closes them. With ``raw`` framing a message is
whatever one ``recv`` returns, so raw tests go in lockstep (one request, wait
for its reply) and never pipeline. Nothing here sleeps to synchronise: tests
wait on events, on replies, or poll a condition with a deadline.

``prefork`` serves in forked worker processes, so what a test observes must
cross processes: replies and closes on the client's socket, log records
through :func:`server_log` (a file every process appends to), handler-app
signals through ``server_apps.shared_event``, and the connections a server
holds through :func:`held_connections` (the workers' sockets, read from
``/proc``). A test that needs state living only inside the serving process
says so with :func:`in_process_only`, which skips it on prefork.
"""

from __future__ import annotations

import errno
import logging
import resource
import selectors
import socket
import threading
import time

import pytest
import server_apps
from support.engines import SERVER_ENGINES
from support.servers import (
    GREETING,
    PREFIX,
    Peer,
    capturing_server_log,
    engine_options,
    held_connections,
    in_process_only,
    refuses_connections,
    start_server,
    stop_servers,
)
from support.waiting import DEADLINE, wait_for

from muxpool import Client, ConnectionBroken, Server, make_framer

pytestmark = pytest.mark.timeout(60)

ENGINES = SERVER_ENGINES  # gevent alone in test_engines.py's patched run
FRAMINGS = ["raw", "line", "length"]

# --- fixtures and helpers ------------------------------------------------------------


@pytest.fixture
def server_log(tmp_path):
    """``server_log(level)``: capture ``muxpool.server`` at ``level`` from every process.

    Like ``caplog``, but a prefork worker, forked after this runs, inherits the
    handler and appends to the same file, so its records reach the test too.
    Call it before starting the server.
    """
    with capturing_server_log(tmp_path) as capture:
        yield capture


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


# Tests of what lies above the framing need only one (line: the one with every rule).
ONE_FRAMING = pytest.mark.parametrize("framing", ["line"])


@pytest.fixture(params=FRAMINGS)
def framing(request):
    return request.param


@pytest.fixture
def make_server(engine, framing):
    """``make_server(app=None, **options)``: a started server, always shut down."""
    servers: list[Server] = []

    def make(app=None, **options):
        srv = Server(app, port=0, engine=engine, framing=framing, **engine_options(engine), **options)
        servers.append(srv)
        return start_server(srv)

    yield make
    stop_servers(servers)


@pytest.fixture
def connect(framing):
    """``connect(srv, greeting=True)``: a connected Client in the server's framing."""
    clients: list[Client] = []

    def make(srv, greeting=True, **options):
        host, port = srv.address[:2]
        client = Client(host, port, framing=framing, greeting=greeting, timeout=DEADLINE, **options)
        clients.append(client)
        return client.connect()

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def peers(framing):
    """``peers(srv)``: a connected :class:`Peer`, always closed."""
    made: list[Peer] = []

    def make(srv):
        peer = Peer(srv.address, framing)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


def assert_closed_by_server(client: Client) -> None:
    """The server closed ``client``'s connection: EOF (or a reset), not a timeout."""
    with pytest.raises((ConnectionBroken, ConnectionResetError)):
        client.receive()


# --- a selector-driven crowd of clients -------------------------------------------------


class _Crowd:
    """Many non-blocking client sockets driven by one selector.

    Each client checks the greeting byte for byte, then does ``requests``
    lockstep request/replies with payloads unique to it. Comparing wire bytes
    (the server's framing applied to the expected message) works the same for
    every framing, raw included.
    """

    def __init__(self, address, framing: str, requests: int):
        self.address = address[:2]
        self.encode = make_framer(framing).encode
        self.requests = requests
        self.selector = selectors.DefaultSelector()
        self.socks: list[socket.socket] = []
        self.state: dict[socket.socket, dict] = {}
        self.greeted = 0
        self.finished = 0
        self.replies = 0

    def open(self, count: int) -> None:
        """Open ``count`` more connections and wait until each has its greeting."""
        target = self.greeted + count
        for _ in range(count):
            index = len(self.socks)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.socks.append(sock)
            sock.setblocking(False)
            err = sock.connect_ex(self.address)
            assert err in (0, errno.EINPROGRESS), errno.errorcode.get(err, err)
            self.state[sock] = {"index": index, "buf": bytearray(), "want": self.encode(GREETING),
                                "sent": 0, "phase": "greeting"}
            self.selector.register(sock, selectors.EVENT_READ)
        self.pump(lambda: self.greeted >= target, f"{target} greetings")

    def run_requests(self) -> None:
        for sock in self.socks:
            self._send_next(sock)
        self.pump(lambda: self.finished >= len(self.socks), "every reply")

    def _send_next(self, sock: socket.socket) -> None:
        st = self.state[sock]
        payload = b"client %d request %d" % (st["index"], st["sent"])
        st["sent"] += 1
        st["want"] = self.encode(PREFIX + payload)
        st["phase"] = "reply"
        data = self.encode(payload)
        assert sock.send(data) == len(data)  # small, and the send buffer is empty: lockstep

    def _on_readable(self, sock: socket.socket) -> None:
        st = self.state[sock]
        data = sock.recv(65536)
        assert data, f"client {st['index']}: closed by the server while waiting ({st['phase']})"
        buf, want = st["buf"], st["want"]
        buf += data
        assert len(buf) <= len(want), f"client {st['index']}: unexpected bytes {bytes(buf)!r}"
        if len(buf) < len(want):
            return
        assert bytes(buf) == want, f"client {st['index']}: got {bytes(buf)!r}, want {want!r}"
        buf.clear()
        if st["phase"] == "greeting":
            st["phase"] = "idle"
            self.greeted += 1
            return
        self.replies += 1
        if st["sent"] < self.requests:
            self._send_next(sock)
        else:
            st["phase"] = "done"
            self.finished += 1
            self.selector.unregister(sock)

    def pump(self, done, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"timed out waiting for {what}: {self.greeted} greeted, "
                            f"{self.replies} replies, {self.finished} clients finished")
            for key, _ in self.selector.select(min(remaining, 1.0)):
                self._on_readable(key.fileobj)

    def close(self) -> None:
        self.selector.close()
        for sock in self.socks:
            sock.close()


@pytest.fixture
def crowd():
    """``crowd(srv, requests)``: a :class:`_Crowd` whose sockets are always closed."""
    made: list[_Crowd] = []

    def make(srv, requests: int) -> _Crowd:
        c = _Crowd(srv.address, srv.config.framing, requests)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def many_fds():
    """Raise the soft RLIMIT_NOFILE to the hard limit (both ends of every socket live here)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * 2000 + 256
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if target < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- the suite ------------------------------------------------------------------------------


def test_greeting_and_replies_are_exact(make_server, connect, peers, framing):
    srv = make_server()
    client = connect(srv)
    assert client.greeting == GREETING
    assert client.request(b"hello") == b"response: hello"
    assert client.request(b"second message") == b"response: second message"

    # On the wire: the 17-byte greeting and the reply, framed and nothing else.
    peer = peers(srv)
    wire = make_framer(framing).encode
    expected = wire(GREETING)
    got = b""
    while len(got) < len(expected):
        data = peer.sock.recv(1024)
        assert data, "server closed before the greeting"
        got += data
    assert got == expected
    if framing == "raw":
        assert got == b"Hello client-side" and len(got) == 17
    peer.sock.sendall(wire(b"ping"))
    expected = wire(b"response: ping")
    got = b""
    while len(got) < len(expected):
        data = peer.sock.recv(1024)
        assert data, "server closed before the reply"
        got += data
    assert got == expected


def test_one_message_gets_one_reply_at_every_size(make_server, connect):
    """Sizes around the servers' small first reads (479 bytes, after a small
    message) and well past them: with raw framing a chunk the server read in
    two parts would become two messages, and two replies."""
    srv = make_server(server_apps.SizeGreeter)
    client = connect(srv)
    for size in (1, 480, 10, 1000, 478, 479, 1, 4096, 5, 16000, 479, 958, 10):
        assert client.request(b"m" * size) == b"size %d" % size


def test_200_concurrent_clients_20_requests_each(make_server, crowd):
    srv = make_server()
    clients = crowd(srv, requests=20)
    clients.open(200)
    clients.run_requests()
    assert clients.replies == 200 * 20


def test_pipelined_replies_keep_request_order(make_server, connect, framing):
    if framing == "raw":
        pytest.skip("raw framing has no message boundaries: messages cannot be pipelined")
    srv = make_server(server_apps.JitterEcho)
    client = connect(srv)
    payloads = [b"message %03d" % i for i in range(100)]
    for payload in payloads:
        client.send(payload)
    replies = [client.receive() for _ in payloads]
    assert replies == [PREFIX + p for p in payloads]


def test_max_message_size_is_accepted_and_one_more_byte_closes(make_server, connect):
    srv = make_server(server_apps.SizeGreeter, max_message_size=64)
    bad = connect(srv)
    good = connect(srv)  # connected at the same time as the offender
    assert bad.request(b"a" * 64) == b"size 64"
    assert good.request(b"b" * 64) == b"size 64"
    bad.send(b"c" * 65)
    assert_closed_by_server(bad)
    assert good.request(b"still answered") == b"size 14"
    assert good.request(b"d" * 64) == b"size 64"
    later = connect(srv)
    assert later.request(b"e" * 64) == b"size 64"


def test_oversized_message_after_a_good_one_in_the_same_read(make_server, peers, framing):
    """Replies to earlier messages are flushed, then the connection closes."""
    if framing == "raw":
        pytest.skip("raw framing: one read is one message")
    srv = make_server(server_apps.SizeGreeter, max_message_size=64)
    peer = peers(srv)
    assert peer.receive() == GREETING
    peer.send(b"ok", b"x" * 65)  # one write, so the server reads both at once
    peer.sock.settimeout(1.0)  # the close should be immediate
    assert peer.receive() == b"size 2"
    assert peer.receive() is None  # EOF


def test_framing_error_still_answers_messages_queued_before_it(make_server, peers, engine, framing,
                                                               request):
    """Messages received before a bad frame (but still queued) are answered, then EOF."""
    if framing == "raw":
        pytest.skip("raw framing: messages cannot be pipelined")
    app = server_apps.SlowEcho(delay=0.1, expected=1)
    srv = make_server(app, max_message_size=64)
    peer = peers(srv)
    assert peer.receive() == GREETING
    payloads = [b"queued %d" % i for i in range(3)]
    peer.send(*payloads)
    assert app.all_arrived.wait(DEADLINE)  # the first is running; the others were read with it
    peer.send(b"x" * 65)  # a separate read: the framing error comes while work is queued
    replies = []
    while (reply := peer.receive()) is not None:
        replies.append(reply)
    assert replies == [PREFIX + p for p in payloads]


def test_half_closed_client_gets_every_reply_then_eof(make_server, peers, framing):
    """A client that sends its requests then shuts down its write side (like ``nc -N``)."""
    if framing == "raw":
        pytest.skip("raw framing: messages cannot be pipelined")
    srv = make_server(server_apps.JitterEcho)
    peer = peers(srv)
    assert peer.receive() == GREETING
    payloads = [b"half-closed %d" % i for i in range(20)]
    peer.send(*payloads)
    peer.sock.shutdown(socket.SHUT_WR)
    replies = []
    while (reply := peer.receive()) is not None:
        replies.append(reply)
    assert replies == [PREFIX + p for p in payloads]


def test_client_vanishing_mid_message_does_not_disturb_others(make_server, connect, peers, framing):
    srv = make_server()
    other = connect(srv)
    assert other.request(b"before") == b"response: before"
    vanisher = peers(srv)
    assert vanisher.receive() == GREETING
    wire = vanisher.wire(b"this message will never be finished")
    vanisher.sock.sendall(wire[: len(wire) // 2])
    vanisher.close()
    assert other.request(b"after") == b"response: after"
    wait_for(lambda: held_connections(srv) == 1, what="the vanished connection to be dropped")
    assert other.request(b"still fine") == b"response: still fine"
    fresh = connect(srv)
    assert fresh.request(b"new") == b"response: new"


def test_handler_error_closes_only_that_connection_and_is_logged(make_server, connect, peers, server_log):
    log = server_log(logging.ERROR)
    srv = make_server(server_apps.ExplodeOn)
    bystander = connect(srv)
    victim = peers(srv)
    assert victim.receive() == GREETING
    victim.send(b"fine")
    assert victim.receive() == b"response: fine"
    port = victim.local_port
    victim.send(b"boom")
    assert victim.receive() is None  # closed by the server
    assert bystander.request(b"unaffected") == b"response: unaffected"

    def logged():
        return [r for r in log.records()
                if r["name"] == "muxpool.server" and r["levelno"] >= logging.ERROR
                and str(port) in r["message"]]

    records = wait_for(logged, what="an ERROR record naming the failing peer")
    assert any("RuntimeError" in r["exc_types"] for r in records)
    newcomer = connect(srv)
    assert newcomer.request(b"hello") == b"response: hello"
    assert bystander.request(b"still here") == b"response: still here"


@ONE_FRAMING
def test_a_reply_the_framing_cannot_carry_closes_only_that_connection_and_is_logged(
        make_server, connect, peers, server_log):
    log = server_log(logging.ERROR)
    srv = make_server(server_apps.UnframeableOn)
    bystander = connect(srv)
    victim = peers(srv)
    assert victim.receive() == GREETING
    port = victim.local_port
    victim.send(b"bad")
    assert victim.receive() is None  # closed by the server
    wait_for(lambda: [r for r in log.records() if "cannot be framed" in r["message"]
                      and str(port) in r["message"]], what="the unframeable reply to be logged")
    assert bystander.request(b"unaffected") == b"response: unaffected"


def test_shutdown_delivers_every_in_flight_reply(make_server, connect):
    app = server_apps.SlowEcho(delay=0.2, expected=10)
    srv = make_server(app)
    address = srv.address  # the listener is closed after shutdown
    clients = [connect(srv) for _ in range(10)]
    for i, client in enumerate(clients):
        client.send(b"in flight %d" % i)
    assert app.all_arrived.wait(DEADLINE), "the server never received all 10 messages"
    stopper = threading.Thread(target=srv.shutdown, kwargs={"timeout": DEADLINE})
    stopper.start()
    try:
        for i, client in enumerate(clients):
            assert client.receive() == b"response: in flight %d" % i
            assert_closed_by_server(client)
    finally:
        stopper.join(DEADLINE + 5)
    assert not stopper.is_alive(), "shutdown() did not return"
    assert refuses_connections(address)


def test_shutdown_finishes_pipelined_messages_already_received(make_server, peers, engine, framing,
                                                                request):
    """Messages already read but still queued behind a running handler are answered too."""
    if framing == "raw":
        pytest.skip("raw framing: messages cannot be pipelined")
    app = server_apps.SlowEcho(delay=0.05, expected=1)
    srv = make_server(app)
    peer = peers(srv)
    assert peer.receive() == GREETING
    payloads = [b"queued %d" % i for i in range(5)]
    peer.send(*payloads)  # one write: the server reads all five before the first reply
    assert app.all_arrived.wait(DEADLINE)
    stopper = threading.Thread(target=srv.shutdown, kwargs={"timeout": DEADLINE})
    stopper.start()
    try:
        replies = []
        while (reply := peer.receive()) is not None:
            replies.append(reply)
    finally:
        stopper.join(DEADLINE + 5)
    assert replies == [PREFIX + p for p in payloads]


@pytest.mark.parametrize("wait", [False, True], ids=["wait=False", "wait=True"])
def test_shutdown_called_from_inside_a_handler(make_server, connect, engine, wait, request):
    in_process_only(engine, "a handler's conn.server is its worker's own Server, so shutdown() there "
                    "stops that one worker (which the supervisor replaces), not the server")
    app = server_apps.ShutdownOn(wait=wait)
    srv = make_server(app, drain_timeout=0.5)
    address = srv.address  # the listener is closed after shutdown
    bystander = connect(srv)
    client = connect(srv)
    assert client.request(b"hello") == b"response: hello"
    client.send(b"stop")
    returned = app.returned.wait(DEADLINE)
    assert returned, "shutdown() called from the handler never returned"
    assert app.elapsed < 0.4, (
        f"shutdown(wait={wait}) inside a handler blocked {app.elapsed:.2f} s: it waited for itself "
        "until drain_timeout closed the connection")
    assert client.receive() == b"bye"  # the reply returned after shutdown() is still delivered
    assert_closed_by_server(client)
    assert_closed_by_server(bystander)
    wait_for(lambda: refuses_connections(address), what="the listener to close")


def test_2000_simultaneous_connections(many_fds, make_server, crowd):
    srv = make_server()
    clients = crowd(srv, requests=1)
    for _ in range(8):
        clients.open(250)  # in batches, so the listen backlog never overflows
    assert held_connections(srv) == 2000
    clients.run_requests()
    assert clients.replies == 2000
    clients.close()
    wait_for(lambda: held_connections(srv) == 0, what="the server to drop 2,000 closed connections")


# --- hostile clients and faults -------------------------------------------------------------------


def test_a_handler_calling_sys_exit_ends_its_connection_not_the_server(make_server, connect):
    srv = make_server(server_apps.exits_on_exit)
    good = connect(srv, greeting=False)
    assert good.request(b"before") == b"ok"
    bad = connect(srv, greeting=False)
    bad.send(b"exit")
    with pytest.raises((ConnectionBroken, ConnectionResetError)):
        bad.receive()
    assert good.request(b"after") == b"ok"
    assert connect(srv, greeting=False).request(b"new") == b"ok"


def test_slowloris_is_closed_by_idle_timeout(make_server, connect, framing):
    """idle_timeout counts from the last complete message, so a client trickling one
    byte at a time never completing one is closed; a client sending whole messages is not."""
    if framing == "raw":
        pytest.skip("raw framing: every byte that arrives is a whole message")
    srv = make_server(idle_timeout=0.6)
    active = connect(srv)
    slow = socket.create_connection(srv.address[:2], timeout=DEADLINE)
    try:
        if framing == "length":
            slow.sendall((100).to_bytes(4, "big"))  # a 100-byte message, then a byte at a time
        slow.settimeout(0.05)
        started = time.monotonic()
        closed_after = None
        while time.monotonic() - started < DEADLINE and closed_after is None:
            try:
                slow.send(b"x")  # never a whole frame
                if slow.recv(4096) == b"":
                    closed_after = time.monotonic() - started
            except socket.timeout:
                pass
            except OSError:
                closed_after = time.monotonic() - started
            assert active.request(b"alive") == PREFIX + b"alive"
        assert closed_after is not None and closed_after < 3.0, closed_after
    finally:
        slow.close()


# --- the conn contract (muxpool.Conn), the same on every engine ---------------------------



def _contract_records(path, event: str, count: int = 1) -> list[dict]:
    found = wait_for(lambda: (r := [x for x in server_apps.read_records(path) if x["event"] == event])
                     and len(r) >= count and r, what=f"the handler to record {event!r}")
    return found


@ONE_FRAMING
def test_conn_is_a_muxpool_conn_and_send_after_its_own_close_raises_connection_closed(
        make_server, connect, tmp_path):
    path = tmp_path / "contract.jsonl"
    srv = make_server(server_apps.contract_class(str(path)))
    client = connect(srv)
    client.send(b"close")
    with pytest.raises(ConnectionBroken):  # the client's view: the server closed
        client.receive()
    assert _contract_records(path, "connect")[0]["is_conn"] is True
    assert _contract_records(path, "send after close")[0]["raised"] == "ConnectionClosed"
    end = _contract_records(path, "disconnect")[0]
    assert (end["error"], end["raised"]) == ("NoneType", "ConnectionClosed")


@ONE_FRAMING
def test_conn_send_after_the_peer_reset_raises_connection_broken_caused_by_the_socket_error(
        make_server, tmp_path):
    path = tmp_path / "contract.jsonl"
    srv = make_server(server_apps.contract_class(str(path)))
    sock = socket.create_connection(srv.address[:2], timeout=DEADLINE)
    try:
        assert sock.recv(64)  # greeted: the server holds the connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    finally:
        sock.close()  # SO_LINGER 0: a reset
    end = _contract_records(path, "disconnect")[0]
    assert end["error"] == "ConnectionResetError", end
    assert (end["raised"], end["is_oserror"]) == ("ConnectionBroken", True), end


@ONE_FRAMING
def test_what_a_handler_sends_arrives_before_its_reply_under_load(make_server, connect):
    """``conn.send`` in a handler, then its returned reply: in that order on the wire,
    for every message of 20 clients pipelining at once (on threadpool, both cross
    from a handler thread to the loop: the reply must not overtake the send)."""
    srv = make_server(server_apps.TwoReplies())
    clients = [connect(srv) for _ in range(20)]
    wrong: list = []

    def converse(index, client):
        try:
            for turn in range(40):
                sent = [b"c%d-%d-%d" % (index, turn, k) for k in range(5)]
                for message in sent:
                    client.send(message)
                got = [client.receive() for _ in range(2 * len(sent))]
                expected = [reply for m in sent for reply in (b"first: " + m, b"second: " + m)]
                if got != expected:
                    wrong.append((index, turn, got[:4]))
                    return
        except Exception as exc:  # shown below, with the others
            wrong.append((index, exc))

    talkers = [threading.Thread(target=converse, args=item, daemon=True) for item in enumerate(clients)]
    for talker in talkers:
        talker.start()
    for talker in talkers:
        talker.join(DEADLINE)
    assert not any(talker.is_alive() for talker in talkers)
    assert not wrong, wrong[:3]


@pytest.mark.parametrize("framing", ["length"])
def test_sends_from_another_connections_handler_never_cut_into_its_replies(make_server, peers, engine):
    """One client's handler sends to a second client's connection while that one's own
    large replies go out: every message arrives whole and in its order (a reply's
    send and a send from another thread never interleave on the socket)."""
    in_process_only(engine, "two connections' handlers share the app's registry")
    srv = make_server(server_apps.CrossSender())
    target, pusher = peers(srv), peers(srv)
    for peer in (target, pusher):
        assert peer.receive() == GREETING
    target.send(b"name target")
    assert target.receive() == b"named"
    count, size = 12, 300_000  # each send waits for buffer space: where bytes could interleave
    received: list = []

    def read_all():
        try:
            received.extend(target.receive() for _ in range(2 * count))
        except Exception as exc:  # a cut-up stream breaks the framing: shown below
            received.append(exc)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    pusher.send(b"push target %d %d" % (count, size))
    requests = [b"echo%03d " % index + bytes([65 + index % 26]) * size for index in range(count)]
    for request in requests:
        target.send(request)
    assert pusher.receive() == b"pushed"
    reader.join(DEADLINE)
    assert not reader.is_alive()
    assert not [item for item in received if not isinstance(item, bytes)], received[-1:]
    assert [m for m in received if m.startswith(b"push")] == [
        server_apps.pushed(index, size) for index in range(count)]
    assert [m for m in received if not m.startswith(b"push")] == [PREFIX + r for r in requests]


@ONE_FRAMING
def test_a_handler_over_handler_timeout_ends_its_connection_with_handler_timeout(
        make_server, connect, tmp_path):
    path = tmp_path / "contract.jsonl"
    srv = make_server(server_apps.contract_class(str(path)), handler_timeout=0.2,
                      loop_stall_warning=None)
    client = connect(srv)
    client.send(b"slow")
    with pytest.raises((ConnectionBroken, ConnectionResetError)):  # an abort: reset, or EOF first
        client.receive()
    end = _contract_records(path, "disconnect")[0]
    assert end["error"] == "HandlerTimeout", end
    assert end["raised"] == "ConnectionClosed", end
