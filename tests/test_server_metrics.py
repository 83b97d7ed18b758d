"""A server's /metrics against a known load, scraped over HTTP and parsed with
``prometheus_client.parser``, on the loop, threadpool, threaded and auto
engines in process and on prefork under the real ``muxpool serve``.

One load (:func:`run_load`) opens nine connections, each ending a different
way: four clients that close after echoes (two of them slow), a handler that
raises, a handler that calls ``close()``, a message over ``max_message_size``,
a client that goes idle past ``idle_timeout`` and one that resets. The scrape
must count each message, byte and close reason, and put the slow calls in
the right histogram buckets. Prefork: the supervisor sums its workers, and a
worker killed by SIGKILL takes none of the totals with it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import metrics_apps
import pytest
from support.engines import needs_gevent
from support.served import cli_server
from support.waiting import DEADLINE, wait_for

from muxpool import ConfigError, Server, ServerConfig

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.timeout(90)

OPTIONS = dict(framing="line", max_message_size=64, idle_timeout=0.5, linger_timeout=0.2)
CLI_OPTIONS = ("--framing", "line", "--max-message-size", "64", "--idle-timeout", "0.5",
               "--linger-timeout", "0.2")
ECHOES = 10


def scrape(address) -> dict:
    """``{(sample name, labels as a sorted tuple): value}`` from /metrics."""
    host, port = address[0], address[1]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=DEADLINE) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def closed(values: dict, reason: str) -> float:
    return values[("muxpool_connections_closed_total", (("reason", reason),))]


def plain(values: dict, name: str) -> float:
    return values[(name, ())]


def bucket(values: dict, le: str) -> float:
    return values[("muxpool_handler_seconds_bucket", (("le", le),))]


def _exchange(sock: socket.socket, reader, message: bytes, sent: dict) -> None:
    sock.sendall(message + b"\n")
    sent["in"] += len(message) + 1
    assert reader.readline() == message + b"\n"
    sent["out"] += len(message) + 1


def _wait_closed(sock: socket.socket) -> None:
    """Until the server closes ``sock`` (EOF or reset)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


def run_load(address) -> dict:
    """The known load; returns the bytes it sent and was answered with."""
    sent = {"in": 0, "out": 0}
    for number in range(4):  # four clients that close: eof
        # The reader is closed first: a socket's fd stays open while a makefile() holds it.
        with socket.create_connection(address, timeout=DEADLINE) as sock, sock.makefile("rb") as reader:
            for i in range(ECHOES if number < 2 else ECHOES - 1):
                _exchange(sock, reader, b"msg-%d" % i, sent)
            if number >= 2:
                _exchange(sock, reader, b"slow", sent)
    for message in (b"boom", b"bye", b"x" * 100):  # handler_error, closed, protocol_error
        with socket.create_connection(address, timeout=DEADLINE) as sock:
            sock.sendall(message + b"\n")
            sent["in"] += len(message) + 1
            _wait_closed(sock)
    with socket.create_connection(address, timeout=DEADLINE) as sock:  # idle
        _wait_closed(sock)
    with socket.create_connection(address, timeout=DEADLINE) as sock, sock.makefile("rb") as reader:
        _exchange(sock, reader, b"then-reset", sent)  # then reset
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return sent


CONNECTIONS = 9
MESSAGES = 4 * ECHOES + 2 + 1  # echoes and slows, boom and bye, and the one before the reset


def check_known_load(values: dict, sent: dict) -> None:
    assert plain(values, "muxpool_connections_accepted_total") == CONNECTIONS
    assert plain(values, "muxpool_connections_open") == 0
    assert plain(values, "muxpool_connections_rejected_total") == 0
    assert plain(values, "muxpool_messages_total") == MESSAGES
    assert plain(values, "muxpool_handler_errors_total") == 1
    assert plain(values, "muxpool_received_bytes_total") == sent["in"]
    assert plain(values, "muxpool_sent_bytes_total") == sent["out"]
    assert plain(values, "muxpool_handler_queue_depth") == 0
    expected = {"eof": 4, "handler_error": 1, "closed": 1, "protocol_error": 1, "idle": 1, "reset": 1}
    assert {reason: closed(values, reason) for reason in expected} == expected
    assert closed(values, "drain") == closed(values, "write_timeout") == closed(values, "shutdown") == 0
    assert plain(values, "muxpool_handler_seconds_count") == MESSAGES
    assert bucket(values, "+Inf") == MESSAGES
    assert MESSAGES - bucket(values, "0.025") == 2  # the two slow calls, and only they
    assert bucket(values, "0.05") == MESSAGES or bucket(values, "0.1") == MESSAGES
    assert plain(values, "muxpool_handler_seconds_sum") >= 2 * metrics_apps.SLOW


def settled(address, connections: int = CONNECTIONS, messages: int = MESSAGES) -> dict:
    """A scrape once every connection of the load is closed and counted, and its calls have run."""
    last: list[dict] = []

    def done():
        values = scrape(address)
        last[:] = [values]
        total = sum(v for (name, _), v in values.items() if name == "muxpool_connections_closed_total")
        # The histogram too: a prefork worker writes its fields one by one, buckets last.
        # And no call left queued: a connection is counted closed before its
        # on_disconnect call has run.
        return total >= connections and plain(values, "muxpool_messages_total") >= messages \
            and plain(values, "muxpool_handler_seconds_count") >= messages \
            and plain(values, "muxpool_handler_queue_depth") == 0

    try:
        wait_for(done, what="every connection of the load closed and counted", interval=0.1)
    except BaseException:
        print("the last scrape:", {k: v for k, v in last[0].items() if v} if last else None)
        raise
    return last[0]


@pytest.mark.parametrize("engine", ["loop", "threadpool", "threaded", "auto"])
def test_a_scrape_counts_a_known_load(engine):
    with Server(metrics_apps.app, port=0, engine=engine, metrics_port=0, **OPTIONS).start() as srv:
        sent = run_load(srv.address)
        values = settled(srv.metrics_address)
        check_known_load(values, sent)
        if engine == "threadpool":  # the pool the engine runs handlers on is reported too
            assert values[("muxpool_pool_tasks_completed_total", (("pool", "muxpool-handler"),))] \
                >= MESSAGES
        address = srv.metrics_address
    with pytest.raises(OSError):  # stopped with the server
        socket.create_connection(address[:2], timeout=DEADLINE).close()


def test_the_endpoint_answers_while_a_handler_blocks_the_loop():
    """A scrape on a stuck loop engine returns (the last snapshot) instead of hanging."""
    release, running = [], threading.Event()

    def stuck(message, conn):
        running.set()
        wait_for(lambda: release, timeout=DEADLINE, what="the test to release the handler")
        return message

    with Server(stuck, port=0, engine="loop", framing="line", metrics_port=0).start() as srv:
        first = scrape(srv.metrics_address)
        with socket.create_connection(srv.address, timeout=DEADLINE) as sock:
            sock.sendall(b"hold\n")
            assert running.wait(DEADLINE)  # the loop is in the handler: a scrape now cannot be answered
            started = time.monotonic()
            during = scrape(srv.metrics_address)
            assert time.monotonic() - started < DEADLINE
            assert plain(during, "muxpool_connections_accepted_total") == \
                plain(first, "muxpool_connections_accepted_total")
            release.append(True)
            assert sock.makefile("rb").readline() == b"hold\n"


def test_a_taken_metrics_port_fails_start_and_leaves_nothing_running():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = Server(port=0, engine="threadpool", metrics_port=port)
        with pytest.raises(OSError):
            srv.start()
        assert srv._engine.idle()


def test_without_prometheus_client_metrics_port_says_what_to_install():
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "from muxpool import Server, MissingDependency\n"
            "try:\n    Server(port=0, metrics_port=0)\n"
            "except MissingDependency as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert "pip install 'muxpool[metrics]'" in out.stdout, out.stderr


def quiet(address, accepted: int) -> dict:
    """A scrape once ``accepted`` connections are counted and every one is closed
    (a prefork worker publishes its counts with its heartbeat, a moment late)."""
    def done():
        values = scrape(address)
        total = sum(v for (name, _), v in values.items() if name == "muxpool_connections_closed_total")
        return values if total == plain(values, "muxpool_connections_accepted_total") >= accepted \
            else None
    return wait_for(done, what="the connections so far to close", interval=0.1)


def minus(values: dict, before: dict) -> dict:
    """The counts since ``before`` (whose gauges were 0)."""
    return {key: value - before.get(key, 0) for key, value in values.items()}


def more_than(before: dict, loads: int = 1) -> tuple[int, int]:
    closed_before = sum(v for (name, _), v in before.items() if name == "muxpool_connections_closed_total")
    return (int(closed_before) + loads * CONNECTIONS,
            int(plain(before, "muxpool_messages_total")) + loads * MESSAGES)


def _metrics_address(served) -> tuple[str, int]:
    found = wait_for(lambda: re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", served.log()),
                     what="the metrics endpoint's log line")
    return "127.0.0.1", int(found.group(1))


@pytest.mark.parametrize("engine", ["prefork", "prefork-threaded"])
def test_prefork_sums_its_workers_and_keeps_a_killed_workers_totals(engine, tmp_path: Path):
    with cli_server(engine, tmp_path / "server.log", "metrics_apps:app", "--metrics-port", "0",
                    *CLI_OPTIONS) as served:
        address = _metrics_address(served)
        before = quiet(address, 1)  # cli_server's readiness probe is a connection too
        sent = run_load(served.address)
        check_known_load(minus(settled(address, *more_than(before)), before), sent)
        victim = served.workers[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: re.search(rf"prefork worker {victim} killed by SIGKILL", served.log()),
                 what="the supervisor to reap the killed worker")
        after = scrape(address)  # the killed worker's counts are folded in, not lost
        check_known_load(minus(after, before), sent)
        # A second load: the replacement's counts add to the totals.
        wait_for(lambda: len(re.findall(r"prefork worker \d+ started", served.log())) >= 3,
                 what="the replacement worker")
        more = run_load(served.address)
        values = minus(settled(address, *more_than(before, loads=2)), before)
        assert plain(values, "muxpool_connections_accepted_total") == 2 * CONNECTIONS
        assert plain(values, "muxpool_messages_total") == 2 * MESSAGES
        assert plain(values, "muxpool_received_bytes_total") == sent["in"] + more["in"]
        assert closed(values, "eof") == 8 and closed(values, "reset") == 2
        # threadpool workers' handler threads, summed as one pool (the killed worker's calls
        # kept); threaded workers have none.
        pool = {name: value for (name, labels), value in values.items()
                if labels == (("pool", "muxpool-handler"),)}
        if engine == "prefork-threaded":
            assert not pool, pool
            return
        handled = pool["muxpool_pool_tasks_completed_total"] + pool["muxpool_pool_tasks_failed_total"]
        assert handled >= 2 * MESSAGES, pool
        bound = ("muxpool_pool_max_workers", (("pool", "muxpool-handler"),))
        assert pool["muxpool_pool_max_workers"] + before[bound] == 2 * 32, pool  # minus() took the gauge's baseline off


def test_gevent_under_muxpool_serve_counts_a_known_load(tmp_path: Path):
    """The endpoint's thread is a greenlet there, asking the hub's loop for each snapshot."""
    needs_gevent("gevent")
    with cli_server("gevent", tmp_path / "server.log", "metrics_apps:app", "--metrics-port", "0",
                    *CLI_OPTIONS) as served:
        address = _metrics_address(served)
        before = quiet(address, 1)
        sent = run_load(served.address)
        check_known_load(minus(settled(address, *more_than(before)), before), sent)


@pytest.mark.parametrize("options, named", [
    ({"metrics_port": 65536}, "metrics_port"),
    ({"metrics_port": -1}, "metrics_port"),
    ({"metrics_host": "::1"}, "metrics_host"),  # without metrics_port it would do nothing
    ({"access_log": "yes"}, "access_log"),
])
def test_bad_metrics_options_are_refused_by_name(options, named):
    with pytest.raises(ConfigError, match=named):
        ServerConfig(**options)
