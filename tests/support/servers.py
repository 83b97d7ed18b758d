"""In-process servers for tests on every engine: start one, stop it leaving no
worker process behind, see what it holds, capture its log from every process.

``prefork`` serves in forked worker processes, so what a test observes must
cross processes: replies and closes on the client's socket, log records through
:func:`capturing_server_log` (a file every process appends to), and the
connections a server holds through :func:`held_connections` (the workers'
sockets, read from ``/proc``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time

import pytest
import server_apps

from muxpool import Server, make_framer

from .processes import process_exists
from .waiting import DEADLINE, wait_for

GREETING = server_apps.GREETING
PREFIX = server_apps.PREFIX


GREETING = server_apps.GREETING


PREFIX = server_apps.PREFIX


def serves_in_process(engine: str) -> bool:
    """Does ``engine`` serve connections in this (the test's) process?

    ``prefork`` does not: its connections, handler apps and log calls live in
    forked worker processes; ``srv._connections`` stays empty in the parent.
    """
    return engine != "prefork"


def in_process_only(engine: str, what: str) -> None:
    """Skip on prefork a test whose subject exists only inside the serving process."""
    if not serves_in_process(engine):
        pytest.skip(f"prefork serves in forked worker processes: {what}")


def serving_processes(srv: Server) -> int:
    """How many processes serve ``srv``'s connections, each a whole server with its options."""
    return 1 if serves_in_process(srv.config.engine) else srv.processes


def engine_options(engine: str) -> dict:
    """Options a server needs on ``engine`` beyond the test's own."""
    if engine == "prefork":
        # Two workers, so connections really spread over processes; threadpool inside
        # each, so blocking handlers work.
        return {"processes": 2, "worker_engine": "threadpool"}
    return {}


def start_server(srv: Server) -> Server:
    """``srv.start()``; for prefork, also wait until every worker has been forked.

    ``start()`` returns once the listener is bound, but the prefork supervisor
    forks its workers after that, on the server thread. A worker forked after
    the test has opened a client socket inherits that socket, and then the
    client's ``close()`` no longer closes the connection (no FIN while the
    worker holds a copy): the server would never see the client leave.
    """
    srv.start()
    if not serves_in_process(srv.config.engine):
        wait_for(lambda: len(srv.workers.copy()) >= srv.processes,
                 what="the prefork workers to be forked")
    return srv


def stop_servers(servers) -> None:
    """Shut every server down; a prefork server must leave no worker process behind.

    A prefork parent that does not stop within the timeout is told to kill its
    workers; any worker still there after that is killed (and reaped) here, so
    nothing outlives the test, and then the test fails.
    """
    leftovers = []
    for srv in servers:
        if serves_in_process(srv.config.engine):
            srv.shutdown(timeout=10)
            continue
        pids = set(srv.workers.copy())  # a copy: the supervisor thread may change it
        srv.shutdown(timeout=10)
        if not srv._stopped.is_set():
            srv.stop_now()  # the supervisor SIGKILLs its workers
            srv._stopped.wait(5)
        pids |= set(srv.workers.copy())
        leftovers += [f"{srv.address}: worker {pid}" for pid in _kill_survivors(pids)]
    assert not leftovers, f"prefork workers outlived their server's shutdown: {leftovers}"


def _kill_survivors(pids, timeout: float = 5.0) -> list[int]:
    """Wait for ``pids`` to be gone (a zombie is not gone); SIGKILL and reap the rest."""
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive:
        alive = {pid for pid in alive if process_exists(pid)}
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    return sorted(alive)


def held_connections(srv: Server) -> int:
    """How many client connections ``srv`` holds open right now.

    ``len(srv._connections)`` where the server serves in this process; for
    prefork, the TCP sockets on the server's port that its worker processes
    still hold (from ``/proc``: a connection the worker has dropped has left
    its descriptor table; the shared listening socket is not counted).
    """
    if serves_in_process(srv.config.engine):
        return len(srv._connections)
    # /proc/net/tcp is not read atomically (a socket may show twice or not at all
    # while the table changes), so read until two readings agree.
    previous = None
    for _ in range(50):
        current = _worker_connections(srv.workers.copy(), srv.address[1])
        if current == previous:
            break
        previous = current
    return len(current)


def _worker_connections(pids, port: int) -> frozenset:
    """Inodes of the non-listening TCP sockets on ``port`` that processes ``pids`` hold."""
    inodes = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except FileNotFoundError:
            continue
        for name in names:
            try:
                target = os.readlink(f"{fd_dir}/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    local_port = f":{port:04X}"
    return frozenset(cols[9] for cols in tcp_sockets(port)  # 0A is LISTEN
                     if cols[9] in inodes and cols[3] != "0A" and cols[1].endswith(local_port))


def tcp_sockets(port: int):
    """The columns of every row of /proc/net/tcp and tcp6 that mention ``port`` (local or
    remote; addresses are hex): 1 local, 2 remote, 3 state, 4 tx:rx queues, 9 inode."""
    mention = f":{port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = [row for row in f.read().splitlines()[1:] if mention in row]
        except FileNotFoundError:
            continue
        for row in rows:
            yield row.split()


class _JsonLinesHandler(logging.Handler):
    """Appends each record as one JSON line with one ``write``: safe from forked workers."""

    def __init__(self, path):
        super().__init__()
        self.path = str(path)

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        line = json.dumps({"name": record.name, "levelno": record.levelno, "message": record.getMessage(),
                           "exc_types": [c.__name__ for c in type(exc).__mro__] if exc else [],
                           "pid": os.getpid()}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


class ServerLog:
    """The ``muxpool.server`` records of this process and of any process forked from it."""

    def __init__(self, path):
        self.path = path

    def records(self) -> list[dict]:
        """Each record as ``{"name", "levelno", "message", "exc_types", "pid"}``;
        ``exc_types`` lists the exception's class and its bases (so a name in it
        means ``isinstance``)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.endswith("\n")]
        except FileNotFoundError:
            return []


@contextlib.contextmanager
def capturing_server_log(folder):
    """Yield ``capture(level) -> ServerLog``; the ``server_log`` fixture of both files."""
    logger = logging.getLogger("muxpool.server")
    handler = _JsonLinesHandler(folder / "muxpool-server.log.jsonl")
    previous = logger.level
    logger.addHandler(handler)

    def capture(level: int) -> ServerLog:
        handler.setLevel(level)
        logger.setLevel(level)
        return ServerLog(handler.path)

    try:
        yield capture
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


class Peer:
    """A plain blocking socket that speaks a framing; for tests that need the socket."""

    def __init__(self, address, framing: str, timeout: float = DEADLINE):
        self.sock = socket.create_connection(address[:2], timeout=timeout)
        self.framer = make_framer(framing)
        self.ready: list[bytes] = []

    @property
    def local_port(self) -> int:
        return self.sock.getsockname()[1]

    def wire(self, message: bytes) -> bytes:
        return self.framer.encode(message)

    def send(self, *messages: bytes) -> None:
        """Send all ``messages`` with one write."""
        self.sock.sendall(b"".join(self.wire(m) for m in messages))

    def receive(self) -> bytes | None:
        """The next message, or ``None`` at EOF (a reset counts as EOF)."""
        while not self.ready:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return None
            self.ready.extend(self.framer.feed(data))
        return self.ready.pop(0)

    def close(self) -> None:
        self.sock.close()


def refuses_connections(address) -> bool:
    """True once connecting is refused: the listener is closed. A reset is not that yet: the
    handshake completed into the accept queue of a listener that closed just after, so poll again."""
    try:
        probe = socket.create_connection(address[:2], timeout=2)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False
    probe.close()
    return False
