"""Prefork servers seen from outside: their processes, a CLI supervisor with its
log, and clients that keep requesting while workers come and go."""

from __future__ import annotations

import os
import pathlib
import sys
import threading
import time

from muxpool import Client, ConnectionBroken, Server

from .processes import Logged, process_exists
from .servers import PREFIX
from .waiting import DEADLINE

TESTS = pathlib.Path(__file__).resolve().parent.parent


#: What a client sees when the server closes its connection: EOF, or a reset.
CLOSED = (ConnectionBroken, ConnectionResetError, BrokenPipeError)


def process_gone(pid: int) -> bool:
    """No such process (a zombie, exited but not reaped, is not gone)."""
    return not process_exists(pid)


def live_children(ppid: int) -> set[int]:
    """The pids of ``ppid``'s children that are running (zombies excluded), from /proc."""
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # gone while we looked
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if int(parent) == ppid and state != "Z":
            children.add(int(entry))
    return children


class ServeProcess(Logged):
    """``muxpool serve ... --engine prefork`` in a new session; its stderr log collected.

    The session makes the parent a process-group leader whose workers share its
    group, so :meth:`kill_group` reaches every process it started.
    """

    def __init__(self, args: list[str], env: dict):
        super().__init__([sys.executable, "-m", "muxpool.cli", "serve", *args], env, cwd=TESTS)
        self.port: int | None = None
        self.worker_pids: set[int] = set()

    def wait_until_serving(self, processes: int) -> None:
        match = self.wait_for_log(r"muxpool serving .* on 127\.0\.0\.1:(\d+) \(engine=prefork")[0]
        self.port = int(match.group(1))
        started = self.wait_for_log(r"prefork worker (\d+) started", count=processes)
        self.worker_pids = {int(m.group(1)) for m in started}
        # Each worker logs this once its own server is about to accept.
        self.wait_for_log(r"muxpool serving .* \(engine=(loop|threadpool|threaded),", count=processes)

    def kill_group(self) -> None:
        self.kill(also=self.worker_pids)  # a worker that left the group would escape killpg


class RequestLoop(threading.Thread):
    """A client sending lockstep requests on one connection until told to stop.

    With ``reconnect`` it opens a new connection when the server closes one;
    without, it ends there. It records what it sent and when each reply came,
    every close (with the worker pid, when the app greets with ``pid <n>``),
    and anything else that went wrong (in ``problems``, for the test to assert).
    """

    def __init__(self, address, name: str, reconnect: bool):
        super().__init__(name=name, daemon=True)
        self.address = address[:2]
        self.reconnect = reconnect
        self.halt = threading.Event()
        self.sent: list[bytes] = []
        self.answered: list[tuple[bytes, float, int | None]] = []  # message, when, worker pid
        self.closes: list[tuple[int | None, bytes | None]] = []  # worker pid, unanswered message
        self.problems: list[str] = []
        self.pid: int | None = None  # the worker serving the current connection

    def answered_after(self, moment: float) -> int:
        return sum(1 for _, when, _ in self.answered if when > moment)

    def run(self) -> None:
        count = 0
        try:
            while not self.halt.is_set():
                client = Client(*self.address, framing="line", timeout=DEADLINE).connect()
                greeting = client.greeting or b""
                self.pid = int(greeting.split()[1]) if greeting.startswith(b"pid ") else None
                try:
                    while not self.halt.is_set():
                        message = b"%s request %d" % (self.name.encode(), count)
                        count += 1
                        try:
                            client.send(message)
                        except CLOSED:  # closed before this request left: it was never sent
                            self.closes.append((self.pid, None))
                            break
                        self.sent.append(message)
                        try:
                            reply = client.receive()
                        except CLOSED:
                            self.closes.append((self.pid, message))
                            break
                        if reply != PREFIX + message:
                            self.problems.append(f"{message!r} got {reply!r}")
                            return
                        self.answered.append((message, time.monotonic(), self.pid))
                finally:
                    client.close()
                if not self.reconnect:
                    return
        except Exception as exc:  # noqa: BLE001 - a refused connect, a timeout: the test reports it
            self.problems.append(f"{exc!r} after {len(self.answered)} replies")

    def finish(self, timeout: float = DEADLINE) -> None:
        self.halt.set()
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} did not stop"


def start_loops(address, count: int, reconnect: bool) -> list[RequestLoop]:
    loops = [RequestLoop(address, f"client-{i}", reconnect) for i in range(count)]
    for loop in loops:
        loop.start()
    return loops


def worker_of(address) -> int:
    """Open a connection to a ``PidGreeter`` server: the pid of the worker serving it."""
    with Client(*address[:2], framing="line", timeout=DEADLINE) as client:
        pid = int(client.greeting.split()[1])
        assert client.request(b"which") == PREFIX + b"which"
        return pid


class ConnectLoop(threading.Thread):
    """A client that keeps opening a connection, making one request and closing it."""

    def __init__(self, address):
        super().__init__(name="connect-loop", daemon=True)
        self.address = address
        self.halt = threading.Event()
        self.ok = 0
        self.refused = 0
        self.closed_early = 0  # accepted by a retiring worker that closed it while draining
        self.problems: list[str] = []

    def run(self) -> None:
        count = 0
        while not self.halt.is_set():
            message = b"connection %d" % count
            count += 1
            try:
                with Client(*self.address, framing="line", timeout=DEADLINE) as client:
                    reply = client.request(message)
            except ConnectionRefusedError:
                self.refused += 1
                continue
            except CLOSED:
                self.closed_early += 1
                continue
            except Exception as exc:  # noqa: BLE001 - a timeout, say: the test reports it
                self.problems.append(repr(exc))
                return
            if reply != PREFIX + message:
                self.problems.append(f"{message!r} got {reply!r}")
                return
            self.ok += 1


def workers(srv: Server) -> set[int]:
    """An in-process prefork server's worker pids (a copy: the supervisor thread changes it)."""
    return set(srv.workers.copy())
