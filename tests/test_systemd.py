"""systemd support with real parts: sockets handed down by descriptor to the real
``muxpool serve`` (by a launcher written here, and by systemd-socket-activate when
installed), and a real datagram socket standing in for systemd's notify socket.

A handed-down socket already listens, so a client connects at once and its
greeting arrives when the server accepts: no polling for readiness anywhere.
Every process started here is killed, with its session, on the way out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import uuid

import pytest
from support.engines import CLI_ENGINES

from muxpool import ConfigError, Server
from muxpool.config import ServerConfig
from muxpool.systemd import Notifier, watchdog_interval

pytestmark = pytest.mark.timeout(60)

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
for _name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC"):
    ENV.pop(_name, None)
MUXPOOL = [sys.executable, "-m", "muxpool.cli"]
GREETING = b"Hello client-side"
ENGINES = [e for e in CLI_ENGINES if e != "prefork-threaded"]

# What systemd does between fork and exec, in the process it starts: the passed
# descriptors moved to 3, 4, ... and LISTEN_PID set to that process's own pid
# (exec keeps it). TEST_LISTEN_PID overrides the pid, as a stale inherited value.
LAUNCHER = """\
import fcntl, os, sys
given = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in given]  # out of the way of 3, 4, ...
for fd in given:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ["LISTEN_PID"] = os.environ.pop("TEST_LISTEN_PID", str(os.getpid()))
os.environ["LISTEN_FDS"] = str(len(given))
os.execv(sys.argv[2], sys.argv[2:])
"""


def engine_param(engine: str):
    if engine == "gevent":
        return pytest.param(engine, marks=pytest.mark.skipif(
            not _installed("gevent"), reason="gevent is not installed"))
    return engine


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@contextlib.contextmanager
def started(command: list[str], fds: tuple[int, ...] = (), env: dict | None = None):
    """``command`` with ``fds`` inherited; its session always killed on the way out."""
    proc = subprocess.Popen(command, pass_fds=fds, env=env or ENV, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=ROOT)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def activated(sockets: list, command: list[str], env: dict | None = None):
    """``command`` started as systemd starts a socket-activated service."""
    fds = tuple(s.fileno() for s in sockets)
    launch = [sys.executable, "-c", LAUNCHER, ",".join(map(str, fds)), *command]
    return started(launch, fds, env)


def listener(family: int = socket.AF_INET, path: pathlib.Path | None = None) -> socket.socket:
    if family == socket.AF_UNIX:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen()
        return sock
    return socket.create_server(("127.0.0.1", 0))


def greeting(address, family: int = socket.AF_INET) -> bytes:
    """What the server says first, and its echo of one message."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(address)
        first = sock.recv(len(GREETING))
        sock.sendall(b"ping")
        return first + b"|" + sock.recv(100)


SERVED = GREETING + b"|response: ping"


# --- the real command on a handed-down socket -------------------------------------


@pytest.mark.parametrize("engine", [engine_param(e) for e in ENGINES])
def test_socket_activation_serves_on_the_inherited_socket(engine):
    sock = listener()
    address = sock.getsockname()
    with sock, activated([sock], [*MUXPOOL, "serve", "--engine", engine]) as proc:
        sock.close()  # the server's copy alone: should it die, the client is refused, not left waiting
        assert greeting(address) == SERVED
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_socket_activation_on_a_unix_socket(tmp_path):
    path = tmp_path / "echo.sock"
    sock = listener(socket.AF_UNIX, path)
    with sock, activated([sock], [*MUXPOOL, "serve", "--engine", "loop"]):
        sock.close()
        assert greeting(str(path), socket.AF_UNIX) == SERVED


@pytest.mark.parametrize("engine", ["threadpool", "prefork"])
def test_fd_flag_serves_on_the_descriptor_given(engine):
    sock = listener()
    address = sock.getsockname()
    with sock, started([*MUXPOOL, "serve", "--fd", str(sock.fileno()), "--engine", engine],
                       (sock.fileno(),)):
        sock.close()
        assert greeting(address) == SERVED


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed (Debian package systemd)")
def test_systemd_socket_activate_starts_the_server_on_first_connection():
    with socket.socket() as probe:  # it refuses port 0: take a free one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = ["systemd-socket-activate", "--listen", f"127.0.0.1:{port}", "--fdname=echo",
               *MUXPOOL, "serve", "--engine", "loop"]
    with started(command) as proc:
        said = proc.stderr.readline()  # printed once it listens
        assert said.startswith(f"Listening on 127.0.0.1:{port}"), said
        assert greeting(("127.0.0.1", port)) == SERVED


def test_a_server_made_in_python_takes_the_fd():
    sock = listener()
    address = sock.getsockname()
    with Server(fd=sock.detach(), engine="loop").start() as server:
        assert server.address == address
        assert greeting(address) == SERVED


# --- what is not a listening stream socket: one line, exit 2 ----------------------

FIX_FD = "(give the number of an inherited listening TCP or Unix stream socket)"
FIX_UNIT = ("(list ListenStream= sockets in the .socket unit, with Accept=no: muxpool accepts "
            "on them itself)")


def _regular_file(tmp_path):
    return open(tmp_path / "plain.txt", "w")


def _udp(_tmp_path):
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def _unlistened(_tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


BAD = {"regular file": (_regular_file, "is a regular file, not a socket"),
       "udp socket": (_udp, "is a datagram socket, not a stream socket"),
       "not listening": (_unlistened, "is a stream socket that is not listening")}


def _errors(proc) -> tuple[int, list[str]]:
    _out, err = proc.communicate(timeout=30)
    return proc.returncode, err.strip().splitlines()


@pytest.mark.parametrize("kind", list(BAD))
def test_fd_flag_refuses_what_it_cannot_accept_on(kind, tmp_path):
    make, problem = BAD[kind]
    with make(tmp_path) as bad:
        fd = bad.fileno()
        with started([*MUXPOOL, "serve", "--fd", str(fd)], (fd,)) as proc:
            assert _errors(proc) == (2, [f"muxpool: error: --fd {fd} {problem} {FIX_FD}"])


@pytest.mark.parametrize("kind", list(BAD))
def test_socket_activation_refuses_what_it_cannot_accept_on(kind, tmp_path):
    make, problem = BAD[kind]
    with make(tmp_path) as bad, activated([bad], [*MUXPOOL, "serve"]) as proc:
        assert _errors(proc) == (2, [f"muxpool: error: LISTEN_FDS=1 passes fd 3, which {problem} "
                                     f"{FIX_UNIT}"])


def test_fd_flag_refuses_a_closed_descriptor():
    with started([*MUXPOOL, "serve", "--fd", "99"]) as proc:
        assert _errors(proc) == (2, [f"muxpool: error: --fd 99 is not an open descriptor {FIX_FD}"])


def test_fd_and_unix_path_together_are_refused():
    with pytest.raises(ConfigError, match=r"fd=3 is an inherited socket, so unix_path would bind nothing"):
        ServerConfig(fd=3, unix_path="/tmp/echo.sock")


# --- listen_fds, as systemd's own library reads the environment -------------------

PROBE = """\
import json, os, socket, subprocess, sys
from muxpool import ConfigError
from muxpool.systemd import listen_fds_with_names
try:
    found = [(name, sock.fileno(), sock.family == socket.AF_UNIX, sock.type == socket.SOCK_STREAM,
              os.get_inheritable(sock.fileno())) for sock, name in listen_fds_with_names()]
except ConfigError as exc:
    found = str(exc)
left = sorted(k for k in os.environ if k.startswith("LISTEN_"))
child = subprocess.run([sys.executable, "-c", "import os; print(sorted(k for k in os.environ "
                        "if k.startswith('LISTEN_')))"], capture_output=True, text=True).stdout
print(json.dumps({"found": found, "left": left, "child": child.strip()}))
"""


def probe(sockets: list, **env: str) -> dict:
    with activated(sockets, [sys.executable, "-c", PROBE], {**ENV, **env}) as proc:
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return json.loads(out)


def test_listen_fds_takes_every_socket_with_its_name_and_unsets_the_environment(tmp_path):
    with listener() as tcp, listener(socket.AF_UNIX, tmp_path / "admin.sock") as unix:
        seen = probe([tcp, unix], LISTEN_FDNAMES="web:admin")
    # Each from fd 3 on, in order, its own family, and not inherited by a child.
    assert seen == {"found": [["web", 3, False, True, False], ["admin", 4, True, True, False]],
                    "left": [], "child": "[]"}


def test_listen_fds_without_names_calls_them_unknown():
    with listener() as tcp:
        assert probe([tcp])["found"] == [["unknown", 3, False, True, False]]


def test_listen_fds_for_another_pid_are_not_ours_and_are_unset():
    with listener() as tcp:
        assert probe([tcp], TEST_LISTEN_PID="1") == {"found": [], "left": [], "child": "[]"}


def test_listen_fds_refuses_names_that_do_not_match_the_count():
    with listener() as tcp:
        seen = probe([tcp], LISTEN_FDNAMES="web:admin")
    assert seen["found"] == ("LISTEN_FDS=1 does not match LISTEN_FDNAMES='web:admin' (give one "
                             "name per descriptor, or no LISTEN_FDNAMES)")
    assert seen["left"] == []


# --- sd_notify, to a real datagram socket ------------------------------------------


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path, monkeypatch):
    """A datagram socket where systemd's would be, named in NOTIFY_SOCKET."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        name = str(tmp_path / "notify")
        sock.bind(name)
    else:
        name = f"@muxpool-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name[1:])
    sock.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    with sock:
        yield sock


def test_notifier_sends_each_state(notify_socket):
    with Notifier() as notifier:
        assert notifier.enabled
        assert notifier.ready()
        assert notify_socket.recv(4096) == f"READY=1\nMAINPID={os.getpid()}".encode()
        assert notifier.stopping()
        assert notify_socket.recv(4096) == b"STOPPING=1"
        assert notifier.watchdog()
        assert notify_socket.recv(4096) == b"WATCHDOG=1"
        assert notifier.status("serving\non 127.0.0.1:8088")  # one line: a newline would start a new key
        assert notify_socket.recv(4096) == b"STATUS=serving on 127.0.0.1:8088"


def test_notifier_never_blocks_and_warns_once_when_the_socket_is_full(notify_socket, caplog):
    sent = []
    with caplog.at_level(logging.WARNING, "muxpool.systemd"), Notifier() as notifier:
        for _ in range(100_000):  # nobody reads: the queue fills, and sending must not wait
            sent.append(notifier.watchdog())
            if not sent[-1]:
                break
        assert sent[-1] is False and sent[0] is True
        assert notifier.watchdog() is False
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["cannot notify systemd at "
                                                                       + os.environ["NOTIFY_SOCKET"]]


def test_notifier_is_a_no_op_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with Notifier() as notifier:
        assert not notifier.enabled
        assert [notifier.ready(), notifier.stopping(), notifier.watchdog(),
                notifier.status("x")] == [False] * 4


def test_notifier_to_a_socket_that_is_gone_does_not_raise(tmp_path):
    with Notifier(str(tmp_path / "nobody")) as notifier:
        assert notifier.enabled and notifier.ready() is False


def test_notifier_ignores_an_address_it_cannot_use(caplog):
    with caplog.at_level(logging.WARNING, "muxpool.systemd"):
        notifier = Notifier("vsock:2:1234")
    assert not notifier.enabled and notifier.ready() is False
    assert "is not a Unix socket path or @name" in caplog.text


@pytest.mark.parametrize("usec, pid, expected", [
    (None, None, None),
    ("4000000", None, 2.0),
    ("4000000", "self", 2.0),
    ("4000000", "1", None),  # the supervisor's, inherited by a worker
    ("0", None, None),
    ("soon", None, None),
])
def test_watchdog_interval_is_half_the_period_for_this_process(usec, pid, expected, monkeypatch):
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert watchdog_interval() == expected


# --- the sample units ---------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_sample_units_verify_cleanly(tmp_path):
    """systemd's own parser: an unknown key or a bad value is a warning it prints."""
    units = ROOT / "docs" / "systemd"
    service = (units / "muxpool-echo.service").read_text()
    assert "\nType=notify\n" in service and "\nWatchdogSec=" in service
    assert "\nListenStream=127.0.0.1:8088\n" in (units / "muxpool-echo.socket").read_text()
    # As the README installs them: ExecStart pointing at a muxpool that exists.
    (tmp_path / "muxpool-echo.service").write_text(
        service.replace("/opt/muxpool/.venv/bin/muxpool", str(pathlib.Path(sys.executable).parent / "muxpool")))
    shutil.copy(units / "muxpool-echo.socket", tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "muxpool-echo.socket"),
                             str(tmp_path / "muxpool-echo.service")], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# --- the real command tells its service manager how it is doing ---------------------------


def _datagrams_until(sock: socket.socket, wanted: bytes, seen: list[bytes]) -> None:
    while not any(wanted in d for d in seen):
        seen.append(sock.recv(4096))  # the socket's timeout bounds each wait


@pytest.mark.parametrize("engine", ["loop", "prefork"])
def test_serve_says_ready_pings_the_watchdog_from_its_loop_and_says_stopping(engine, tmp_path):
    """READY=1 only once a client can be served, WATCHDOG=1 again and again while the loop
    turns (WATCHDOG_USEC=200 ms: every 0.1 s), STOPPING=1 when SIGTERM starts the drain."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(20)
        port = socket.create_server(("127.0.0.1", 0))
        address = port.getsockname()
        port.close()
        env = {**ENV, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"}
        command = [*MUXPOOL, "serve", "--engine", engine, "--port", str(address[1])]
        if engine == "prefork":
            command += ["--processes", "2"]
        with started(command, env=env) as proc:
            seen: list[bytes] = []
            _datagrams_until(notify, b"READY=1", seen)
            assert greeting(address) == SERVED  # ready meant ready
            assert f"MAINPID={proc.pid}".encode() in seen[-1]
            while sum(d == b"WATCHDOG=1" for d in seen) < 3:  # a timer that re-arms itself
                seen.append(notify.recv(4096))
            proc.send_signal(signal.SIGTERM)
            _datagrams_until(notify, b"STOPPING=1", seen)
            assert proc.wait(20) == 0
        ready_at = next(i for i, d in enumerate(seen) if b"READY=1" in d)
        assert b"WATCHDOG=1" not in seen[:ready_at]  # no ping before serving
