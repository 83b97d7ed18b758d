"""The mixed workload: echo clients measured while one more connection's handler sleeps.

The bench row (``bench --compare --workload mixed``, ``make bench``) and the
promise it measures: on ``auto`` a fast client is answered while another
connection's handler sleeps; on ``loop`` it waits the sleep out, which is
what shows the row measures what it says. Real servers, real processes,
bounds far from the figures (a sleep of 1 s against a bound of 0.3 s).
"""

from __future__ import annotations

import time

import pytest

from muxpool import Client, Server
from muxpool.loadtest import LoadSpec
from muxpool.loadtest.compare import compare
from muxpool.loadtest.sleeper import Sleeper
from muxpool.loadtest.workloads import SLEEP, MixedWorkload, make_workload

pytestmark = pytest.mark.timeout(120)


def test_only_the_slow_request_sleeps():
    handler = make_workload("mixed:200")
    assert isinstance(handler, MixedWorkload) and handler.seconds == 0.2
    assert make_workload("mixed").seconds == 1.0
    started = time.monotonic()
    assert handler.on_message(None, b"0.1:0.1:") == b"response: 0.1:0.1:"
    quick = time.monotonic() - started
    assert handler.on_message(None, SLEEP) == b"response: " + SLEEP
    slow = time.monotonic() - started - quick
    assert quick < 0.1 <= 0.2 <= slow
    with pytest.raises(ValueError, match="mixed"):
        make_workload("mixed:soon")


def test_a_fast_client_is_answered_while_the_slow_clients_handler_sleeps():
    srv = Server(MixedWorkload(1.0), port=0, engine="auto", framing="raw").start()
    sleeper = Sleeper(*srv.address[:2])
    try:
        with Client(*srv.address[:2], framing="raw", greeting=True, timeout=10) as client:
            sleeper.start()
            assert sleeper.first_sent.wait(10)
            started = time.monotonic()
            slowest = 0.0
            while time.monotonic() - started < 0.5:  # within the first sleep, whenever it began
                asked = time.monotonic()
                assert client.request(b"0.0:fast") == b"response: 0.0:fast"
                slowest = max(slowest, time.monotonic() - asked)
        assert slowest < 0.3, f"a fast request waited {slowest:.2f} s for the sleeping handler"
        deadline = time.monotonic() + 10
        while sleeper.answered < 1 and sleeper.error is None and time.monotonic() < deadline:
            time.sleep(0.02)  # a poll with a deadline: the slow reply is a second away
        assert sleeper.answered >= 1 and sleeper.error is None
    finally:
        sleeper.stop()
        srv.shutdown(timeout=10)


def test_the_mixed_row_measures_the_echo_clients_and_loop_stalls_on_the_sleeper():
    spec = LoadSpec(connections=8, duration=1.5, warmup=0.2)
    rows = {row.server: row for row in compare(["muxpool:auto", "muxpool:loop"], spec,
                                               workload="mixed", repeat=1)}
    for row in rows.values():
        assert not row.failure, row.failure
        assert row.reports[0].requests > 0 and not row.errors
    auto, loop = rows["muxpool:auto"].reports[0], rows["muxpool:loop"].reports[0]
    # loop: echo requests waited out a 1 s sleep, so the slow client ran in the measurement.
    assert loop.latency_ms["max"] >= 500, loop.latency_ms
    # auto: the first sleep stalls the loop for a hand-off (milliseconds), and then none;
    # p99, not max: on a loaded machine one request can wait out a scheduler's hiccup.
    assert auto.latency_ms["p99"] < 300, auto.latency_ms
