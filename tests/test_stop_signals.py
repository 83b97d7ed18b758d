"""Stop signals always land, once, and drain deadlines always fire.

* A SIGTERM the kernel hands to a thread other than the main one still starts
  the drain at once, even while the server sleeps in its poll (the loop's
  wakeup descriptor is ``signal.set_wakeup_fd``'s).
* A repeat of the first stop signal within ``DUPLICATE_WINDOW`` (a supervisor
  signalling a whole process group and its child) is the same request: the
  drain goes on. A later one, or SIGQUIT, stops at once.
* ``make serve`` stopped with ``kill -TERM -- -PGID`` (make forwards the signal,
  so the server gets it twice) drains.
* On the ``loop`` engine, a handler that blocks cannot hold the process past
  ``drain_timeout``: the connections are closed and the process exits.

Servers run as subprocesses (their own sessions, killed with their groups on
the way out).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support.engines import needs_gevent
from support.lines import Lines
from support.served import cli_server, stop
from support.waiting import DEADLINE, wait_for

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent

# serve() on the main thread; once it accepts, a thread of the same process sends
# SIGTERM to itself: the kernel runs the C handler on that thread, not the main one.
SELF_SIGNAL = textwrap.dedent("""
    import logging, signal, socket, sys, threading, time
    from muxpool.serving import serve
    logging.basicConfig(level=logging.INFO)
    port, engine = int(sys.argv[1]), sys.argv[2]
    def poke():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.02)  # the server starting: only the port can tell
        # Only once the main thread sleeps in its poll (the kernel says where it waits):
        # a signal that arrives while it runs is noticed anyway, and proves nothing.
        wchan = f"/proc/self/task/{threading.main_thread().native_id}/wchan"
        quiet = 0
        while quiet < 5 and time.monotonic() < deadline:
            quiet = quiet + 1 if open(wchan).read() == "do_epoll_wait" else 0
            time.sleep(0.01)
        print("poking", flush=True)
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
    threading.Thread(target=poke, daemon=True).start()
    serve(None, ("127.0.0.1", port), engine=engine)
    print("stopped", flush=True)
""")


# Not auto: its main thread is the monitor, never asleep in epoll (what the script waits
# for), and it wakes every 10 ms at most, so Python runs the handler there within that.
@pytest.mark.parametrize("engine", ["loop", "threadpool", "threaded"])
def test_a_sigterm_taken_by_another_thread_wakes_an_idle_server(engine):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", SELF_SIGNAL, str(port), engine], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=8)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the idle {engine} server slept through a SIGTERM taken by another thread:\n{err}")
    assert proc.returncode == 0, err
    assert "poking" in out and "stopped" in out
    assert "signal SIGTERM: draining" in err


@pytest.mark.parametrize("engine", ["auto", "threadpool", "threaded", "prefork-threaded", "gevent"])
def test_a_repeated_sigterm_within_the_window_is_the_same_request(engine, tmp_path):
    needs_gevent(engine)
    with cli_server(engine, tmp_path / "server.log", "linger_apps:sleepy", "--framing", "line") as server:
        sock = server.connect()
        sock.sendall(b"sleep 1\n")
        wait_for(lambda: "began sleep" in server.log(), what="the handler to start")
        os.kill(server.proc.pid, signal.SIGTERM)
        # Once taken, again at once, as a process group's signal and make's arrive (two
        # kills in a row would merge into one pending signal).
        wait_for(lambda: "draining" in server.log(), interval=0.001, what="the first SIGTERM taken")
        os.kill(server.proc.pid, signal.SIGTERM)
        sock.settimeout(DEADLINE)
        reply = Lines(sock).readline()
        code = server.proc.wait(DEADLINE)
        log = server.log()
        sock.close()
    assert reply == b"slept", f"the drain was cut short: {reply!r}\n{log[-2000:]}"
    assert code == 0
    assert "stopping now" not in log
    if not engine.startswith("prefork"):  # prefork's parent drains its workers, which log per worker
        assert "the same request" in log


@pytest.mark.parametrize("how", ["second-sigterm", "sigquit"])
def test_a_later_second_signal_or_sigquit_stops_at_once(how, tmp_path):
    with cli_server("threadpool", tmp_path / "server.log", "linger_apps:sleepy", "--framing", "line") as server:
        sock = server.connect()
        sock.sendall(b"sleep 30\n")
        wait_for(lambda: "began sleep" in server.log(), what="the handler to start")
        started = time.monotonic()
        if how == "sigquit":
            os.kill(server.proc.pid, signal.SIGQUIT)
        else:
            os.kill(server.proc.pid, signal.SIGTERM)
            server_log = server.log_path
            wait_for(lambda: "draining" in server_log.read_text(), what="the drain to begin")
            time.sleep(0.6)  # past DUPLICATE_WINDOW: what the test is about is the gap itself
            os.kill(server.proc.pid, signal.SIGTERM)
        code = server.proc.wait(DEADLINE)
        took = time.monotonic() - started
        log = server.log()
        sock.close()
    assert took < 5, f"stopping took {took:.1f} s"
    assert "stopping now" in log
    assert code == 0


def test_make_serve_drains_on_a_process_group_sigterm(tmp_path):
    """make forwards SIGTERM to its child, which also gets the group's: a drain, not a stop-now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path / "make.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(["make", "-s", "serve", f"SERVE_ARGS=--port {port}"], cwd=ROOT, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def connected():
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=1)
            except OSError:
                assert proc.poll() is None, log_path.read_text()
                return None

        sock = wait_for(connected, timeout=120, interval=0.1, what="make serve to listen")
        assert sock.recv(1024) == b"Hello client-side"
        os.killpg(proc.pid, signal.SIGTERM)
        sock.settimeout(DEADLINE)
        ending = sock.recv(1024)  # a drain closes with a clean EOF; a stop-now resets
        sock.close()
        proc.wait(DEADLINE)
    finally:
        stop(proc)
    log = log_path.read_text()
    assert ending == b""
    assert "signal SIGTERM: draining" in log
    assert "stopping now" not in log, log


@pytest.mark.parametrize("engine", ["loop", "prefork-loop"])
def test_a_blocked_handler_on_the_loop_cannot_hold_the_process_past_drain_timeout(engine, tmp_path):
    drain = 1.0
    with cli_server(engine, tmp_path / "server.log", "linger_apps:sleepy", "--framing", "line",
                    "--drain-timeout", str(drain), "--worker-timeout", "0") as server:
        idle = server.connect()
        blocked = server.connect()
        blocked.sendall(b"sleep 60\n")
        wait_for(lambda: "stuck" in server.log(), what="the loop watchdog to see the blocked loop")
        started = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        code = server.proc.wait(DEADLINE)
        took = time.monotonic() - started
        for sock in (idle, blocked):
            sock.settimeout(DEADLINE)
            try:
                assert sock.recv(1024) == b""
            except ConnectionResetError:
                pass  # closed hard at the deadline: a reset is what a hard stop sends
            sock.close()
        log = server.log()
    # prefork: the worker's loop is the one blocked; its supervisor kills it 2 s past the deadline.
    limit = drain + (2.6 if engine.startswith("prefork") else 1.0)
    assert took < limit, f"exited {took:.2f} s after SIGTERM (drain_timeout {drain} s)\n{log[-2000:]}"
    if engine == "loop":
        assert code == 0
        assert "still blocked" in log


def test_a_sigterm_while_the_server_starts_drains_it_instead_of_killing_the_process():
    """The port accepts from the moment the server binds, before its loop runs: a
    supervisor that sees it accept may stop it at once. That SIGTERM must find serve()'s
    handler in place (a clean drain, exit 0), not the default action (killed, -15)."""
    code = textwrap.dedent("""
        import logging, os, signal
        from muxpool import server, serving

        logging.basicConfig(level=logging.INFO)

        made = server.Server.__init__

        def bind_then_sigterm(self, *args, **kwargs):
            made(self, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)  # bound, its loop not yet running

        server.Server.__init__ = bind_then_sigterm
        serving.serve(port=0, engine="loop")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=DEADLINE * 3)
    assert result.returncode == 0, result.stderr
    assert "signal SIGTERM: draining" in result.stderr and "muxpool stopped" in result.stderr, \
        result.stderr
