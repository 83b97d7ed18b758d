"""No hang on SIGTERM, on any Python 3.11-3.13: gevent's signal path and prefork's forks.

gevent: a Python signal handler runs wherever the main thread is when the signal
lands — in the hub, when it interrupts the hub's epoll — and the kernel may hand a
process-directed signal to any thread that does not block it. prefork: forking a
process that runs threads can deadlock the child (Python 3.12+ warns), so a
supervisor forks only while it is single-threaded, and otherwise starts its
workers through multiprocessing's fork server.

Real processes on loopback; every process a test starts is killed in ``finally``;
waits are log lines, replies, /proc states or exits, each polled with a deadline.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import signal
import ssl
import sys
import textwrap
import threading
import time
import warnings

import pytest
import server_apps
from no_hang_apps import RELEASE_ENV
from support.processes import Logged, process_exists
from support.servers import PREFIX, start_server, stop_servers
from support.waiting import DEADLINE, wait_for

from muxpool import Client, ConnectionBroken, Server

pytestmark = pytest.mark.timeout(60)

TESTS = pathlib.Path(__file__).resolve().parent
CLOSED = (ConnectionBroken, ConnectionResetError)


# --- processes and their log ------------------------------------------------------------


def start_logged(argv: list[str], env: dict | None = None) -> Logged:
    """``argv`` in the tests folder, with the test apps importable."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    environ = {**os.environ, "PYTHONPATH": path, **(env or {})}
    environ.pop("MUXPOOL_GEVENT_SUITE", None)
    return Logged(argv, environ, cwd=TESTS)


@contextlib.contextmanager
def logged(argv: list[str], env: dict | None = None):
    process = start_logged(argv, env)
    try:
        yield process
    finally:
        process.kill()


def serve_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "muxpool.cli", "serve", *args, "--host", "127.0.0.1", "--port", "0"]


SERVING = r"muxpool serving .* on 127\.0\.0\.1:(\d+) \(engine="


def task_status(pid: int, tid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


def signals_in(mask_hex: str) -> set[int]:
    mask = int(mask_hex, 16)
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def threads(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


# --- gevent --------------------------------------------------------------------------------


def test_every_thread_of_a_gevent_server_but_the_hubs_blocks_sigterm():
    """gevent's monitor thread (loop_stall_warning, on by default) is a real thread. A
    SIGTERM the kernel handed to it set Python's flag and nothing more: the hub slept on
    in epoll and the server never drained (tgkill'd to that thread: still running 10 s
    later). Every thread but the hub's must block the signals the server acts on."""
    pytest.importorskip("gevent")
    with logged(serve_cli("--engine", "gevent")) as server:
        server.wait_for_log(SERVING)
        # gevent starts its monitor with the engine, before the serving line; a deadline,
        # not one look, in case the kernel shows the new task a moment late (one CI run
        # on 3.12 saw none).
        helpers = wait_for(lambda: [tid for tid in threads(server.pid) if tid != server.pid],
                           what="gevent's monitor thread (loop_stall_warning is on by default)")
        for tid in helpers:
            blocked = signals_in(task_status(server.pid, tid)["SigBlk"])
            missing = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP} - blocked
            assert not missing, f"thread {tid} takes {sorted(map(signal.Signals, missing))}"
        assert not signals_in(task_status(server.pid, server.pid)["SigBlk"]) & {signal.SIGTERM}
        server.proc.send_signal(signal.SIGTERM)
        assert server.exit_code() == 0, server.log()


def main_thread_sleeps_in_epoll_with_nothing_pending(pid: int) -> bool:
    try:
        status = task_status(pid, pid)
        if signals_in(status["ShdPnd"]) | signals_in(status["SigPnd"]):
            return False
        with open(f"/proc/{pid}/task/{pid}/wchan") as f:
            return f.read() == "do_epoll_wait"
    except OSError:  # exited meanwhile: the caller sees it next
        return False


def test_sigterm_on_an_idle_hub_drains_while_another_thread_holds_the_log_lock(tmp_path):
    """Handlers of a signal that interrupts the hub's epoll run in the hub, where nothing
    may block. The drain's first act was to log; with the log handler's lock held by
    another real thread (gevent's monitor, while it writes a report), that raised
    BlockingSwitchOutError and the SIGTERM was lost. Now it waits, then drains."""
    pytest.importorskip("gevent")
    release = tmp_path / "release"
    with logged(serve_cli("no_hang_apps:hold_the_log_lock", "--engine", "gevent"),
                env={RELEASE_ENV: str(release)}) as server:
        port = int(server.wait_for_log(SERVING)[0].group(1))
        with Client("127.0.0.1", port, greeting=False, timeout=DEADLINE) as client:
            assert client.request(b"hold") == b"held"
            wait_for(lambda: main_thread_sleeps_in_epoll_with_nothing_pending(server.pid),
                     what="the server's hub to be idle in epoll")
            server.proc.send_signal(signal.SIGTERM)
            # Delivered, handled, and the hub back in epoll: the handler met the held lock.
            wait_for(lambda: server.proc.poll() is not None
                     or main_thread_sleeps_in_epoll_with_nothing_pending(server.pid),
                     what="the SIGTERM to be taken")
            release.touch()
            code = server.exit_code()
        log = server.log()
    assert "BlockingSwitchOutError" not in log, log
    assert code == 0, log
    assert "signal SIGTERM: draining" in log


def tgkill(pid: int, tid: int, signum: int) -> None:
    """Send ``signum`` to one thread of another process, as the kernel may choose to."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "tgkill"):
        pytest.skip("no tgkill in this libc")
    if libc.tgkill(pid, tid, signum) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {tid}, {signum})")


def test_a_sigterm_taken_by_another_thread_wakes_the_idle_hub(tmp_path):
    """The kernel may hand a process-directed SIGTERM to any thread not blocking it (a
    handler's thread, gevent's thread pool). Python then only sets a flag, and the hub,
    asleep in epoll until its next timer (idle_timeout, 300 s), never ran the handler —
    the same as a signal landing just before the hub goes to sleep, the race that hung
    about 1 in 5 runs of 50 stops on 3.13 under load. The wakeup fd wakes the hub."""
    pytest.importorskip("gevent")
    release = tmp_path / "release"
    with logged(serve_cli("no_hang_apps:start_a_thread", "--engine", "gevent"),
                env={RELEASE_ENV: str(release)}) as server:
        port = int(server.wait_for_log(SERVING)[0].group(1))
        with Client("127.0.0.1", port, greeting=False, timeout=DEADLINE) as client:
            tid = int(client.request(b"thread"))
            assert tid != server.pid and tid in threads(server.pid)
            wait_for(lambda: main_thread_sleeps_in_epoll_with_nothing_pending(server.pid),
                     what="the server's hub to be idle in epoll")
            tgkill(server.pid, tid, signal.SIGTERM)
            try:
                server.wait_for_log(r"signal SIGTERM: draining", timeout=5.0)
            finally:
                release.touch()
            assert server.exit_code() == 0, server.log()


STOPS = 50
SERVE_AGAIN = textwrap.dedent("""\
    from gevent import monkey; monkey.patch_all()
    import logging, sys
    import muxpool
    logging.basicConfig(level="INFO", format="%(message)s")
    for _ in range(int(sys.argv[1])):
        muxpool.serve(None, ("127.0.0.1", 0), engine="gevent", framing="line")
""")


def test_a_gevent_server_stops_on_sigterm_50_times_in_a_row():
    """50 servers one after another in one patched process; each serves a client that
    then stays connected and idle, gets SIGTERM, and must drain and stop at once."""
    pytest.importorskip("gevent")
    with logged([sys.executable, "-c", SERVE_AGAIN, str(STOPS)]) as process:
        stops = []
        for i in range(STOPS):
            port = int(process.wait_for_log(SERVING, count=i + 1)[i].group(1))
            with Client("127.0.0.1", port, framing="line", timeout=DEADLINE) as client:
                assert client.request(b"stop %d" % i) == PREFIX + b"stop %d" % i
                signalled = time.monotonic()
                process.proc.send_signal(signal.SIGTERM)
                with pytest.raises(CLOSED):  # the drain closed the idle connection
                    client.receive()
            # The client has closed too: the server's lingering close is over at once,
            # not at linger_timeout (which made each of the 50 stops take a second).
            process.wait_for_log(r"^muxpool stopped", count=i + 1, timeout=5.0)
            stops.append(time.monotonic() - signalled)
        assert process.exit_code() == 0, process.log()
    stops.sort()
    print(f"\n[gevent] {STOPS} SIGTERM stops: median {stops[STOPS // 2] * 1000:.1f} ms, "
          f"max {stops[-1] * 1000:.1f} ms")
    assert stops[-1] < 2.0, stops


# --- prefork ---------------------------------------------------------------------------------


@pytest.fixture
def prefork_server():
    servers: list[Server] = []

    def make(app=None, **options):
        options = {"port": 0, "processes": 2, "worker_engine": "loop", "framing": "line", **options}
        srv = Server(app, engine="prefork", **options)
        servers.append(srv)
        return start_server(srv)

    yield make
    stop_servers(servers)


def fork_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught
            if issubclass(w.category, DeprecationWarning) and "fork" in str(w.message)]


def test_a_supervisor_in_a_threaded_process_starts_workers_through_the_fork_server(prefork_server):
    """Server(engine="prefork").start() supervises from a background thread: forking then
    copied a multi-threaded process (3.13 hung in 4 of 7 drains; 3.12+ warned each fork).
    The workers now come from the fork server: not our children, no fork warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        srv = prefork_server(server_apps.PidGreeter)
        pids = set(srv.workers.copy())
        for pid in pids:
            assert parent_of(pid) != os.getpid(), f"worker {pid} was forked by this process"
        with Client(*srv.address, framing="line", timeout=DEADLINE) as client:
            assert int(client.greeting.split()[1]) in pids
            assert client.request(b"hi") == PREFIX + b"hi"
    assert not fork_warnings(caught), fork_warnings(caught)


def _serve_forever_with_a_thread_running(srv: Server) -> None:
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    try:
        srv.serve_forever()
    finally:
        stop.set()
        other.join()
        srv._listener.close()


def test_an_app_the_fork_server_cannot_take_is_refused_clearly():
    srv = Server(lambda message, conn: message, port=0, engine="prefork", processes=1)
    with pytest.raises(TypeError, match=r"must be picklable.*module level"):
        _serve_forever_with_a_thread_running(srv)
    assert not srv.workers
    with pytest.raises(TypeError, match="certfile"):
        _serve_forever_with_a_thread_running(
            Server(port=0, engine="prefork", processes=1,
                   ssl_context=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)))


def test_cli_supervisor_is_single_threaded_and_forks_its_workers_itself():
    """`muxpool serve --engine prefork`: the supervisor is the main thread, alone (no
    watchdog or helper thread), so it may fork: the workers are its own children."""
    with logged(serve_cli("--engine", "prefork", "--processes", "2")) as server:
        server.wait_for_log(SERVING)
        pids = {int(m.group(1)) for m in server.wait_for_log(r"prefork worker (\d+) started", 2)}
        assert threads(server.pid) == [server.pid]
        assert {parent_of(pid) for pid in pids} == {server.pid}
        assert "multi-threaded" not in server.log()
        server.proc.send_signal(signal.SIGTERM)
        assert server.exit_code() == 0, server.log()


THREADED_SUPERVISOR = textwrap.dedent("""\
    import sys, threading
    from muxpool import Server
    srv = Server(port=0, engine="prefork", processes=2, framing="line").start()
    while len(srv.workers.copy()) < 2:
        threading.Event().wait(0.01)
    print("workers", *srv.workers.copy(), file=sys.stderr, flush=True)
    threading.Event().wait()
""")


@pytest.mark.parametrize("how", ["fork", "fork server"])
def test_workers_do_not_outlive_a_sigkilled_supervisor(how):
    """SIGKILL leaves a supervisor no time to stop its workers: they notice on their own
    (PR_SET_PDEATHSIG for forked workers, the parent's sentinel for the fork server's)."""
    argv = (serve_cli("--engine", "prefork", "--processes", "2") if how == "fork"
            else [sys.executable, "-c", THREADED_SUPERVISOR])
    pids: set[int] = set()
    process = start_logged(argv)
    try:
        if how == "fork":
            process.wait_for_log(SERVING)
            pids = {int(m.group(1)) for m in process.wait_for_log(r"prefork worker (\d+) started", 2)}
        else:
            pids = set(map(int, process.wait_for_log(r"^workers (\d+) (\d+)$")[0].groups()))
        os.kill(process.pid, signal.SIGKILL)
        process.proc.wait(DEADLINE)
        wait_for(lambda: not any(map(process_exists, pids)),
                 what=f"workers {sorted(pids)} to exit after their supervisor was killed")
    finally:
        process.kill(also=pids)
