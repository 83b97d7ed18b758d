"""Every mistake a first-time user makes with the ``muxpool`` command gets one line,
``muxpool: error: <what> (<how to fix>)``, and an exit code: 2 for usage and
configuration, 1 for a failure at run time. Each case runs the real command.

The cases' processes are started together (a module fixture, a few at a time:
each is a fresh interpreter), and each case is a test of its own. README's
"Common mistakes" section quotes these cases; a test checks that it quotes
exactly them, command and message.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import pytest

from muxpool import Server
from muxpool.config import ServerConfig
from muxpool.handlers import HandlerError, resolve_handler

pytestmark = pytest.mark.timeout(60)

ROOT = pathlib.Path(__file__).resolve().parent.parent
MUXPOOL = [sys.executable, "-m", "muxpool.cli"]
# The commands run in an app's folder: this checkout's muxpool must still be the one imported.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
APP = '''\
def handle(message, conn):
    return b"ok: " + message


def one_arg(message):
    return message


async def coroutine(message, conn):
    return message


class Greeter:
    def on_message(self, message):
        return message


calls = []


def counter(message, conn):  # a different reply each time: bench cannot learn it
    calls.append(message)
    return b"%d" % len(calls)
'''


class Case(NamedTuple):
    command: str  # after "muxpool"; {port} is a port in use, {closed} one nobody listens on
    code: int
    line: str  # the last line of stderr; {dir} is the working directory


USAGE = "see muxpool serve --help"
CASES = {
    "no command": Case("", 2, "muxpool: error: no command given (choose serve, client or bench; "
                       "muxpool --help says more)"),
    "unknown flag": Case("serve --nope", 2, "muxpool: error: unrecognized arguments: --nope "
                         "(see muxpool --help)"),
    "port out of range": Case("serve --port 99999", 2, "muxpool: error: --port 99999 is out of range "
                              "(give a port from 0 to 65535; 0 picks a free one)"),
    "port in use": Case("serve --port {port}", 1, "muxpool: error: cannot listen on 127.0.0.1:{port}: "
                        "Address already in use (stop the server using it, or pick another --port; "
                        "--port 0 picks a free one)"),
    "host not here": Case("serve --host 192.0.2.1", 1, "muxpool: error: cannot listen on "
                          "192.0.2.1:8088: Cannot assign requested address (give --host 127.0.0.1, "
                          "0.0.0.0, :: or an address of this machine)"),
    "unix folder missing": Case("serve --unix /nonexistent/muxpool.sock", 1, "muxpool: error: cannot "
                                "listen on /nonexistent/muxpool.sock: its folder does not exist "
                                "(create its folder, or pick another --unix path)"),
    "unix path a file": Case("serve --unix myapp.py", 1, "muxpool: error: cannot listen on myapp.py: "
                             "the path exists and is not a socket (remove it, or pick another --unix "
                             "path)"),
    "no attribute": Case("serve os:nosuchattr", 2, "muxpool: error: os has no attribute 'nosuchattr' "
                         "(check the name after ':'; give a function handle(message, conn) or a "
                         "class with on_message(self, conn, message))"),
    "module only": Case("serve os", 2, "muxpool: error: app 'os' is not module:attr (name the module "
                        "and the handler in it, e.g. mymodule:handle)"),
    "no such module": Case("serve mymodule:handle", 2, "muxpool: error: no module named 'mymodule' in "
                           "{dir} or on the Python path (run muxpool from the folder that holds it, "
                           "or give --app-dir FOLDER)"),
    "app dir missing": Case("serve myapp:handle --app-dir /nonexistent", 2, "muxpool: error: "
                            "--app-dir /nonexistent is not a folder (give the folder that holds the "
                            "app's module)"),
    "module raises": Case("serve broken:handle", 1, "muxpool: error: importing broken raised "
                          "RuntimeError: no DATABASE_URL at {dir}/broken.py:1 (fix the module, or "
                          "install what it imports; --debug shows the traceback)"),
    "not a handler": Case("serve os:sep", 2, "muxpool: error: '/' is a str, not a handler (give a "
                          "function handle(message, conn) or a class with on_message(self, conn, "
                          "message))"),
    "function signature": Case("serve myapp:one_arg", 2, "muxpool: error: handler one_arg(message) "
                               "cannot be called as one_arg(message, conn) (define it as def "
                               "one_arg(message, conn): the function form takes the message first; "
                               "a class's on_message(self, conn, message) takes the connection first)"),
    "method signature": Case("serve myapp:Greeter", 2, "muxpool: error: handler Greeter.on_message"
                             "(self, message) cannot be called as on_message(conn, message) (define "
                             "it as def on_message(self, conn, message): a class's methods take the "
                             "connection first; the function form is handle(message, conn))"),
    "async handler": Case("serve myapp:coroutine", 2, "muxpool: error: handler coroutine is async "
                          "def, and muxpool calls handlers as plain functions: it would never be "
                          "awaited (define def coroutine(message, conn); a handler may block on the "
                          "threadpool, threaded or gevent engine)"),
    "certfile missing": Case("serve --certfile /nope.pem", 2, "muxpool: error: --certfile /nope.pem "
                             "does not exist (give the path of a PEM file)"),
    "certfile not PEM": Case("serve --certfile myapp.py --port 0", 2, "muxpool: error: cannot load "
                             "the TLS certificate: [SSL] PEM lib (give --certfile "
                             "a PEM certificate chain, and --keyfile its private key if it is not in "
                             "that file)"),
    "keyfile alone": Case("serve --keyfile myapp.py", 2, "muxpool: error: --keyfile myapp.py needs a "
                          "certfile (give certfile too, or neither)"),
    "log level": Case("serve --log-level bogus", 2, "muxpool: error: argument --log-level: 'bogus' is "
                      f"not a level: choose debug, info, warning, error or critical ({USAGE})"),
    "engine": Case("serve --engine fast", 2, "muxpool: error: argument --engine: invalid choice: "
                   "'fast' (choose from 'loop', 'threadpool', 'threaded', 'gevent', 'auto', 'prefork') "
                   f"({USAGE})"),
    "pool off threadpool": Case("serve --engine loop --pool process", 2, "muxpool: error: --pool "
                                "offloads handlers from the threadpool engine; the loop engine runs "
                                "them itself (use --engine threadpool with --pool, or drop --pool)"),
    "pool workers alone": Case("serve --pool-workers 4", 2, "muxpool: error: --pool-workers sizes "
                               "--pool (add --pool process or --pool dask, or drop it)"),
    "pool workers with a scheduler": Case("serve --pool dask --dask-address tcp://127.0.0.1:8786 "
                                          "--pool-workers 4", 2, "muxpool: error: --pool-workers "
                                          "sizes the local cluster --pool dask starts, and "
                                          "--dask-address uses a running one (size that cluster's "
                                          "workers yourself, or drop --dask-address)"),
    "workers 0": Case("serve --workers 0", 2, "muxpool: error: --workers 0 is out of range (give 1 "
                      "or more handler threads, or leave it out for 32)"),
    "workers -3": Case("serve --workers -3", 2, "muxpool: error: --workers -3 is out of range (give "
                       "1 or more handler threads, or leave it out for 32)"),
    "workers off threadpool": Case("serve --engine threaded --workers 8", 2, "muxpool: error: "
                                   "--workers 8 applies to the threadpool or auto engine, not threaded (use "
                                   "engine threadpool, or leave workers out)"),
    "processes off prefork": Case("serve --processes 4", 2, "muxpool: error: --processes 4 applies to "
                                  "the prefork engine, not auto (use engine prefork, or leave "
                                  "processes out)"),
    "worker engine off prefork": Case("serve --worker-engine loop", 2, "muxpool: error: "
                                      "--worker-engine loop applies to the prefork engine, not auto "
                                      "(use engine prefork, or leave worker_engine out)"),
    "message size 0": Case("serve --max-message-size 0", 2, "muxpool: error: --max-message-size 0 "
                           "is out of range (give a size in bytes, 1 or more)"),
    "negative timeout": Case("serve --idle-timeout -5", 2, "muxpool: error: --idle-timeout -5.0 is "
                             "out of range (give seconds, or 0 for never)"),
    "empty busy message": Case("serve --busy-message=", 2, "muxpool: error: --busy-message '' is "
                               "empty (give some text, or leave the option out)"),
    "dualstack on IPv4": Case("serve --dualstack", 2, "muxpool: error: --dualstack needs an IPv6 "
                              "host, not '127.0.0.1' (listen on host '::' to accept IPv4 and IPv6)"),
    "client refused": Case("client :{closed}", 1, "muxpool: error: cannot talk to 127.0.0.1:{closed}: "
                           "Connection refused (is the server running there? start one with muxpool "
                           "serve)"),
    "bench port": Case("bench :99999", 2, "muxpool: error: ':99999' has no valid port: '99999' (give "
                       "HOST:PORT with a port from 1 to 65535, e.g. 127.0.0.1:8088)"),
    "bench host": Case("bench nohost.invalid:1", 2, "muxpool: error: cannot resolve 'nohost.invalid': "
                       "Name or service not known (check the host name, or give an IP address)"),
    "bench refused": Case("bench :{closed}", 1, "muxpool: error: cannot connect to 127.0.0.1:{closed}: "
                          "Connection refused (start the server first with muxpool serve, or give "
                          "its HOST:PORT)"),
    "bench connections": Case("bench -c 0", 2, "muxpool: error: argument -c/--connections: '0' is not "
                              "a whole number, 1 or more (see muxpool bench --help)"),
    "bench greeting": Case("bench --greeting-bytes hello", 2, "muxpool: error: argument "
                           "--greeting-bytes: 'hello' is not a whole number, 0 or more (see muxpool "
                           "bench --help)"),
    "compare workload": Case("bench --compare --workload bogus --out results", 2, "muxpool: error: "
                             "--workload 'bogus' is not a workload (give echo, io:MS or cpu:MS, e.g. "
                             "io:5 for 5 ms of waiting per message)"),
    "compare references": Case("bench --compare --references nope", 2, "muxpool: error: --references "
                               "'nope' names no such server: nope (choose from asyncio, uvloop, "
                               "gevent, socketserver, bare, or none)"),
    "compare engines": Case("bench --compare --engines fast", 2, "muxpool: error: --engines 'fast' "
                            "names no such server: fast (choose from loop, threadpool, threaded, "
                            "gevent, auto, prefork, each also as NAME+metrics)"),
    "compare address": Case("bench --compare :8088", 2, "muxpool: error: --compare starts its own "
                            "servers, so it takes no address (drop the address, or drop --compare to "
                            "load an existing server)"),
    "compare no module": Case("bench --compare --app mymodule:handle", 2, "muxpool: error: no module "
                              "named 'mymodule' in {dir} or on the Python path (run muxpool bench "
                              "from the folder that holds the module)"),
    "compare app": Case("bench --compare --app myapp:one_arg", 2, "muxpool: error: handler "
                        "one_arg(message) cannot be called as one_arg(message, conn) (define it as def "
                        "one_arg(message, conn): the function form takes the message first; a class's "
                        "on_message(self, conn, message) takes the connection first)"),
    "compare unlearnable": Case("bench --compare --app myapp:counter", 2, "muxpool: error: myapp:counter "
                                "answered the same request two different ways, so bench cannot know "
                                "the reply to expect (give --no-verify to count replies without "
                                "checking their bytes)"),
}
README_VALUES = {"port": "8088", "closed": "8088", "dir": "/home/me/app"}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("app")
    (folder / "myapp.py").write_text(APP)
    (folder / "broken.py").write_text('raise RuntimeError("no DATABASE_URL")\n')
    return folder


def run(args: list[str], cwd: pathlib.Path, env: dict | None = None, timeout: float = 30):
    """The command, to its end; killed (its whole session) if it outlives ``timeout``."""
    proc = subprocess.Popen(MUXPOOL + args, cwd=cwd, env=env or ENV, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def results(workdir):
    """Every case's (exit code, stdout, stderr), and the values its placeholders stand for."""
    values = {"closed": str(closed_port()), "dir": str(workdir)}
    with socket.create_server(("127.0.0.1", 0)) as taken:
        values["port"] = str(taken.getsockname()[1])
        with ThreadPoolExecutor(4) as pool:
            futures = {name: pool.submit(run, case.command.format(**values).split(), workdir)
                       for name, case in CASES.items()}
            done = {name: future.result() for name, future in futures.items()}
    return done, values


@pytest.mark.parametrize("name", list(CASES))
def test_mistake_is_one_line_and_an_exit_code(name, results):
    done, values = results
    code, out, err = done[name]
    case = CASES[name]
    lines = err.strip().splitlines()
    expected = case.line.format(**values)
    assert (code, lines[-1:]) == (case.code, [expected]), err
    if name == "no command":
        assert lines[0].startswith("usage: muxpool"), err  # and the usage above it
    else:
        assert len(lines) == 1, err


def test_bad_workload_writes_no_results(results, workdir):
    assert not (workdir / "results").exists()


@pytest.mark.parametrize("how", ["--debug", "MUXPOOL_DEBUG=1"])
def test_debug_shows_the_traceback(how, workdir):
    env = {**ENV, "MUXPOOL_DEBUG": "1"} if how.startswith("MUXPOOL") else None
    args = (["--debug"] if how == "--debug" else []) + ["serve", "--port", "99999"]
    code, _out, err = run(args, workdir, env=env)
    assert code == 1 and "Traceback (most recent call last)" in err, err
    assert "ConfigError: port=99999 is out of range" in err, err


def test_invalid_options_fail_when_the_server_is_made():
    with pytest.raises(ValueError, match=r"max_message_size=0 is out of range"):
        Server(max_message_size=0)
    with pytest.raises(ValueError, match=r"port=-1"):
        ServerConfig(port=-1)
    with pytest.raises(ValueError, match=r"idle_timeout='5'"):
        ServerConfig(idle_timeout="5")
    with pytest.raises(ValueError, match=r"workers=True is not a whole number"):
        ServerConfig(workers=True)

    def one_arg(message):
        return message

    with pytest.raises(HandlerError, match=r"one_arg\(message\) cannot be called as one_arg\(message, conn\)"):
        Server(one_arg, port=0)
    ServerConfig(idle_timeout=0, stats_interval=None, workers=1)  # the edges that are allowed


def test_handler_forms_checked_by_signature():
    class Static:
        @staticmethod
        def on_message(conn, message):
            return message

    class Leaving:
        def on_message(self, conn, message):
            return message

        def on_disconnect(self, conn):  # missing error
            pass

    resolve_handler(Static)
    resolve_handler(Static())
    resolve_handler(max)  # a builtin without a signature: allowed
    resolve_handler(lambda *args: None)
    with pytest.raises(HandlerError, match=r"Leaving\.on_disconnect\(self, conn\) cannot be called as "
                                           r"on_disconnect\(conn, error\)"):
        resolve_handler(Leaving)
    with pytest.raises(HandlerError, match=r"on_disconnect\(conn\) cannot be called"):
        resolve_handler(Leaving())


# --- apps load like gunicorn's ---------------------------------------------------------


@contextlib.contextmanager
def serving(args: list[str], cwd: pathlib.Path, module: str = "muxpool.cli", log: list | None = None):
    """``muxpool serve ARGS --port P`` until it accepts; always killed on the way out.
    With ``log``, the body may end the server (SIGTERM) and its stderr is appended."""
    port = closed_port()
    proc = subprocess.Popen([sys.executable, "-m", module, "serve", *args, "--port", str(port)],
                            cwd=cwd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=ENV)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"the server did not start: {proc.communicate()[1]}")
                time.sleep(0.05)  # a fresh interpreter starting: only the port can tell
        yield port if log is None else (port, proc)
    finally:
        if log is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)  # the body sent SIGTERM: let it drain and log its last line
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        err = proc.communicate()[1]
        if log is not None:
            log.append(err)


def ask(port: int, message: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(message + b"\n")
        return sock.makefile("rb").readline()


@pytest.mark.parametrize("module", ["muxpool", "muxpool.cli"], ids=["python -m muxpool", "muxpool.cli"])
def test_app_imports_from_the_working_directory(module, workdir):
    with serving(["myapp:handle", "--framing", "line"], workdir, module) as port:
        assert ask(port, b"hi") == b"ok: hi\n"


def test_app_dir(workdir, tmp_path):
    with serving(["myapp:handle", "--framing", "line", "--app-dir", str(workdir)], tmp_path) as port:
        assert ask(port, b"there") == b"ok: there\n"


# Mistakes against a running server (myapp:handle, line framing, on {port}).
SERVED_CASES = {
    "client greeting": Case("client :{port} --framing line --timeout 0.3", 1, "muxpool: error: "
                            "127.0.0.1:{port} sent no greeting in 0.3 s (a function handler sends "
                            "none: add --no-greeting)"),
    "client tls": Case("client :{port} --tls", 1, "muxpool: error: no TLS with 127.0.0.1:{port}: "
                       "WRONG_VERSION_NUMBER (drop --tls for a plain server, or serve with --certfile)"),
}


def test_client_mistakes_against_a_function_handler(workdir):
    with serving(["myapp:handle", "--framing", "line"], workdir) as port:
        for case in SERVED_CASES.values():
            code, _out, err = run(case.command.format(port=port).split(), workdir)
            assert (code, err.strip()) == (case.code, case.line.format(port=port)), err


# --- the serve log line ---------------------------------------------------------------


def test_serve_log_says_tls_and_counts_connections_in_english(workdir, tls_files):
    certfile, client_context = tls_files
    log: list = []
    with serving(["--certfile", str(certfile)], workdir, log=log) as (port, proc):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                assert sock.recv(100) == b"Hello client-side"
        proc.send_signal(signal.SIGTERM)
    assert re.search(r"serving the echo service on 127\.0\.0\.1:\d+ over TLS \(engine=auto, "
                     r"handlers on the loop thread, up to 32 threads take over from one blocked 2 ms, "
                     r"framing=raw\)", log[0]), log[0]
    assert "muxpool stopped (2 connections served)" in log[0], log[0]  # the readiness probe, the client


def test_serve_log_names_no_framing_for_a_socketserver_handler(workdir):
    (workdir / "tcp_app.py").write_text(
        "import socketserver\n\n\nclass Upper(socketserver.BaseRequestHandler):\n"
        "    def handle(self):\n        self.request.sendall(self.request.recv(100).upper())\n")
    log: list = []
    with serving(["tcp_app:Upper", "--engine", "threaded"], workdir, log=log) as (port, proc):
        proc.send_signal(signal.SIGTERM)
    assert re.search(r"serving Upper on 127\.0\.0\.1:\d+ \(engine=threaded, a thread per connection, "
                     r"at most 10000\)", log[0]), log[0]
    assert "muxpool stopped (1 connection served)" in log[0], log[0]  # the readiness probe's


# --- README's "Common mistakes" quotes these cases -------------------------------------


def readme_mistakes() -> list[tuple[str, str]]:
    """(command, error line) pairs from the README section's code blocks."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Common mistakes\n", 1)[1].split("\n## ", 1)[0]
    pairs, command = [], None
    for line in section.splitlines():
        if line.startswith("$ muxpool"):
            command = line[len("$ muxpool"):].strip()
        elif line.startswith("muxpool: error:"):
            pairs.append((command, line))
            command = None
    return pairs


def test_readme_common_mistakes_quotes_every_case_as_the_command_prints_it():
    quoted = readme_mistakes()
    expected = [(case.command.format(**README_VALUES), case.line.format(**README_VALUES))
                for case in [*CASES.values(), *SERVED_CASES.values()]]
    missing = [pair for pair in expected if pair not in quoted]
    unknown = [pair for pair in quoted if pair not in expected]
    assert not missing, f"README lacks: {missing}"
    assert not unknown, f"README quotes what no case produces: {unknown}"
