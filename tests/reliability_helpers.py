"""`muxpool serve` in a subprocess for the reliability tests, and what /proc says about it.

:func:`cli_server` starts the CLI on a free loopback port for any engine (gevent
included: the CLI patches its own process), waits until it accepts connections
(and, for prefork, its workers are forked), and always stops it: SIGTERM, then
SIGKILL to its whole session, so a prefork worker cannot outlive a failed test. A
:class:`ServedProcess` finds a prefork server's workers from
``/proc/<pid>/task/*/children`` and sums over the parent and its workers the
file descriptors, the resident memory and the client connections held.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_server_conformance import DEADLINE, _worker_connections, tcp_sockets, wait_for

RAW_GREETING = b"Hello client-side"  # the CLI's echo service, raw framing
RAW_PREFIX = b"response: "
PREFORK_PROCESSES = 2
# prefork's workers run threadpool by default; prefork-threaded covers its blocking worker engine.
ENGINES = ["loop", "auto", "threadpool", "threaded", "prefork", "prefork-threaded", "gevent"]


def needs_gevent(engine: str) -> None:
    if engine == "gevent":
        pytest.importorskip("gevent")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (every thread's children), from /proc."""
    kids: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids.update(int(k) for k in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return sorted(kids)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class ServedProcess:
    """A running ``muxpool serve``: its process, port, log, and (prefork) worker processes."""

    proc: subprocess.Popen
    port: int  # 0 on a Unix socket
    engine: str
    log_path: Path
    workers: list[int]  # the processes holding client connections (the parent itself if not prefork)
    unix_path: str | None = None

    @property
    def address(self) -> tuple[str, int] | str:
        return self.unix_path or ("127.0.0.1", self.port)

    def connect(self, timeout: float = DEADLINE) -> socket.socket:
        """A client socket connected to the server, TCP or Unix."""
        if self.unix_path is None:
            return socket.create_connection(self.address, timeout=timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        return sock

    @property
    def pids(self) -> list[int]:
        """The parent and, for prefork, every worker: what fds and RSS are summed over."""
        return sorted({self.proc.pid, *self.workers})

    def fds(self) -> int:
        return sum(fd_count(pid) for pid in self.pids)

    def rss_kib(self) -> int:
        return sum(rss_kib(pid) for pid in self.pids)

    def held(self, pids: list[int] | None = None) -> int:
        """Client connections on the port that the serving processes hold (LISTEN excluded).

        /proc/net/tcp is not read atomically, so read until two readings agree.
        """
        assert self.unix_path is None, "held() counts TCP connections; on a Unix socket count fds()"
        previous = None
        for _ in range(50):
            current = _worker_connections(pids or self.workers, self.port)
            if current == previous:
                break
            previous = current
        return len(current)

    def held_per_worker(self) -> list[int]:
        return [self.held([pid]) for pid in self.workers]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the {self.engine} server exited with {self.proc.returncode}: "
                                 f"{self.log()[-3000:]}")


@contextlib.contextmanager
def cli_server(engine: str, log_path: Path, *options: str, processes: int = PREFORK_PROCESSES,
               unix_path: Path | None = None, env: dict[str, str] | None = None) -> Iterator[ServedProcess]:
    """``python -m muxpool.cli serve --engine ENGINE OPTIONS`` on a free port (or on
    ``unix_path``, a Unix socket), with ``env`` added to its environment; always stopped.

    prefork gets ``--processes`` workers (threadpool inside each, the default;
    ``"prefork-threaded"`` runs threaded ones).
    Ready once a client can connect and, for prefork, every worker is forked.
    A port another process took meanwhile makes the server exit; then it is
    started again on another port (three tries).
    """
    kind, _, worker_engine = engine.partition("-")  # "prefork-threaded": its workers' engine
    for attempt in range(3):
        cmd = [sys.executable, "-m", "muxpool.cli", "serve", "--engine", kind, "--log-level", "INFO",
               *options]
        if kind == "prefork":
            cmd += ["--processes", str(processes)]
        if worker_engine:
            cmd += ["--worker-engine", worker_engine]
        served = _start(cmd, engine, log_path, unix_path, env)
        try:
            if _wait_until_listening(served) == "exited":
                if "Address already in use" in served.log() and attempt < 2:
                    continue
                served.check_running()
            if kind == "prefork":
                served.workers = _wait_for_workers(served, processes)
            yield served
            return
        finally:
            stop(served.proc)


def _start(cmd: list[str], engine: str, log_path: Path, unix_path: Path | None,
           env: dict[str, str] | None) -> ServedProcess:
    port = 0 if unix_path else free_port()
    where = ["--unix", str(unix_path)] if unix_path else ["--port", str(port)]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([*cmd, *where], stdout=subprocess.DEVNULL, stderr=log_file,
                                start_new_session=True, env=_environment(env))
    return ServedProcess(proc, port, engine, log_path, [proc.pid], str(unix_path) if unix_path else None)


def _environment(extra: dict[str, str] | None) -> dict[str, str]:
    """The server's environment: ours, ``extra``, and this folder on PYTHONPATH, so that
    ``muxpool serve some_test_app:handler`` finds the test apps."""
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def _wait_until_listening(served: ServedProcess) -> str:
    def ready():
        if served.proc.poll() is not None:
            return "exited"
        try:
            served.connect(timeout=1).close()
        except OSError:
            return False
        return "listening"

    return wait_for(ready, timeout=30, interval=0.05, what=f"`muxpool serve --engine {served.engine}`")


def _wait_for_workers(served: ServedProcess, processes: int) -> list[int]:
    """The workers, once each one's Server serves: the supervisor says "serving" before
    its workers have made their own loops (and their fds, which a test may count)."""
    kids = wait_for(lambda: len(kids := children(served.proc.pid)) == processes and kids,
                    what="the prefork workers")
    wait_for(lambda: served.log().count("muxpool serving ") >= processes + 1 or served.proc.poll() is not None,
             what="every prefork worker to serve")
    return kids


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains), then SIGKILL whatever is left in its session."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers too; the session is the server's own
    proc.wait()


def server_unread_bytes(server_port: int, client: socket.socket) -> int | None:
    """Bytes from ``client`` waiting unread in the server's receive queue for that connection
    (its row of /proc/net/tcp, seen from the server's end); None if there is no such row.
    Above zero and not shrinking, it shows the server has stopped reading the client."""
    local, remote = f":{server_port:04X}", f":{client.getsockname()[1]:04X}"
    for cols in tcp_sockets(server_port):
        if cols[1].endswith(local) and cols[2].endswith(remote):
            return int(cols[4].split(":")[1], 16)
    return None


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        data = sock.recv(n - len(got))
        if not data:
            raise ConnectionError(f"EOF after {len(got)} of {n} bytes")
        got += data
    return got


def wait_for_close(sock: socket.socket) -> float:
    """Read (and discard) until the server closes ``sock``; return the seconds waited.

    EOF or a reset both count; the socket's own timeout failing first is an error.
    """
    started = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def greeted_echo(sock, payload: bytes) -> None:
    """The echo service's greeting, then one request and its reply (raw framing: lockstep)."""
    assert recv_exactly(sock, len(RAW_GREETING)) == RAW_GREETING
    sock.sendall(payload)
    assert recv_exactly(sock, len(RAW_PREFIX) + len(payload)) == RAW_PREFIX + payload


def plain_cycle(address, i: int, ctx=None) -> None:
    """connect, greeting, one request, its reply, close."""
    with socket.create_connection(address, timeout=DEADLINE) as sock:
        greeted_echo(sock, b"cycle %d" % i)


def unread_bytes(sock: socket.socket) -> int:
    """Bytes in ``sock``'s kernel receive queue (SIOCINQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def raw_echo_large(sock: socket.socket, payload: bytes) -> None:
    """Send one large raw-framing request and read all of its reply. A raw message is
    whatever one server read returns, so the reply may come as several prefixed pieces:
    ``payload`` repeats one upper-case byte, which the lower-case prefix never contains."""
    sock.sendall(payload)
    data = b""
    while data.count(payload[:1]) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "EOF before the whole reply"
        data += chunk
    assert data.startswith(RAW_PREFIX) and data.replace(RAW_PREFIX, b"") == payload
