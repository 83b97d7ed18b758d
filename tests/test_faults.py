"""Faults that end a process, and signals, with real processes on loopback.

1. A prefork worker's handler ends its own process (``os._exit``, SIGKILL, a
   segfault) while four lockstep clients keep making requests: the faulting
   connection closes (never hangs), the parent replaces the worker, and every
   well-behaved request is answered correctly or its connection closed (the
   client reconnects). ``sys.exit()`` in a handler ends only its connection.
2. A second SIGTERM stops at once on the engines that serve in one process
   (``loop``, ``threadpool``, ``threaded``, ``gevent``; prefork is in
   ``test_prefork.py``), even while a handler sleeps; one SIGTERM drains: the
   reply in flight is delivered, then the process exits 0.

The faults that stay inside a process (a handler that raises, hangs, calls
``sys.exit``) are in ``test_server_conformance.py`` and ``test_server_options.py``.

Every server is ``muxpool serve`` in a subprocess in its own session (gevent
needs a monkey-patched process, and faults end processes), killed as a group
at teardown. Waits are on log lines, on a record file the handlers append to,
on replies and closes, or polls with deadlines; no sleep synchronises.
Run with ``pytest -s`` to see the figures.
"""

from __future__ import annotations

import os
import re
import signal
import time

import fault_apps
import pytest
from support.prefork import CLOSED, ServeProcess, live_children, process_gone, start_loops, worker_of
from support.servers import PREFIX, refuses_connections
from support.waiting import DEADLINE, wait_for

from muxpool import Client
from muxpool.serving import DUPLICATE_WINDOW

pytestmark = pytest.mark.timeout(60)

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def serve():
    """``serve(app, engine, *flags, env=None, processes=2, worker_engine="threadpool")``:
    ``muxpool serve app --engine engine`` on a free loopback port (line framing), once
    it serves; its process group is always killed at teardown."""
    started: list[ServeProcess] = []

    def start(app: str, engine: str, *flags: str, env: dict | None = None, processes: int = 2,
              worker_engine: str = "threadpool") -> ServeProcess:
        if engine == "gevent":
            pytest.importorskip("gevent")
        args = [app, "--engine", engine, "--host", "127.0.0.1", "--port", "0", "--framing", "line",
                *flags]
        if engine == "prefork":
            args += ["--processes", str(processes), "--worker-engine", worker_engine]
        path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)
        environ = {**os.environ, "PYTHONPATH": path, **(env or {})}
        environ.pop("MUXPOOL_GEVENT_SUITE", None)
        server = ServeProcess(args, environ)
        started.append(server)
        if engine == "prefork":
            server.wait_until_serving(processes)
            assert live_children(server.pid) == server.worker_pids
        else:
            match = server.wait_for_log(rf"muxpool serving .* on 127\.0\.0\.1:(\d+) \(engine={engine},")[0]
            server.port = int(match.group(1))
        return server

    yield start
    for server in started:
        server.kill_group()


def recorded(path, message: bytes) -> list[int]:
    """The pids whose handler started on ``message``, from the record file."""
    return [pid for pid, m in fault_apps.read_record(path) if m == message]


# --- 1. a handler ends its prefork worker --------------------------------------------------

#: fault message -> how the parent reports the worker's end (``None``: it must not end).
FAULTS = {
    "os._exit": (fault_apps.EXIT, "exited with 3"),
    "sigkill": (fault_apps.KILL, "killed by SIGKILL"),
    "segfault": (fault_apps.SEGFAULT, "killed by SIGSEGV"),
    "sys.exit": (fault_apps.SYS_EXIT, None),
}


def connect_beside(address, pids: set[int]) -> tuple[Client, int]:
    """A connection served by one of the workers ``pids`` (the kernel picks the
    worker: connect until one of them takes it); and that worker's pid."""
    found: list[tuple[Client, int]] = []

    def attempt():
        client = Client(*address, framing="line", timeout=DEADLINE).connect()
        pid = int(client.greeting.split()[1])
        if pid in pids:
            found.append((client, pid))
            return True
        client.close()
        return False

    wait_for(attempt, what=f"a connection served by one of the workers {sorted(pids)}")
    return found[0]


@pytest.mark.parametrize("worker_engine", ["threadpool", "loop"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_handler_fault_in_a_prefork_worker_never_hangs_or_garbles_other_clients(
        serve, tmp_path, fault, worker_engine):
    message, how = FAULTS[fault]
    record = tmp_path / "record.txt"
    server = serve("fault_apps:Faulty", "prefork", worker_engine=worker_engine,
                   env={"FAULTS_RECORD": str(record)})
    forked_before = time.monotonic()  # the workers logged their start before this
    address = ("127.0.0.1", server.port)
    workers = set(server.worker_pids)
    loops = start_loops(address, 4, reconnect=True)
    try:
        # A worker dying under 1 s old is replaced after a back-off (test_prefork.py tests
        # that); these workers die in service, older, so the replacement is immediate.
        wait_for(lambda: all(len(loop.answered) >= 10 for loop in loops)
                 and time.monotonic() - forked_before > 1.05,
                 what="10 replies for every well-behaved client, and workers over 1 s old")
        # The faulting connection goes to a worker that serves well-behaved clients too,
        # so that their fate is tested.
        faulty, victim = connect_beside(address, {loop.pid for loop in loops})
        neighbours = [loop for loop in loops if loop.pid == victim]
        with faulty:
            assert faulty.request(b"hello") == PREFIX + b"hello"
            faulted = time.monotonic()
            faulty.send(message)
            with pytest.raises(CLOSED):  # EOF or reset; a hang would time out instead
                faulty.receive()
            closed = time.monotonic() - faulted
        assert recorded(record, message) == [victim], "the fault did not run in the victim's handler"

        if how is None:  # sys.exit(): that connection ends, its worker serves on
            server.wait_for_log(r"handler failed for")
            server.wait_for_log(r"^SystemExit: sys\.exit\(\) requested by the test")  # its traceback
            settled = time.monotonic()
            wait_for(lambda: all(loop.answered_after(settled) >= 10 for loop in loops),
                     what="10 more replies for every client after the fault")
            wait_for(lambda: worker_of(address) == victim,
                     what=f"a new connection served by the same worker {victim}")
            assert not process_gone(victim)
            assert live_children(server.pid) == workers, "a worker was replaced"
            assert "replacing it" not in server.log()
            replaced_in = serving_in = None
        else:
            reported = server.wait_for_log(rf"prefork worker {victim} {how}; replacing it(.*)$")
            assert reported[0].group(1) == "", f"a back-off for a worker over 1 s old: {reported[0]}"
            started = server.wait_for_log(r"prefork worker (\d+) started", count=3)
            replaced_in = time.monotonic() - faulted
            replacement = int(started[2].group(1))
            server.worker_pids.add(replacement)  # killed at teardown even outside the group
            server.wait_for_log(rf"muxpool serving .* \(engine={worker_engine},", count=3)
            serving_in = time.monotonic() - faulted
            survivors = workers - {victim}
            wait_for(lambda: live_children(server.pid) == survivors | {replacement},
                     what=f"two workers again: {sorted(survivors)} and the replacement {replacement}")
            assert process_gone(victim), "the dead worker was not reaped"
            settled = time.monotonic()
            wait_for(lambda: all(loop.answered_after(settled) >= 10 for loop in loops),
                     what="10 more replies for every client after the replacement")
            wait_for(lambda: worker_of(address) == replacement,
                     what=f"a new connection served by the replacement {replacement}")
        # And any new client is answered.
        with Client(*address, framing="line", timeout=DEADLINE) as newcomer:
            assert newcomer.request(b"newcomer") == PREFIX + b"newcomer"
    finally:
        for loop in loops:
            loop.finish()

    for loop in loops:
        assert not loop.problems, (loop.name, loop.problems)  # a wrong reply, a timeout, a refusal
        answered = {m for m, _, _ in loop.answered}
        cut = {m for _, m in loop.closes if m is not None}
        # Lockstep: a request is answered, or it was the one in flight when its connection closed.
        assert set(loop.sent) == answered | cut and not answered & cut, loop.name
        for pid, _ in loop.closes:
            assert pid == victim, f"{loop.name}: a connection on worker {pid}, not {victim}, closed"
    if how is None:
        assert not any(loop.closes for loop in loops), "sys.exit() closed other connections"
    else:
        for loop in neighbours:  # the worker died under them: their connection must have closed
            assert loop.closes, f"{loop.name} on the dead worker {victim} never saw a close"

    total = sum(len(loop.answered) for loop in loops)
    closes = 1 + sum(len(loop.closes) for loop in loops)
    lost_requests = sum(1 for loop in loops for _, m in loop.closes if m is not None)
    figures = (f"[{fault}, worker engine {worker_engine}] well-behaved requests answered: {total}; "
               f"connections closed by the fault: {closes} (the faulting one + "
               f"{closes - 1} of {len(neighbours)} neighbour client(s) on worker {victim}; "
               f"{lost_requests} request(s) in flight there, none answered wrongly); "
               f"faulting connection closed {closed * 1000:.0f} ms after the fault")
    if replaced_in is not None:
        figures += (f"; replacement forked {replaced_in * 1000:.0f} ms and serving "
                    f"{serving_in * 1000:.0f} ms after the fault")
    print("\n" + figures)


# --- 2. SIGTERM on the single-process engines -------------------------------------------------

SINGLE_PROCESS = ["loop", "auto", "threadpool", "threaded", "gevent"]


@pytest.mark.parametrize("engine", SINGLE_PROCESS)
def test_a_second_sigterm_stops_at_once_despite_a_sleeping_handler(serve, tmp_path, engine):
    record = tmp_path / "record.txt"
    server = serve("fault_apps:Sleeper", engine, env={"FAULTS_RECORD": str(record)})
    slow = b"sleep 5"
    with Client("127.0.0.1", server.port, framing="line", timeout=DEADLINE) as client:
        client.send(slow)
        wait_for(lambda: recorded(record, slow) == [server.pid], what="the 5 s handler to start")
        handler_started = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        server.wait_for_log(r"signal SIGTERM: draining")
        if engine != "loop":
            # The drain has begun: the listener is closed. (On loop, the drain itself can only
            # begin when the handler, running on the loop thread, returns.)
            wait_for(lambda: refuses_connections(("127.0.0.1", server.port)),
                     what="the draining server to refuse new connections")
        # A person's second request, not the same signal delivered twice: past the window.
        time.sleep(max(0.0, handler_started + DUPLICATE_WINDOW + 0.1 - time.monotonic()))
        second = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        code = server.exit_code(timeout=DEADLINE)
        stopped = time.monotonic()
        print(f"\n[{engine}] second SIGTERM: exited {code} {(stopped - second) * 1000:.0f} ms after it, "
              f"{stopped - handler_started:.2f} s after the 5 s handler began")
        assert "second signal: stopping now" in server.log(), server.log()
        assert stopped - second < 2.0, f"took {stopped - second:.2f} s after the second SIGTERM"
        assert stopped - handler_started < 5.0, "the process waited for the 5 s handler"
        assert code == 0, server.log()
        with pytest.raises(CLOSED):
            client.receive()  # no reply: the call was abandoned and the connection closed


@pytest.mark.parametrize("engine", SINGLE_PROCESS)
def test_one_sigterm_delivers_the_reply_in_flight_then_exits_0(serve, tmp_path, engine):
    drain_timeout = 5.0
    record = tmp_path / "record.txt"
    server = serve("fault_apps:Sleeper", engine, "--drain-timeout", str(drain_timeout),
                   env={"FAULTS_RECORD": str(record)})
    slow = b"sleep 1"
    with Client("127.0.0.1", server.port, framing="line", timeout=DEADLINE) as client:
        assert client.request(b"before") == PREFIX + b"before"
        client.send(slow)
        wait_for(lambda: recorded(record, slow) == [server.pid], what="the 1 s handler to start")
        terminated = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        assert client.receive() == PREFIX + slow  # the reply in flight is delivered...
        replied = time.monotonic()
        with pytest.raises(CLOSED):
            client.receive()  # ...then the connection closes
        code = server.exit_code(timeout=drain_timeout)
        exited = time.monotonic()
    print(f"\n[{engine}] one SIGTERM: reply {(replied - terminated) * 1000:.0f} ms after it, "
          f"exited {code} {(exited - terminated) * 1000:.0f} ms after it")
    assert code == 0, server.log()
    log = server.log()
    assert "signal SIGTERM: draining" in log and "second signal" not in log
    assert "did not finish in time" not in log, "the drain ran out of time"
    assert re.search(r"muxpool stopped \(\d+ connections? served\)", log), log
