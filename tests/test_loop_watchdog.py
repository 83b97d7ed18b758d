"""The watchdog that reports a stalled event loop while it is stalled.

A handler that blocks the ``loop`` engine's thread (or the gevent hub) stalls
every connection; the server logs a WARNING with the blocked thread's stack
while it happens, once per stall (at most one every ``REPORT_EVERY`` seconds),
and an INFO when the loop runs again. Engines that run handlers elsewhere
never trip it. Servers run as ``muxpool serve`` subprocesses (gevent needs its
own patched process); the handler busy-waits until the test releases it.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
from support.engines import needs_gevent
from support.served import cli_server
from support.waiting import DEADLINE, wait_for

from muxpool import Client
from muxpool.multiplexer import Multiplexer
from muxpool.watchdog import REPORT_EVERY, LoopWatchdog

pytestmark = pytest.mark.timeout(60)

STALL = {"loop": "the event loop has been stuck", "gevent": "blocked the gevent hub",
         "prefork-loop": "the event loop has been stuck"}


def _serve_spinner(engine: str, tmp_path, *options: str):
    release = tmp_path / "release"
    env_options = ["watchdog_apps:spin_until_released", "--framing", "line", *options]
    return release, cli_server(engine, tmp_path / "server.log", *env_options,
                               env={"WATCHDOG_RELEASE": str(release)})


@pytest.mark.parametrize("engine", ["loop", "prefork-loop", "gevent"])
def test_a_handler_that_blocks_the_loop_is_reported_while_it_blocks(engine, tmp_path):
    needs_gevent(engine)
    release, serving = _serve_spinner(engine, tmp_path, "--loop-stall-warning", "0.2")
    with serving as server, Client(*server.address, framing="line", greeting=False, timeout=DEADLINE) as client:
        client.send(b"block")
        wait_for(lambda: (tmp_path / "release.started").exists(), what="the handler to start")
        # Logged while the handler still spins: the test releases it only after seeing it.
        wait_for(lambda: STALL[engine] in server.log(), what="the stall to be logged")
        release.touch()
        assert client.receive() == b"released: block"
        log = server.log()
        assert log.count(STALL[engine]) == 1, log
        assert "spin_until_released" in log, "the warning should show where the loop is stuck"
        if engine != "gevent":
            wait_for(lambda: "the event loop runs again" in server.log(), what="the end of the stall")


@pytest.mark.parametrize("engine", ["threadpool", "threaded"])
def test_handlers_that_block_off_the_loop_do_not_trip_it(engine, tmp_path):
    release, serving = _serve_spinner(engine, tmp_path, "--loop-stall-warning", "0.1")
    with serving as server, Client(*server.address, framing="line", greeting=False, timeout=DEADLINE) as client:
        client.send(b"block")
        wait_for(lambda: (tmp_path / "release.started").exists(), what="the handler to start")
        with Client(*server.address, framing="line", greeting=False, timeout=DEADLINE) as other:
            # Ten times the threshold, the loop serving another client meanwhile.
            until, i = time.monotonic() + 1.0, 0
            while time.monotonic() < until:
                assert other.request(b"echo %d" % i) == b"response: echo %d" % i
                i += 1
        release.touch()
        assert client.receive() == b"released: block"
        assert "stuck" not in server.log()


def test_loop_stall_warning_zero_turns_it_off(tmp_path):
    release, serving = _serve_spinner("loop", tmp_path, "--loop-stall-warning", "0")
    with serving as server, Client(*server.address, framing="line", greeting=False, timeout=DEADLINE) as client:
        client.send(b"block")
        wait_for(lambda: (tmp_path / "release.started").exists(), what="the handler to start")
        threading.Event().wait(1.2)  # past the default 0.5 s (+ a sample): 0 must mean off
        release.touch()
        assert client.receive() == b"released: block"
        assert "stuck" not in server.log()


def test_stalls_after_a_report_are_counted_not_each_logged(caplog):
    """Two stalls of a real Multiplexer within REPORT_EVERY: two counted, one WARNING."""
    assert REPORT_EVERY >= 5
    mux = Multiplexer()
    loop = threading.Thread(target=mux.run, daemon=True)
    loop.start()
    watchdog = LoopWatchdog(mux, 0.05).start()
    try:
        with caplog.at_level(logging.INFO, logger="muxpool.server"):
            for stall in (1, 2):
                release = threading.Event()
                mux.defer(lambda release=release: release.wait(DEADLINE))
                wait_for(lambda stall=stall: watchdog.stalls == stall, what=f"stall {stall} to be seen")
                release.set()
                wait_for(lambda stall=stall: sum("runs again" in r.getMessage() for r in caplog.records)
                         == stall, what=f"the loop to run again after stall {stall}")
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "_run_deferred" in warnings[0].getMessage()  # the loop thread's stack
    finally:
        watchdog.stop()
        mux.stop()
        loop.join(DEADLINE)
        mux.close()
