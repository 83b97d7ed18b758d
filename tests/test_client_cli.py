"""The client side and the command line: ``muxpool.Client``, the lesson's plain
socket client, and ``muxpool serve`` / ``muxpool client`` as real processes.

Every process a test starts is killed in a ``finally`` (``running``), and
every in-process server is shut down by its context manager. Readiness is
polled with deadlines, never slept for.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
from support.engines import SERVER_ENGINES as ENGINES
from support.servers import GREETING

from muxpool import Client, Server

pytestmark = pytest.mark.timeout(60)

TESTS_DIR = pathlib.Path(__file__).resolve().parent
MUXPOOL = [sys.executable, "-m", "muxpool.cli"]
START_DEADLINE = 20.0  # seconds for a fresh interpreter to import muxpool and listen
EXIT_DEADLINE = 10.0


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


def free_port() -> int:
    """A port that was free a moment ago (bind port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(args, **popen_options):
    """Start a process in its own session; whatever happens, it and every process it
    started (prefork's workers) are dead, and it is reaped, on the way out."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen_options)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group outlives a parent that exited
        proc.communicate(timeout=EXIT_DEADLINE)  # reap, and close the pipes


def wait_until_accepting(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + START_DEADLINE
    while True:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"server exited early with code {proc.returncode}:\n{out}\n{err}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"server did not accept on port {port} within {START_DEADLINE} s")
            time.sleep(0.05)


def stop_with_sigterm(proc: subprocess.Popen) -> tuple[str, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=EXIT_DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server did not exit within {EXIT_DEADLINE} s of SIGTERM")
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{err}"
    return out, err


# --- in-process --------------------------------------------------------------------------


def test_client_against_the_default_server():
    with Server(port=0) as srv:
        with Client(*srv.address, timeout=10) as client:
            assert client.greeting == GREETING
            assert client.request(b"hello") == b"response: hello"
            assert client.request(b"again") == b"response: again"


def test_the_lessons_plain_socket_client(engine, capsys):
    with Server(port=0, engine=engine) as srv:
        port = srv.address[1]
        # The lesson's client, as written there (plus a timeout, so a bug cannot hang us).
        sock = socket.socket()
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        try:
            data = sock.recv(1024)
            print(data.decode())
            sock.sendall(b"hello")
            data = sock.recv(1024)
            print(data.decode())
        finally:
            sock.close()
    assert capsys.readouterr().out == "Hello client-side\nresponse: hello\n"


# --- ``muxpool serve`` -------------------------------------------------------------------


def test_serve_subprocess_answers_then_exits_0_on_sigterm(engine):
    port = free_port()
    with running(MUXPOOL + ["serve", "--port", str(port), "--engine", engine]) as proc:
        wait_until_accepting(proc, port)
        with Client("127.0.0.1", port, timeout=10) as a, Client("127.0.0.1", port, timeout=10) as b:
            assert a.greeting == b.greeting == GREETING
            assert a.request(b"one") == b"response: one"
            assert b.request(b"two") == b"response: two"
            assert a.request(b"three") == b"response: three"
        out, err = stop_with_sigterm(proc)
    assert f"engine={engine}" in err  # the startup log line names the engine


def test_serve_an_app_from_a_module(engine):
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    args = MUXPOOL + ["serve", "server_apps:shout", "--port", str(port), "--engine", engine,
                      "--framing", "line"]
    with running(args, cwd=TESTS_DIR, env=env) as proc:
        wait_until_accepting(proc, port)
        with Client("127.0.0.1", port, framing="line", greeting=False, timeout=10) as client:
            assert client.request(b"quiet please") == b"shout: QUIET PLEASE"
            assert client.request(b"abc") == b"shout: ABC"
        stop_with_sigterm(proc)


# --- ``muxpool client`` ------------------------------------------------------------------


def test_client_subprocess_with_piped_stdin():
    with Server(port=0) as srv:
        host, port = srv.address[:2]
        result = subprocess.run(MUXPOOL + ["client", f"{host}:{port}"], input="hello\nworld\nq\n",
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == ["Hello client-side", "response: hello", "response: world"]


def test_client_subprocess_stops_at_end_of_input():
    with Server(port=0, framing="line") as srv:
        host, port = srv.address[:2]
        result = subprocess.run(MUXPOOL + ["client", f"{host}:{port}", "--framing", "line"],
                                input="only line\n", capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Hello client-side", "response: only line"]
