"""socketserver compatibility: ``BaseRequestHandler`` subclasses run unchanged.

The handlers live in ``compat_handlers.py``, written as the standard library's
documentation writes them. In-process servers run on every engine that may
block (``threadpool``, ``auto``, ``threaded``, ``prefork``); ``gevent`` needs a
monkey-patched process, so it runs in a subprocess through the CLI, as do
``muxpool.serve(...)`` and ``muxpool serve module:Handler``.

Every server and process is stopped even when a test fails; nothing sleeps to
synchronise (waits are replies, EOFs, or polls with a deadline); loopback only.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import compat_handlers
import pytest
from compat_handlers import FailingHandler, LineEchoHandler, MyStreamHandler, MyTCPHandler, RecordingHandler
from support.waiting import wait_for

from muxpool import Server

pytestmark = pytest.mark.timeout(60)

TESTS = pathlib.Path(__file__).resolve().parent
DEADLINE = 10.0  # seconds any single wait may take before the test fails
START_DEADLINE = 15.0  # a subprocess server must accept within this
EXIT_DEADLINE = 10.0  # ... and exit within this after SIGTERM

ENGINE_OPTIONS = {
    "threadpool": {},
    "auto": {},
    "threaded": {},
    "prefork": {"processes": 2, "worker_engine": "threadpool"},
}
ENGINES = list(ENGINE_OPTIONS)


# --- fixtures and helpers ------------------------------------------------------------


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


def _stop(srv: Server) -> None:
    """Drain; if that does not finish, stop hard. Never leaves a server running."""
    srv.shutdown(timeout=DEADLINE)
    thread = srv._thread
    if thread is not None and thread.is_alive():
        srv.stop_now()
        thread.join(DEADLINE)


@pytest.fixture
def make_server():
    """``make_server(Handler, engine, **options)``: a started server, always stopped."""
    servers: list[Server] = []

    def make(handler, engine, **options):
        srv = Server(handler, port=0, engine=engine, **{**ENGINE_OPTIONS[engine], **options})
        servers.append(srv)
        return srv.start()

    yield make
    for srv in servers:
        _stop(srv)


@pytest.fixture
def clients():
    """``clients(address)``: a connected :class:`LineClient`, always closed."""
    made: list[LineClient] = []

    def make(address):
        client = LineClient(address)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


class LineClient:
    """A blocking loopback socket that reads lines and EOF without over-reading."""

    def __init__(self, address, timeout: float = DEADLINE):
        self.sock = socket.create_connection(address[:2], timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        self.buffer += data
        return bool(data)

    def readline(self) -> bytes:
        """The next line (with its newline); ``b""`` at EOF."""
        while b"\n" not in self.buffer:
            if not self._fill():
                rest, self.buffer = self.buffer, b""
                return rest
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        data, self.buffer = self.buffer, b""
        return data

    def close(self) -> None:
        self.sock.close()


def ask_once(address, data: bytes) -> bytes:
    """The docs' client: one connection per request; returns all the server sent
    before closing the connection."""
    with socket.create_connection(address[:2], timeout=DEADLINE) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(1024)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def readable(socks, timeout: float):
    ready, _, _ = select.select([c.sock for c in socks], [], [], timeout)
    return [c for c in socks if c.sock in ready]




def read_records(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def free_port() -> int:
    """A port that was free a moment ago (bind port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def subprocess_env() -> dict:
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=str(TESTS) + (os.pathsep + path if path else ""))


@contextlib.contextmanager
def server_process(args_for_port, tmp_path: pathlib.Path):
    """Start ``args_for_port(port)`` and wait until it accepts on ``port``;
    yields ``(proc, port, output)``. The process is always killed and reaped."""
    for attempt in range(3):
        port = free_port()
        out_path = tmp_path / f"server-{port}.out"
        err_path = tmp_path / f"server-{port}.err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(args_for_port(port), stdout=out, stderr=err,
                                    env=subprocess_env(), cwd=tmp_path)

        def output() -> str:
            return (f"--- stdout ---\n{out_path.read_text(errors='replace')[-3000:]}\n"
                    f"--- stderr ---\n{err_path.read_text(errors='replace')[-6000:]}")

        try:
            deadline = time.monotonic() + START_DEADLINE
            while True:
                if proc.poll() is not None:
                    break
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"server did not accept on port {port} within "
                                    f"{START_DEADLINE} s\n{output()}")
                    time.sleep(0.05)
            if proc.poll() is not None:
                if "Address already in use" in err_path.read_text(errors="replace") and attempt < 2:
                    continue  # lost the race for the port: try another
                pytest.fail(f"server exited early with code {proc.returncode}\n{output()}")
            yield proc, port, output
            return
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(EXIT_DEADLINE)


def stop_with_sigterm(proc: subprocess.Popen, output) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(EXIT_DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server did not exit within {EXIT_DEADLINE} s of SIGTERM\n{output()}")
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{output()}"


def muxpool_command() -> list[str]:
    """The installed ``muxpool`` script next to this interpreter, else ``-m muxpool.cli``."""
    script = shutil.which("muxpool", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "muxpool.cli"]


# --- the documented examples -----------------------------------------------------------


def test_documented_base_request_handler_example(make_server, engine):
    srv = make_server(MyTCPHandler, engine)
    assert ask_once(srv.address, b"hello\n") == b"HELLO"
    assert ask_once(srv.address, b"again\n") == b"AGAIN"


def test_documented_stream_request_handler_example(make_server, engine):
    srv = make_server(MyStreamHandler, engine)
    assert ask_once(srv.address, b"hello\n") == b"HELLO"
    assert ask_once(srv.address, b"again\n") == b"AGAIN"


# --- long-lived connections ------------------------------------------------------------


def test_long_lived_connection_answers_100_lines_in_order(make_server, clients, engine):
    srv = make_server(LineEchoHandler, engine)
    client = clients(srv.address)
    lines = [b"line %03d\n" % i for i in range(100)]
    client.send(lines[0])
    assert client.readline() == lines[0]  # lockstep once, then all the rest in one write
    client.send(b"".join(lines[1:]))
    assert [client.readline() for _ in lines[1:]] == lines[1:]
    client.sock.shutdown(socket.SHUT_WR)
    assert client.read_to_eof() == b""  # the handler's `for line in rfile` ended: closed


def test_twenty_concurrent_long_lived_connections_are_all_served(make_server, clients, engine):
    srv = make_server(LineEchoHandler, engine)
    conns = [clients(srv.address) for _ in range(20)]
    # Every connection answers while all 20 stay open: 20 handlers at once.
    for i, client in enumerate(conns):
        client.send(b"first %d\n" % i)
    for i, client in enumerate(conns):
        assert client.readline() == b"first %d\n" % i
    for i, client in enumerate(conns):
        client.send(b"second %d\n" % i)
    for i, client in enumerate(conns):
        assert client.readline() == b"second %d\n" % i


def test_threadpool_serves_workers_connections_at_once_and_the_rest_wait(make_server, clients):
    srv = make_server(LineEchoHandler, "threadpool", workers=4)
    served = [clients(srv.address) for _ in range(4)]
    for i, client in enumerate(served):
        client.send(b"served %d\n" % i)
    for i, client in enumerate(served):
        assert client.readline() == b"served %d\n" % i  # all 4 held open, all answered

    waiting = [clients(srv.address) for _ in range(4)]  # connect() succeeds: not refused
    for i, client in enumerate(waiting):
        client.send(b"waiting %d\n" % i)
    # Neither answered nor refused (a reset or EOF would make them readable too).
    assert readable(waiting, 0.5) == [], "a 5th connection was served (or refused) with 4 workers"

    answered = []
    for closing in served:
        closing.close()  # a pool thread frees up: the next waiting connection gets it
        deadline = time.monotonic() + DEADLINE
        ready = []
        while not ready and time.monotonic() < deadline:
            ready = readable([c for c in waiting if c not in answered], 0.1)
        assert ready, "a waiting connection was not served after an earlier one closed"
        assert len(ready) == 1, "more connections served at once than workers"
        client = ready[0]
        i = waiting.index(client)
        assert client.readline() == b"waiting %d\n" % i
        answered.append(client)
    assert sorted(map(waiting.index, answered)) == [0, 1, 2, 3]
    for i, client in enumerate(waiting):  # and they stay served
        client.send(b"again %d\n" % i)
        assert client.readline() == b"again %d\n" % i


# --- what the handler sees -------------------------------------------------------------


def test_handler_sees_server_address_client_address_and_call_order(make_server, clients, engine,
                                                                   tmp_path, monkeypatch):
    record = tmp_path / "record.jsonl"
    # The environment, not a subclass made here: prefork workers started from this
    # multi-threaded process come from a fork server, so the handler must be importable.
    monkeypatch.setenv(compat_handlers.RECORD_ENV, str(record))
    srv = make_server(RecordingHandler, engine)
    client = clients(srv.address)
    client_address = client.sock.getsockname()
    client.send(b"x")
    assert client.readline() == b"ok\n"
    assert client.read_to_eof() == b""  # the socket closes only after finish() ran

    events = [r for r in read_records(record) if tuple(r["client_address"]) == client_address]
    assert [r["event"] for r in events] == ["setup", "handle", "finish"]
    handle = events[1]
    assert tuple(handle["server_address"]) == srv.address
    assert tuple(handle["socket_name"]) == srv.address
    assert handle["server_type"] == "muxpool.server.Server"
    if engine == "prefork":
        assert handle["pid"] != os.getpid()  # recorded in a worker process
    else:
        assert handle["pid"] == os.getpid()


def test_recording_handler_reads_its_path_from_the_environment(make_server, clients, tmp_path,
                                                               monkeypatch):
    record = tmp_path / "env-record.jsonl"
    monkeypatch.setenv(compat_handlers.RECORD_ENV, str(record))
    srv = make_server(RecordingHandler, "threaded")
    client = clients(srv.address)
    client.send(b"x")
    assert client.readline() == b"ok\n"
    assert client.read_to_eof() == b""
    assert [r["event"] for r in read_records(record)] == ["setup", "handle", "finish"]


def test_a_handler_that_raises_does_not_stop_the_server(make_server, engine, caplog):
    srv = make_server(FailingHandler, engine)
    assert ask_once(srv.address, b"boom\n") == b""  # its connection is closed, nothing sent
    assert ask_once(srv.address, b"hello\n") == b"HELLO"
    assert ask_once(srv.address, b"boom\n") == b""
    assert ask_once(srv.address, b"still here\n") == b"STILL HERE"
    # prefork too: workers from the fork server hand their records to this process's loggers
    wait_for(lambda: any("handler failed on purpose" in str(r.exc_info and r.exc_info[1])
                         for r in caplog.records), what="the handler's error to be logged")
    if engine == "prefork":
        assert any(r.process != os.getpid() for r in caplog.records if r.exc_info)


# --- engines that cannot run it ----------------------------------------------------------


@pytest.mark.parametrize("handler", [MyTCPHandler, MyStreamHandler])
def test_loop_engine_refuses_a_socketserver_handler(handler):
    with pytest.raises(ValueError) as info:
        Server(handler, port=0, engine="loop")
    message = str(info.value)
    assert "threadpool" in message and "threaded" in message
    assert handler.__name__ in message


def test_prefork_with_loop_workers_refuses_a_socketserver_handler():
    srv = None
    try:
        with pytest.raises(ValueError, match="threadpool"):
            srv = Server(MyTCPHandler, port=0, engine="prefork", processes=1, worker_engine="loop")
    finally:
        if srv is not None:  # built but never started: release its socket and selector
            srv.socket.close()
            srv._mux.close()


# --- graceful shutdown -------------------------------------------------------------------


def test_shutdown_ends_a_long_lived_stream_handler(make_server, clients, engine):
    # drain_timeout well above the wait: returning in time means a graceful drain,
    # not the hard stop that closes connections after drain_timeout.
    srv = make_server(LineEchoHandler, engine, drain_timeout=30)
    client = clients(srv.address)
    client.send(b"before\n")
    assert client.readline() == b"before\n"  # the handler is now blocked in readline()

    started = time.monotonic()
    srv.shutdown(timeout=DEADLINE)
    elapsed = time.monotonic() - started
    assert elapsed < DEADLINE - 1, f"shutdown() did not finish (waited {elapsed:.1f} s)"
    assert client.read_to_eof() == b""  # the client sees its connection closed
    with pytest.raises(OSError):
        socket.create_connection(srv.address, timeout=DEADLINE).close()


# --- subprocesses: muxpool.serve, the CLI, gevent ----------------------------------------


SERVE_SCRIPT = textwrap.dedent("""\
    import sys

    import muxpool
    from compat_handlers import MyTCPHandler

    muxpool.serve(MyTCPHandler, ("127.0.0.1", int(sys.argv[1])), engine="threaded")
""")


def test_serve_function_in_a_script_answers_and_stops_on_sigterm(tmp_path):
    script = tmp_path / "serve_script.py"
    script.write_text(SERVE_SCRIPT)
    with server_process(lambda port: [sys.executable, str(script), str(port)], tmp_path) as (
            proc, port, output):
        assert ask_once(("127.0.0.1", port), b"hello\n") == b"HELLO", output()
        stop_with_sigterm(proc, output)


def test_cli_serves_a_handler_class_on_threaded(tmp_path):
    args = lambda port: [*muxpool_command(), "serve", "compat_handlers:MyTCPHandler",
                         "--engine", "threaded", "--port", str(port)]
    with server_process(args, tmp_path) as (proc, port, output):
        assert ask_once(("127.0.0.1", port), b"hello\n") == b"HELLO", output()
        assert ask_once(("127.0.0.1", port), b"twice\n") == b"TWICE", output()
        stop_with_sigterm(proc, output)


def test_cli_serves_a_stream_handler_on_gevent(tmp_path):
    pytest.importorskip("gevent")
    args = lambda port: [sys.executable, "-m", "muxpool.cli", "serve",
                         "compat_handlers:MyStreamHandler", "--engine", "gevent",
                         "--port", str(port)]
    with server_process(args, tmp_path) as (proc, port, output):
        assert ask_once(("127.0.0.1", port), b"hello\n") == b"HELLO", output()
        # Several at once: each greenlet blocks on its own socket only.
        socks = [socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) for _ in range(5)]
        try:
            for i, sock in enumerate(reversed(socks)):
                sock.sendall(b"conn %d\n" % i)
            for i, sock in enumerate(reversed(socks)):
                reply = b""
                while chunk := sock.recv(1024):
                    reply += chunk
                assert reply == b"CONN %d" % i, output()
        finally:
            for sock in socks:
                sock.close()
        stop_with_sigterm(proc, output)
