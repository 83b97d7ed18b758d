"""``access_log``: one line per closed connection, and the connection's fields
on the server core's own records, in both log formats.

Records are captured from the real loggers of a real server on loopback (or
a Unix socket) and formatted with muxpool's own formatters. A Unix client
chooses its own socket path, so its peer is text a client controls: it must
stay inside its line and its field, whatever it holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import metrics_apps
import pytest
from support.served import cli_server
from support.waiting import DEADLINE, wait_for

from muxpool import Server
from muxpool.logs import JsonFormatter, PlainFormatter

pytestmark = pytest.mark.timeout(60)

ENGINES = ["loop", "threadpool", "threaded"]
LINE = re.compile(r"^conn=(\d+) reason=(\w+) duration=([\d.]+)s messages=(\d+) bytes_in=(\d+) "
                  r"bytes_out=(\d+) peer=(\".*\")$")


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def access(self) -> list[logging.LogRecord]:
        return [r for r in self.records if r.name == "muxpool.access"]


@pytest.fixture
def records():
    """Every record of the ``muxpool`` loggers, INFO and up, while the test runs."""
    handler, logger = Records(), logging.getLogger("muxpool")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _json(record: logging.LogRecord) -> dict:
    return json.loads(JsonFormatter().format(record))


def _plain(record: logging.LogRecord) -> str:
    """The plain line without its timestamp and level."""
    line = PlainFormatter().format(record)
    assert "\n" not in line
    return line.split(" ", 3)[3]


@pytest.mark.parametrize("engine", ENGINES)
def test_one_line_per_closed_connection_with_its_counts(engine, records):
    with Server(metrics_apps.app, port=0, engine=engine, framing="line", access_log=True,
                linger_timeout=0.2).start() as srv:
        with socket.create_connection(srv.address, timeout=DEADLINE) as sock, \
                sock.makefile("rb") as reader:
            client = sock.getsockname()
            for message in (b"one", b"three"):
                sock.sendall(message + b"\n")
                assert reader.readline() == message + b"\n"
        wait_for(records.access, what="the access line of the client that closed")
        staying = socket.create_connection(srv.address, timeout=DEADLINE)
        stayed = staying.getsockname()
        staying.sendall(b"hi\n")
        assert staying.recv(100) == b"hi\n"
    staying.close()
    first, second = records.access()
    assert [json.loads(LINE.match(_plain(r)).group(7)) for r in (first, second)] == \
        [f"{client[0]}:{client[1]}", f"{stayed[0]}:{stayed[1]}"]
    entry = _json(first)
    assert (entry["close_reason"], entry["messages"], entry["bytes_in"], entry["bytes_out"]) == \
        ("eof", 2, 10, 10)
    assert entry["peer"] == f"{client[0]}:{client[1]}" and 0 <= entry["duration"] < DEADLINE
    conn, reason, _duration, messages, bytes_in, bytes_out, _peer = LINE.match(_plain(first)).groups()
    assert (int(conn), reason, int(messages), int(bytes_in), int(bytes_out)) == \
        (entry["conn_id"], "eof", 2, 10, 10)
    later = _json(second)
    assert (later["close_reason"], later["messages"]) == ("drain", 1)
    assert later["conn_id"] != entry["conn_id"]


def test_without_access_log_no_line(records):
    with Server(port=0, engine="loop", framing="line").start() as srv:
        with socket.create_connection(srv.address, timeout=DEADLINE) as sock:
            sock.recv(100)  # the greeting
    assert records.access() == []


@contextlib.contextmanager
def unix_client(name: str):
    """A Unix client bound to ``name`` in a short folder (socket paths are short)."""
    folder = tempfile.mkdtemp(prefix="mx", dir="/tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.path.join(folder, name))
        sock.settimeout(DEADLINE)
        yield sock
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


FORGERY = 'c\n2026-12-02 05:00:00,000 INFO conn=1 reason=eof" reason="idle\u2028\x1b[2J'


@pytest.mark.parametrize("engine", ["loop", "threaded"])
def test_a_peer_a_client_chose_forges_no_line_and_no_field(engine, records, tmp_path: Path):
    path = str(tmp_path / "s")
    with Server(metrics_apps.app, unix_path=path, engine=engine, framing="line", max_message_size=8,
                access_log=True, linger_timeout=0.2).start():
        with unix_client(FORGERY) as sock:
            sock.connect(path)
            peer = sock.getsockname()
            sock.sendall(b"far-too-long\n")  # a protocol error: the core logs a warning too
            wait_for(lambda: not sock.recv(100), what="the server to close the connection")
        wait_for(records.access, what="the access line")
    (record,) = records.access()
    line = _plain(record)
    match = LINE.match(line)
    assert match is not None, line
    # The forgery is there, escaped, inside the quoted peer: it ends no line and, read as
    # key=value fields, it is part of the peer's value, never a field of its own.
    assert match.group(2) == "protocol_error"
    assert json.loads(match.group(7)) == peer
    assert "reason=eof" not in line.partition(" peer=")[0]
    entry = _json(record)
    assert entry["peer"] == peer and entry["close_reason"] == "protocol_error"
    (warning,) = [r for r in records.records if "max_message_size" in r.getMessage()]
    assert "\n" not in PlainFormatter().format(warning)
    assert (_json(warning)["peer"], _json(warning)["conn_id"]) == (peer, entry["conn_id"])


@pytest.mark.parametrize("engine", ["loop", "threadpool", "threaded", "auto"])
def test_core_records_about_a_connection_carry_its_peer_and_id(engine, records):
    with Server(metrics_apps.app, port=0, engine=engine, framing="line", access_log=True,
                linger_timeout=0.2).start() as srv:
        with socket.create_connection(srv.address, timeout=DEADLINE) as sock:
            client = sock.getsockname()
            sock.sendall(b"boom\n")
            wait_for(lambda: not sock.recv(100), what="the server to close the connection")
        wait_for(records.access, what="the access line")
    (failed,) = [r for r in records.records if "handler failed" in r.getMessage()]
    (access,) = records.access()
    assert _json(failed)["peer"] == f"{client[0]}:{client[1]}"
    assert _json(failed)["conn_id"] == _json(access)["conn_id"]
    assert "ValueError: boom, as asked" in _json(failed)["exc"]
    assert _json(access)["close_reason"] == "handler_error"


def test_muxpool_serve_access_log_json_from_prefork_workers(tmp_path: Path):
    log = tmp_path / "server.log"
    with cli_server("prefork", log, "metrics_apps:app", "--framing", "line", "--access-log",
                    "--log-format", "json") as served:
        with served.connect() as sock, sock.makefile("rb") as reader:
            client = sock.getsockname()
            sock.sendall(b"hello\n")
            assert reader.readline() == b"hello\n"

        def access_entries():
            entries = [json.loads(line) for line in served.log().splitlines() if line.startswith("{")]
            return [e for e in entries if e["logger"] == "muxpool.access"
                    and e["peer"] == f"{client[0]}:{client[1]}"]

        (entry,) = wait_for(access_entries, what="the worker's access line")
    assert (entry["close_reason"], entry["messages"], entry["bytes_in"], entry["bytes_out"]) == \
        ("eof", 1, 6, 6)
    assert entry["worker_pid"] in served.workers and entry["process"] == entry["worker_pid"]
