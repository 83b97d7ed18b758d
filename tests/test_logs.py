"""Logs nobody can forge: the formatters alone, then the real ``muxpool serve`` with
hostile clients (a Unix peer path with a newline, an exception text with one),
on threadpool and on prefork (forked workers, and workers the fork server starts)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from support.processes import Logged

from muxpool.logs import JsonFormatter, PlainFormatter, configure_logging, exception_lines
from muxpool.prefork import worker_logs as _worker_logs

pytestmark = pytest.mark.timeout(90)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORGED = '2030-01-01 00:00:00,000 CRITICAL forged'
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
# What a plain log line may start with: a record, or a line of a traceback.
TRACEBACK_LINE = re.compile(r"Traceback \(most recent call last\):$|  |$|The above exception|During handling"
                            r"|sub-exception \d+ of \d+:$|[A-Za-z_][\w.]*: ")  # the last: a type name


def record(msg: str, *args, exc: BaseException | None = None, **extra) -> logging.LogRecord:
    made = logging.LogRecord("muxpool.server", logging.WARNING, __file__, 1, msg, args,
                             (type(exc), exc, exc.__traceback__) if exc else None)
    made.__dict__.update(extra)
    return made


def raised(message: str) -> BaseException:
    try:
        raise ValueError(message)
    except ValueError as exc:
        return exc


def assert_one_record(text: str) -> None:
    """Only the first line starts like a record; the rest are a traceback's."""
    first, *rest = text.split("\n")
    assert TIMESTAMP.match(first), first
    for line in rest:
        assert TRACEBACK_LINE.match(line) and not TIMESTAMP.match(line), line
    assert len(text.splitlines()) == len(text.split("\n"))  # no \r, U+2028 or NEL left to split on


# --- the formatters -----------------------------------------------------------------------


def test_json_has_every_field_the_record_carries():
    made = record("closing %s: %s", ("127.0.0.1", 5555), "too large", exc=raised("boom"),
                  conn_id=7, engine="loop", worker_pid=4242)
    made.peer = ("::1", 80)
    entry = json.loads(JsonFormatter().format(made))
    assert entry["message"] == "closing ('127.0.0.1', 5555): too large"
    assert (entry["level"], entry["logger"], entry["process"]) == ("WARNING", "muxpool.server", os.getpid())
    assert (entry["peer"], entry["conn_id"], entry["engine"], entry["worker_pid"]) == ("[::1]:80", 7, "loop", 4242)
    assert entry["exc"].startswith("Traceback (most recent call last):\n") and entry["exc"].endswith("ValueError: boom")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(made.created)) + f".{int(made.msecs):03d}Z"
    assert entry["time"] == stamp


def test_json_leaves_out_the_fields_a_record_does_not_carry():
    entry = json.loads(JsonFormatter().format(record("plain")))
    assert set(entry) == {"time", "level", "logger", "message", "process"}


@pytest.mark.parametrize("message", ['"}\n{"level": "CRITICAL", "message": "forged"}',
                                     "a\u2028b\u2029c\x85d\re\x1b[2Jf"])
def test_json_a_forged_line_is_one_record_with_its_message_intact(message):
    text = JsonFormatter().format(record("%s", message, exc=raised(message), peer="/tmp/c\n" + FORGED))
    assert len(text.splitlines()) == 1 and text.isascii()
    entry = json.loads(text)
    assert entry["message"] == message and entry["peer"] == "/tmp/c\n" + FORGED
    assert entry["exc"].endswith("ValueError: " + message)


def test_plain_is_todays_format():
    made = record("muxpool serving %s", "x")
    assert PlainFormatter().format(made) == logging.Formatter("%(asctime)s %(levelname)s %(message)s").format(made)


@pytest.mark.parametrize("hostile, shown", [
    ("/tmp/c\n" + FORGED, "/tmp/c\\n" + FORGED),
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("a\rb\x00c\x7fd\x85e\x9bf\u2028g\u2029h\u202ei\t", "a\\rb\\x00c\\x7fd\\x85e\\x9bf\\u2028g\\u2029h\\u202ei\\t"),
])
def test_plain_escapes_control_characters_in_the_message(hostile, shown):
    text = PlainFormatter().format(record("closing %s: %s", hostile, "too large"))
    assert text.endswith(f" WARNING closing {shown}: too large")
    assert_one_record(text)


def test_plain_keeps_a_tracebacks_lines_and_escapes_the_exception_messages():
    try:
        try:
            raise KeyError("inner\n" + FORGED)
        except KeyError as inner:
            raise ValueError("bad request\n" + FORGED + "\x1b[2J") from inner
    except ValueError as exc:
        text = PlainFormatter().format(record("handler failed for %s", "peer", exc=exc))
    assert_one_record(text)
    lines = text.split("\n")
    assert "Traceback (most recent call last):" in lines and len(lines) > 8  # structure kept
    assert f"ValueError: bad request\\n{FORGED}\\x1b[2J" in lines
    assert "The above exception was the direct cause of the following exception:" in lines
    assert any(line.startswith("KeyError: ") and "\\n" + FORGED in line for line in lines)


def test_plain_escapes_notes_and_exception_groups_too():
    note = raised("noted")
    note.add_note("note\n" + FORGED)
    group = ExceptionGroup("group\n" + FORGED, [raised("sub\n" + FORGED)])
    for exc in (note, group):
        text = PlainFormatter().format(record("failed", exc=exc))
        assert_one_record(text)
        assert FORGED in text and f"\n{FORGED}" not in text


def test_exception_lines_join_to_what_python_prints():
    import traceback

    try:
        try:
            raise KeyError("inner\nline")
        except KeyError:
            raise ValueError("outer\nline") from None
    except ValueError as exc:
        assert "\n".join(exception_lines(exc)) == "".join(traceback.format_exception(exc)).rstrip("\n")


def test_a_record_forwarded_from_a_worker_keeps_its_traceback_structure():
    """A worker the fork server starts sends its records pickled: the traceback object
    stays behind, its lines travel, and both formats still tell them apart."""
    made = record("handler failed for %s", "peer", exc=raised("bad\n" + FORGED))
    writer, reader = socket.socketpair()
    with writer, reader:
        data = _worker_logs._ToSupervisor(writer).makePickle(made)
    arrived = logging.makeLogRecord(pickle.loads(data[4:]))
    assert arrived.exc_info[2] is None
    plain = PlainFormatter().format(arrived)
    assert_one_record(plain)
    assert "Traceback (most recent call last):" in plain and f"ValueError: bad\\n{FORGED}" in plain
    assert json.loads(JsonFormatter().format(arrived))["exc"] == "\n".join(exception_lines(made.exc_info[1]))


def test_mark_worker_names_the_process_on_every_record():
    factory = logging.getLogRecordFactory()
    try:
        _worker_logs.mark_worker()
        made = logging.getLogger("muxpool.test").makeRecord("muxpool.test", logging.INFO, "f", 1, "m", (), None)
    finally:
        logging.setLogRecordFactory(factory)
    assert json.loads(JsonFormatter().format(made))["worker_pid"] == os.getpid()


def test_configure_logging_writes_the_chosen_format_and_refuses_others():
    root, stream = logging.getLogger(), io.StringIO()
    level = root.level
    handler = configure_logging("INFO", "json", stream)
    try:
        logging.getLogger("muxpool.test").info("hello %s", "\n" + FORGED)
        logging.getLogger("muxpool.test").debug("not at INFO")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == ["hello \n" + FORGED]
    with pytest.raises(ValueError, match="'xml' is neither plain nor json"):
        configure_logging("INFO", "xml", stream)
    assert handler not in root.handlers and len(root.handlers) == len(set(root.handlers))


# --- the real `muxpool serve` -------------------------------------------------------------

APP = '''\
import os
import threading

if os.environ.get("LOGAPP_THREAD"):  # a second thread: prefork then starts workers through the fork server
    threading.Thread(target=threading.Event().wait, daemon=True).start()


def handle(message, conn):
    if message.startswith(b"boom"):
        raise ValueError("bad request\\n" + message.decode("utf-8", "replace"))
    return message
'''
SERVING = r"muxpool serving .* on 127\.0\.0\.1:(\d+) "


class Served(Logged):
    """``muxpool serve ARGS``; its stderr read line by line as it comes. Used as a
    context manager: its process group is killed at exit."""

    def __init__(self, folder, *args: str, env: dict | None = None):
        (folder / "logapp.py").write_text(APP)
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("MUXPOOL_", "LOGAPP_"))}
        environ.update(PYTHONPATH=os.pathsep.join([ROOT, str(folder)]), **(env or {}))
        super().__init__([sys.executable, "-m", "muxpool.cli", "serve", "logapp:handle", *args],
                         environ, cwd=folder)

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 30) -> list[re.Match]:
        return self.wait_for_log(pattern, count, timeout)

    def stop(self) -> list[str]:
        """SIGTERM, the exit, and every line it wrote."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.exit_code(30) == 0
        self._reader.join(30)
        return list(self.lines)

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()  # workers too: the session is the server's own


def send_and_wait_for_close(sock: socket.socket, data: bytes) -> None:
    with sock:
        sock.settimeout(30)
        sock.sendall(data)
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(65536):
                pass


def test_plain_a_unix_client_cannot_forge_a_line_with_its_path_or_its_bytes(tmp_path):
    folder = tempfile.mkdtemp(prefix="mxl", dir="/tmp")  # a Unix path holds 107 bytes at most
    listen, client_path = os.path.join(folder, "s"), os.path.join(folder, "c\n" + FORGED)
    try:
        with Served(tmp_path, "--unix", listen, "--framing", "line", "--max-message-size", "64") as served:
            served.wait_for("muxpool serving")
            for data in (b"x" * 100 + b"\n", b"boom \x1b[2J\n" + FORGED.encode() + b"\n"):
                client = socket.socket(socket.AF_UNIX)
                if data.startswith(b"x"):
                    client.bind(client_path)  # a peer address the client chose
                client.connect(listen)
                send_and_wait_for_close(client, data)
            served.wait_for("closing .*forged")
            served.wait_for("handler failed")
            text = "\n".join(served.stop())
    finally:
        for path in (client_path, listen):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        os.rmdir(folder)
    assert "\n" + FORGED not in text
    assert f"closing {folder}/c\\n{FORGED}: " in text
    assert "ValueError: bad request\\nboom \\x1b[2J" in text  # the line the handler saw, escaped
    assert "Traceback (most recent call last):\n  File " in text  # the traceback's own lines kept
    for line in text.split("\n"):
        assert TIMESTAMP.match(line) or TRACEBACK_LINE.match(line), line


ENGINES = {
    # name: flags, environment; threadpool takes its format from the environment
    "threadpool": ([], {"MUXPOOL_LOG_FORMAT": "json"}),
    "prefork": (["--log-format", "json", "--engine", "prefork", "--processes", "2"], {}),
    "prefork-forkserver": (["--log-format", "json", "--engine", "prefork", "--processes", "2"],
                           {"LOGAPP_THREAD": "1"}),
}
CLIENTS = 8


@pytest.mark.parametrize("engine", list(ENGINES))
def test_json_every_line_is_one_record_on_every_kind_of_process(tmp_path, engine):
    flags, env = ENGINES[engine]
    boom = b"boom " + FORGED.encode() + b'"}\n'
    with Served(tmp_path, *flags, "--host", "127.0.0.1", "--port", "0", "--framing", "line",
                "--max-message-size", "64", env=env) as served:
        port = int(served.wait_for(SERVING)[0].group(1))
        workers = {int(m.group(1)) for m in served.wait_for(r"prefork worker (\d+) started", 2)} \
            if "prefork" in engine else set()
        if engine == "prefork-forkserver":  # the fork server's children, not the supervisor's
            assert all(_parent(pid) != served.proc.pid for pid in workers)
        clients = [threading.Thread(target=send_and_wait_for_close,
                                    args=(socket.create_connection(("127.0.0.1", port)), boom))
                   for _ in range(CLIENTS)]  # at once: workers log side by side
        for thread in clients:
            thread.start()
        send_and_wait_for_close(socket.create_connection(("127.0.0.1", port)), b"y" * 100 + b"\n")
        for thread in clients:
            thread.join(30)
        served.wait_for("handler failed", CLIENTS)
        served.wait_for("closing .*message")
        lines = served.stop()
    records = [json.loads(line) for line in lines]  # every line, whole
    failed = [r for r in records if r["message"].startswith("handler failed")]
    assert len(failed) == CLIENTS
    for entry in failed:
        assert (entry["level"], entry["logger"]) == ("ERROR", "muxpool.server")
        assert entry["exc"].startswith("Traceback (most recent call last):\n")
        assert entry["exc"].endswith("ValueError: bad request\nboom " + FORGED + '"}')
        if workers:
            assert entry["worker_pid"] == entry["process"] and entry["worker_pid"] in workers
        else:
            assert "worker_pid" not in entry and entry["process"] == served.proc.pid
    for entry in records:  # a worker's records, and only those, name it
        assert entry["process"] == entry.get("worker_pid", served.proc.pid)
        assert entry.get("worker_pid", 0) in workers | {0}
    assert any(r["message"].startswith("muxpool serving") for r in records)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("PPid:")).split()[1])


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_an_unknown_log_format_is_one_line_and_exit_2(tmp_path, how):
    args, env = (["--log-format", "xml"], {}) if how == "flag" else ([], {"MUXPOOL_LOG_FORMAT": "xml"})
    environ = {**os.environ, "PYTHONPATH": ROOT, **env}
    done = subprocess.run([sys.executable, "-m", "muxpool.cli", "serve", *args], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == ("muxpool: error: argument --log-format: 'xml' is not a log "
                                            "format: choose plain or json (see muxpool serve --help)")
