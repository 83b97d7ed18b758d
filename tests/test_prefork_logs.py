"""Prefork workers' log records reach the supervisor whole: long ones (past the 4 KiB a
pipe write keeps whole) from several workers at once are neither lost nor cut into one
another; a record past the forwarding limit is cut with a marker; one a dying worker
left half-sent is reported. Real ``muxpool serve`` processes, real socket pairs."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sys
import threading

import pytest
from support.processes import Logged

from muxpool.prefork import worker_logs

pytestmark = pytest.mark.timeout(90)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

APP = '''\
import logging
import os
import threading

if os.environ.get("LOGAPP_THREAD"):  # a second thread: prefork then starts workers through the fork server
    threading.Thread(target=threading.Event().wait, daemon=True).start()

log = logging.getLogger("longlogs")


def deep(n, tag):  # deep and deeper take turns: a traceback folds only repeats of one frame
    if n == 0:
        raise ValueError("failed at the bottom " + tag)
    return deeper(n - 1, tag)


def deeper(n, tag):
    return deep(n, tag)


def handle(message, conn):
    kind, tag, size = message.split()
    if kind == b"long":
        log.warning("long %s %s end", tag.decode(), "x" * int(size))
    else:
        try:
            deep(int(size), tag.decode())
        except ValueError:
            log.exception("traceback %s", tag.decode())
    return b"logged"
'''
LONG = 100_000  # characters: past a pipe's 64 KiB, so a write to one never goes in whole
DEPTH = 120  # frames: a traceback of about 12 KiB
CLIENTS, EACH = 6, 4
SERVING = r"muxpool serving .* on 127\.0\.0\.1:(\d+) \(engine=prefork"


def _run_clients(port: int) -> None:
    def client(number: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            stream = sock.makefile("rwb")
            for each in range(EACH):
                kind, size = ("long", LONG) if each % 2 == 0 else ("deep", DEPTH)
                stream.write(b"%s c%d-%d %d\n" % (kind.encode(), number, each, size))
                stream.flush()
                assert stream.readline() == b"logged\n"

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)


@pytest.mark.parametrize("env", [{}, {"LOGAPP_THREAD": "1"}], ids=["forked", "fork-server"])
def test_long_records_from_every_worker_at_once_arrive_whole_and_apart(tmp_path, env):
    (tmp_path / "longlogs.py").write_text(APP)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MUXPOOL_", "LOGAPP_"))}
    environ.update(PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path)]), **env)
    served = Logged([sys.executable, "-m", "muxpool.cli", "serve", "longlogs:handle", "--engine",
                     "prefork", "--processes", "2", "--worker-engine", "threadpool", "--port", "0",
                     "--framing", "line", "--max-message-size", "64", "--log-format", "json"],
                    environ, cwd=tmp_path)
    try:
        port = int(served.wait_for_log(SERVING, timeout=30)[0].group(1))
        workers = {int(m.group(1)) for m in served.wait_for_log(r"prefork worker (\d+) started", 2)}
        served.wait_for_log(r"muxpool serving .* \(engine=threadpool", count=2, timeout=30)
        _run_clients(port)
        served.wait_for_log(r"traceback c", count=CLIENTS * EACH // 2, timeout=30)
        served.proc.terminate()
        assert served.exit_code(30) == 0
        served._reader.join(30)
        lines = list(served.lines)
    finally:
        served.kill(also=workers if "workers" in locals() else set())
    records = [json.loads(line) for line in lines]  # every line is one whole record
    long_ones = {r["message"].split()[1]: r for r in records if r["message"].startswith("long ")}
    tracebacks = {r["message"].split()[1]: r for r in records if r["message"].startswith("traceback ")}
    expected = {f"c{n}-{each}" for n in range(CLIENTS) for each in range(EACH)}
    assert set(long_ones) | set(tracebacks) == expected
    for tag, entry in long_ones.items():
        assert entry["message"] == f"long {tag} {'x' * LONG} end"
        assert entry["worker_pid"] in workers
    for tag, entry in tracebacks.items():
        exc = entry["exc"]
        assert exc.startswith("Traceback (most recent call last):\n")
        assert exc.endswith(f"ValueError: failed at the bottom {tag}")
        assert len(re.findall(r", in deeper\n", exc)) == DEPTH  # every frame
        assert len(exc) > 4096 and entry["worker_pid"] in workers


def test_forked_workers_still_log_their_drain_when_the_supervisor_is_killed(tmp_path):
    """With no supervisor left to forward to, a forked worker writes through the handlers
    it inherited (stderr here), as it did before forwarding: its drain is not silent."""
    (tmp_path / "longlogs.py").write_text(APP)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MUXPOOL_", "LOGAPP_"))}
    environ.update(PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path)]))
    served = Logged([sys.executable, "-m", "muxpool.cli", "serve", "longlogs:handle", "--engine",
                     "prefork", "--processes", "2", "--worker-engine", "loop", "--port", "0"],
                    environ, cwd=tmp_path)
    workers: set[int] = set()
    try:
        served.wait_for_log(SERVING, timeout=30)
        workers = {int(m.group(1)) for m in served.wait_for_log(r"prefork worker (\d+) started", 2)}
        served.wait_for_log(r"muxpool serving .* \(engine=loop", count=2, timeout=30)
        os.kill(served.pid, signal.SIGKILL)  # the workers get SIGTERM (PR_SET_PDEATHSIG) and drain
        stopped = served.wait_for_log(r"muxpool stopped \(\d+ connections? served\)", count=2,
                                      timeout=30)
    finally:
        served.kill(also=workers)
    assert len(stopped) == 2


# --- the forwarding itself, over a real socket pair -----------------------------------------


@pytest.fixture
def forwarder():
    logs = worker_logs.LogForwarder()
    yield logs
    logs.close()


def _send_from_a_thread(forwarder, record: logging.LogRecord) -> None:
    """As a worker does (a blocking sendall, which a large record fills the pair's buffer
    with), while this thread reads: the supervisor's side."""
    handler = worker_logs._ToSupervisor(forwarder.writer)
    sender = threading.Thread(target=handler.emit, args=(record,))
    sender.start()
    while sender.is_alive():
        forwarder.forward()
        sender.join(0.01)
    forwarder.forward()


def test_a_message_past_the_limit_is_cut_with_a_marker(forwarder, caplog):
    caplog.set_level(logging.INFO, logger="longlogs.cut")
    text = "a" * worker_logs.MOST + "b" * 1000
    _send_from_a_thread(forwarder, logging.LogRecord("longlogs.cut", logging.INFO, __file__, 1,
                                                     "%s", (text,), None))
    (record,) = [r for r in caplog.records if r.name == "longlogs.cut"]
    message = record.getMessage()
    assert message.startswith("a" * worker_logs.MOST + " [... 1000 more characters cut")
    assert "b" not in message.split(" [...")[0]


def test_a_long_traceback_arrives_whole_and_one_past_the_limit_keeps_its_ends(forwarder, caplog):
    caplog.set_level(logging.INFO, logger="longlogs.tb")

    def deep(n: int):
        if n == 0:
            raise ValueError("the bottom")
        return deeper(n - 1)

    def deeper(n: int):
        return deep(n)

    try:
        deep(200)
    except ValueError:
        exc_info = sys.exc_info()
    _send_from_a_thread(forwarder, logging.LogRecord("longlogs.tb", logging.ERROR, __file__, 1,
                                                     "failed", None, exc_info))
    (record,) = [r for r in caplog.records if r.name == "longlogs.tb"]
    assert record.exc_lines[0] == "Traceback (most recent call last):"
    assert record.exc_lines[-1] == "ValueError: the bottom"
    assert sum(line.endswith(", in deeper") for line in record.exc_lines) == 200  # every frame

    lines = ["Traceback (most recent call last):"] + [f"  frame {n} " + "y" * 100 for n in range(5000)]
    lines.append("ValueError: the bottom")
    cut = worker_logs._cut_lines(lines)
    (marker,) = [line for line in cut if line.startswith("[... ")]
    dropped = int(marker.split()[1])
    assert len(cut) - 1 + dropped == len(lines)  # what is left, and the count said cut, add up
    assert cut[0] == lines[0] and cut[-1] == lines[-1]  # the start, and what was raised
    assert sum(len(line) + 1 for line in cut) <= worker_logs.MOST + len(marker) + 1


def test_a_record_a_dying_worker_left_half_sent_is_reported(forwarder, caplog):
    caplog.set_level(logging.WARNING, logger="muxpool.server")
    forwarder.writer.sendall(worker_logs._LENGTH.pack(1000) + b"x" * 10)
    forwarder.writer.close()
    forwarder.finish(4242)
    (warning,) = [r for r in caplog.records if r.name == "muxpool.server"]
    assert warning.getMessage() == ("prefork worker 4242 exited while sending a log record: 14 "
                                    "bytes of it had arrived, and are dropped")
