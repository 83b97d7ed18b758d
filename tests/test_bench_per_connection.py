"""The load generator's per-connection records (``LoadSpec(per_connection=True)``,
``muxpool bench --per-connection``) and its early end when every connection is gone.

Each record is checked against a server that counts, on its side of the same
connection (matched by the client's port), what it received and answered:
the generator's local port, requests sent, replies answered, how the
connection ended (``open`` / ``eof`` / ``reset`` / an error kind) and what was
in flight then. The default report must not change.

Loopback only; every server is stopped and every process killed on the way
out, pass or fail; nothing waits by sleeping.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from support.bench import LATENCY_KEYS, muxpool_server, run_cli
from support.bench_servers import GREETING, PREFIX, ResetsAfterFirstRequestServer, TestServer

from muxpool import Server, make_framer
from muxpool.loadtest import LoadSpec, Report, run_load
from muxpool.loadtest.generator import Generator

pytestmark = pytest.mark.timeout(60)

RECORD_KEYS = {"port", "sent", "answered", "in_flight", "end", "unsent_bytes", "detail"}
# The keys of the default JSON report (before per-connection records existed).
DEFAULT_KEYS = {"spec", "processes", "requests", "elapsed_s", "requests_per_s", "latency_ms", "errors",
                "unanswered_at_end", "generator_cpu", "generator_saturated",
                # added since, with nothing per connection in them: warm-up errors kept apart,
                # and the greeting size "auto" found
                "warmup_errors", "reconnected_after_warmup", "greeting_bytes_detected"}


def spec_for(port: int, **overrides) -> LoadSpec:
    options = {"host": "127.0.0.1", "port": port, "connections": 4, "duration": 1.0, "warmup": 0.0,
               "timeout": 5.0, "per_connection": True}
    options.update(overrides)
    return LoadSpec(**options)


class AnswersThenHalfCloses(TestServer):
    """Answers the ``i``-th connection's first ``5 + 3*i`` requests, then half-closes
    (FIN) and reads on until the client hangs up, counting what else arrived.
    ``seen[client port] = (answered, requests received in all)``."""

    def __init__(self, size: int = 64):
        super().__init__(size)
        self.seen: dict[int, tuple[int, int]] = {}

    @staticmethod
    def quota(index: int) -> int:
        return 5 + 3 * index

    def serve(self, sock, index):
        port = sock.getpeername()[1]
        quota = self.quota(index)
        answered = 0
        for _ in range(quota):
            message = self.recv_request(sock)
            if message is None:
                break
            self.reply(sock, PREFIX + message)
            answered += 1
        sock.shutdown(socket.SHUT_WR)
        extra = 0
        while not self.stopping.is_set():
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            extra += len(chunk)
        assert extra % self.size == 0, f"a partial request arrived: {extra} bytes"
        with self.lock:
            self.seen[port] = (answered, answered + extra // self.size)


# --- 1. exact counts, connection by connection ---------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rate", [None, 2000.0], ids=["closed-loop", "open-loop"])
def test_records_match_the_servers_own_counts_and_the_run_ends_early(rate):
    """The server answers a different number of requests on each connection, then
    closes it (EOF). Every record must name a port the server served, with
    answered = what the server answered there, sent = what the server received
    there, in_flight = the difference, and end = "eof". Once every connection is
    closed the run must end, not idle out its 30 s."""
    connections = 6
    started = time.monotonic()
    with AnswersThenHalfCloses() as srv:
        report = run_load(spec_for(srv.port, connections=connections, duration=30.0, rate=rate),
                          processes=2)
        wall = time.monotonic() - started
        assert srv.errors == []
        seen = dict(srv.seen)
    assert wall < 15, f"the run took {wall:.1f} s: it idled after the server closed every connection"
    assert report.elapsed < 15, report.elapsed

    records = report.connections
    assert records is not None and len(records) == connections
    assert len(seen) == connections
    assert sorted(r["port"] for r in records) == sorted(seen)
    assert sorted(answered for answered, _ in seen.values()) == [
        AnswersThenHalfCloses.quota(i) for i in range(connections)]
    for record in records:
        assert set(record) == RECORD_KEYS, record
        answered, received = seen[record["port"]]
        assert record["answered"] == answered, (record, seen[record["port"]])
        assert record["sent"] == received, (record, seen[record["port"]])
        assert record["in_flight"] == record["sent"] - record["answered"]
        assert record["end"] == "eof", record
        assert record["unsent_bytes"] == 0
        if rate is None:
            assert record["in_flight"] == 1, record  # lockstep: the one sent after the last reply
        # (open loop: whatever the schedule sent before the EOF, which may be nothing)
    assert sum(r["answered"] for r in records) == report.requests
    assert report.errors == {"closed": connections}
    assert report.connection_ends() == {"eof": connections}
    data = report.as_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["connections"] == records
    assert data["spec"]["per_connection"] is True


# --- 2. a reset ------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_reset_is_recorded_with_the_request_it_left_unanswered():
    """The server reads one request, then resets (RST): the record says "reset",
    one request sent, none answered, one in flight, and why."""
    with ResetsAfterFirstRequestServer() as srv:
        result = Generator(spec_for(srv.port, connections=3, duration=10.0)).run()
        assert srv.resets == 3
    assert result.elapsed < 5, result.elapsed  # ended when the last connection went
    assert len(result.connections) == 3
    for record in result.connections:
        assert (record["sent"], record["answered"], record["in_flight"], record["end"]) == (1, 0, 1, "reset")
        assert "reset" in record["detail"].lower(), record
        assert isinstance(record["port"], int) and record["port"] > 0


# --- 3. open at the end --------------------------------------------------------------------------


class PeerRecorder:
    """A muxpool handler (the echo service's replies) that notes each connection's peer."""

    def __init__(self):
        self.ports: set[int] = set()
        self.lock = threading.Lock()

    def on_connect(self, conn):
        with self.lock:
            self.ports.add(conn.peer[1])
        return GREETING

    def on_message(self, conn, message):
        return PREFIX + message


@pytest.mark.timeout(30)
@pytest.mark.parametrize("pipeline", [1, 4])
def test_connections_still_open_at_the_end(pipeline):
    """Against a muxpool server that never closes: every record ends "open" with
    exactly ``pipeline`` requests in flight (closed loop refills at once), its
    port is one the server saw, and the records add up to the report's totals.
    (Line framing: raw framing cannot tell pipelined requests apart.)"""
    app = PeerRecorder()
    srv = Server(app, port=0, engine="loop", framing="line").start()
    try:
        spec = spec_for(srv.address[1], connections=5, duration=0.5, pipeline=pipeline, framing="line",
                        greeting_bytes=len(make_framer("line").encode(GREETING)))
        result = Generator(spec).run()
    finally:
        srv.shutdown(timeout=10)
    records = result.connections
    assert len(records) == 5
    assert {r["port"] for r in records} == app.ports
    for record in records:
        assert record["end"] == "open", record
        assert record["in_flight"] == pipeline, record
        assert record["answered"] > 0, record
    assert sum(r["answered"] for r in records) == result.requests
    assert sum(r["in_flight"] for r in records) == result.unanswered
    assert result.errors == {}


@pytest.mark.timeout(30)
def test_warmup_is_in_the_records_not_in_the_measurement():
    """Records cover each connection's whole life; the report's requests only the
    measured part."""
    with muxpool_server() as srv:
        result = Generator(spec_for(srv.address[1], connections=2, duration=0.3, warmup=0.3)).run()
    answered = sum(r["answered"] for r in result.connections)
    assert result.requests > 0
    assert answered > result.requests  # the warm-up's replies count too


# --- 4. connect failures, and the default ---------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_failed_connect_has_a_record_and_the_run_ends_at_once():
    with socket.socket() as probe:  # a port nobody listens on: bound, never listen()ed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        started = time.monotonic()
        result = Generator(spec_for(port, connections=2, duration=20.0)).run()
    assert time.monotonic() - started < 10
    assert result.errors == {"connect": 2}
    assert [(r["port"], r["sent"], r["answered"], r["end"]) for r in result.connections] == [
        (None, 0, 0, "connect")] * 2


@pytest.mark.timeout(30)
def test_the_default_report_has_no_records():
    with muxpool_server() as srv:
        spec = spec_for(srv.address[1], duration=0.3, per_connection=False)
        result = Generator(spec).run()
        report = run_load(spec, processes=1)
    assert result.connections is None
    assert report.connections is None
    assert report.connection_ends() == {}
    data = report.as_dict()
    assert set(data) == DEFAULT_KEYS
    assert "per_connection" not in data["spec"]
    assert LoadSpec(**{**data["spec"], "reply_prefix": data["spec"]["reply_prefix"].encode("latin-1")}) == spec


# --- 5. the CLI ----------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_bench_cli_per_connection_json_and_table():
    with muxpool_server() as srv:
        host, port = srv.address
        common = ["bench", f"{host}:{port}", "-c", "3", "-d", "0.5", "--warmup", "0", "-p", "1"]
        code, out, err = run_cli(common + ["--json", "--per-connection"], timeout=40)
        assert code == 0, f"exit code {code}\nstdout:\n{out}\nstderr:\n{err}"
        data = json.loads(out)
        code, table, err = run_cli(common + ["--per-connection"], timeout=40)
        assert code == 0, f"exit code {code}\nstdout:\n{table}\nstderr:\n{err}"
    assert set(data) == DEFAULT_KEYS | {"connections"}
    assert set(data["latency_ms"]) == LATENCY_KEYS
    assert data["spec"]["per_connection"] is True
    records = data["connections"]
    assert len(records) == 3
    assert len({r["port"] for r in records}) == 3
    for record in records:
        assert set(record) == RECORD_KEYS
        assert record["end"] == "open" and record["in_flight"] == 1 and record["answered"] > 0, record
    assert sum(r["answered"] for r in records) == data["requests"]
    assert "connections: 3 (open 3)" in table, table


def test_report_round_trips_with_records():
    records = [{"port": 40000, "sent": 10, "answered": 9, "in_flight": 1, "end": "eof", "unsent_bytes": 0,
                "detail": ""}]
    report = Report(spec=LoadSpec(per_connection=True), processes=1, requests=9, elapsed=1.0,
                    latency_ms=dict.fromkeys(LATENCY_KEYS, 0.0), errors={"closed": 1}, generator_cpu=0.1,
                    connections=records)
    data = report.as_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["connections"] == records
    assert data["connections"] is not records  # a copy: the report's own list is not handed out
    assert report.connection_ends() == {"eof": 1}
