"""``muxpool bench`` never hides an error (issue 14, item 3).

Warm-up errors are counted apart and the connections they cost are measured
again; a server that greets nobody is detected, not 50 connect errors;
``--compare --app`` learns the replies from the handler; ``--compare`` shows
where it is; the recommendation says how sure it is; tables fit 80 columns;
a default comparison leaves out what is not installed, with one note.

Real servers on 127.0.0.1 and the real ``muxpool`` command; every process a
test starts is killed on the way out (the CLI runs in its own session and
its whole group goes); nothing waits by sleeping.
"""

from __future__ import annotations

import array
import io
import json
import os
import pty
import select
import subprocess
import textwrap
import time

import pytest
from rich.console import Console
from support.bench import MUXPOOL, muxpool_server, process_group
from support.bench_servers import CountedEchoServer, WrongReplyServer

from muxpool.loadtest import LoadSpec, Report, percentiles
from muxpool.loadtest.compare import Row
from muxpool.loadtest.generator import Generator
from muxpool.loadtest.report import render, render_comparison
from muxpool.loadtest.summary import recommend

pytestmark = pytest.mark.timeout(60)

APP = textwrap.dedent('''
    import time

    def shout(message, conn):
        return message.upper() + b"!"

    def stamp(message, conn):
        return b"%.9f" % time.time()
''')

# Imports of gevent and uvloop fail, as on a plain `pip install muxpool`.
NO_GEVENT = textwrap.dedent('''
    import sys

    class _Missing:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("gevent", "uvloop"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _Missing())
''')


def bench(args, timeout: float, **popen_options) -> tuple[int, str, str, float]:
    started = time.monotonic()
    with process_group(MUXPOOL + ["bench", *args], **popen_options) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"muxpool bench {' '.join(args)} did not finish within {timeout} s")
    return proc.returncode, out, err, time.monotonic() - started


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(c in line for c in "┃│━─")]


# --- warm-up errors ------------------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_errors_in_the_warmup_are_reported_apart_and_fail_the_run():
    """Every reply wrong: the warm-up loses each connection. They used to vanish
    ("0 requests, errors 0", exit 1 with nothing said); now the warm-up's errors
    are reported apart, and the connections come back to be measured (and fail again)."""
    with WrongReplyServer(every=1, position=0) as srv:
        code, out, err, _ = bench([f":{srv.port}", "-c", "3", "-d", "0.5", "--warmup", "0.3", "-p", "1",
                                   "--json"], timeout=30)
        assert srv.wrong == 6, srv.wrong  # 3 in the warm-up, 3 more once reconnected
    assert code == 1, (out, err)
    data = json.loads(out)
    assert data["warmup_errors"] == {"wrong_reply": 3}, data
    assert data["errors"] == {"wrong_reply": 3}, data
    assert data["reconnected_after_warmup"] == 3
    assert data["greeting_bytes_detected"] == 17
    with WrongReplyServer(every=1, position=0) as srv:
        code, out, err, _ = bench([f":{srv.port}", "-c", "3", "-d", "0.5", "--warmup", "0.3", "-p", "1"],
                                  timeout=30)
    assert code == 1
    assert "in the warm-up, not in the figures: wrong_reply=3" in out, out


@pytest.mark.timeout(30)
def test_a_connection_closed_in_the_warmup_is_connected_again_and_measured():
    """The server closes each connection after 5 replies, within the warm-up: the
    run measures fresh connections (5 replies each), not an empty room."""
    connections = 3
    with CountedEchoServer(replies_per_conn=5) as srv:
        spec = LoadSpec(port=srv.port, connections=connections, duration=2.0, warmup=2.0, timeout=5.0)
        started = time.monotonic()
        result = Generator(spec).run()
        took = time.monotonic() - started
        assert srv.connections == 2 * connections
    assert dict(result.warmup_errors) == {"closed": connections}
    assert dict(result.errors) == {"closed": connections}
    assert result.requests == 5 * connections
    assert result.reconnected == connections
    assert took < 3.0, f"{took:.1f} s: the warm-up was idled out with no connection left"


# --- the greeting ----------------------------------------------------------------------------------


def plain_echo(message, conn):
    return message


@pytest.mark.timeout(40)
def test_a_server_without_a_greeting_is_detected_not_a_connect_error():
    with muxpool_server(app=plain_echo, framing="line") as srv:
        code, out, err, took = bench([f":{srv.address[1]}", "--framing", "line", "--reply-prefix", "",
                                      "-c", "5", "-d", "1", "--warmup", "0", "-p", "1", "--json"],
                                     timeout=30)
    assert code == 0, (out, err)
    data = json.loads(out)
    assert data["errors"] == {}, data["errors"]
    assert data["requests"] > 0
    assert data["greeting_bytes_detected"] == 0
    assert took < 8, f"a 1 s run took {took:.1f} s"  # 1 s of load + 1 s of waiting for a greeting


# --- --compare --app ------------------------------------------------------------------------------------


@pytest.fixture
def app_dir(tmp_path):
    (tmp_path / "myservice.py").write_text(APP)
    return tmp_path


@pytest.mark.timeout(90)
def test_compare_learns_the_replies_of_any_handler(app_dir):
    """A greeting-less handler that is not the echo service, on an engine and a
    reference server: no flag about its replies, no errors, progress on stderr
    (plain lines: it is not a terminal), tables within 80 columns, and a
    recommendation that warns it rests on one round."""
    code, out, err, _ = bench(["--compare", "--app", "myservice:shout", "--framing", "line",
                               "--engines", "loop", "--references", "asyncio", "-d", "0.5",
                               "--warmup", "0.2", "--repeat", "1", "-c", "2", "--out", str(app_dir / "out")],
                              timeout=75, cwd=app_dir)
    assert code == 0, f"stdout:\n{out}\nstderr:\n{err}"
    data = json.loads((app_dir / "out" / "compare-myservice-shout.json").read_text())
    for row in data["servers"]:
        assert row["failure"] == "" and row["errors"] == 0 and row["warmup_errors"] == 0, row
        assert row["requests_per_s"][0] > 0, row
    assert "[1/2] muxpool:loop, round 1/1: about" in err, err
    assert "[2/2] asyncio, round 1/1" in err, err
    assert "muxpool:loop, round 1/1: " in err and "requests/s, 0 errors" in err, err
    assert "Warning: measured once (--repeat 1)" in out, out
    tables = table_lines(out)
    assert tables and all(len(line) <= 80 for line in tables), tables
    assert "…" not in out, out


@pytest.mark.timeout(30)
def test_compare_refuses_a_handler_whose_reply_it_cannot_learn(app_dir):
    code, out, err, _ = bench(["--compare", "--app", "myservice:stamp", "--out", str(app_dir / "out")],
                                 timeout=20, cwd=app_dir)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("muxpool: error: myservice:stamp answered"), err
    assert "--no-verify" in lines[0]


# --- progress on a terminal ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_compare_progress_on_a_terminal_is_a_live_bar(tmp_path):
    leader, follower = pty.openpty()
    chunks = []
    try:
        with process_group(MUXPOOL + ["bench", "--compare", "--engines", "loop", "--references", "none",
                                      "-d", "1", "--warmup", "0", "--repeat", "1", "-c", "2",
                                      "--out", str(tmp_path)], stderr=follower) as proc:
            os.close(follower)
            follower = -1
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline:
                if select.select([leader], [], [], 0.2)[0]:
                    try:
                        chunks.append(os.read(leader, 65536))
                    except OSError:  # the last writer closed the terminal
                        break
                elif proc.poll() is not None:
                    break
            out, _ = proc.communicate(timeout=10)
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert proc.returncode == 0, out
    shown = b"".join(chunks).decode(errors="replace")
    assert "muxpool:loop, round 1/1 (1/1)" in shown, shown
    assert "left" in shown and "\x1b[" in shown, shown  # redrawn in place with terminal codes
    assert "[1/1]" not in shown  # not the plain lines meant for logs


# --- installed servers only -----------------------------------------------------------------------------


@pytest.fixture
def without_gevent(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(NO_GEVENT)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))}


@pytest.mark.timeout(40)
def test_default_compare_leaves_out_servers_whose_library_is_missing(without_gevent, tmp_path):
    """Read stderr up to the line naming the servers, then stop: the run itself is
    the other tests' business."""
    lines = []
    with process_group(MUXPOOL + ["bench", "--compare", "-d", "0.5", "--repeat", "1", "-c", "2",
                                  "--out", str(tmp_path / "out")], env=without_gevent) as proc:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(line.startswith("comparing") for line in lines):
            if select.select([proc.stderr], [], [], 0.5)[0]:
                line = proc.stderr.readline()
                if not line:
                    break
                lines.append(line)
    text = "".join(lines)
    notes = [line for line in lines if line.startswith("left out:")]
    assert len(notes) == 1, text
    assert "muxpool:gevent, gevent (gevent is not installed: pip install 'muxpool[gevent]')" in notes[0]
    assert "uvloop (uvloop is not installed" in notes[0]
    comparing = next(line for line in lines if line.startswith("comparing"))
    assert "gevent" not in comparing and "uvloop" not in comparing, comparing
    assert "muxpool:loop" in comparing and "asyncio" in comparing, comparing

    code, out, err, _ = bench(["--compare", "--engines", "gevent"], timeout=20, env=without_gevent)
    assert code == 2, (out, err)
    assert err.strip() == ("muxpool: error: --engines gevent: gevent is not installed here "
                           "(pip install 'muxpool[gevent]', or leave it out of --engines)"), err


# --- the recommendation and the tables, in process -------------------------------------------------


PINNED = "server on CPU 0, generator on CPU 1"


def report_of(rps: float, errors=None, warmup_errors=None, p99_s: float = 0.001) -> Report:
    return Report(spec=LoadSpec(), processes=1, requests=int(rps * 10), elapsed=10.0,
                  latency_ms=percentiles(array.array("d", [p99_s])), errors=errors or {},
                  generator_cpu=0.5, warmup_errors=warmup_errors or {})


def row_of(server: str, rates: list[float], pinned: str = PINNED, **report_options) -> Row:
    return Row(server, [report_of(r, **report_options) for r in rates], [1.0] * len(rates), pinned=pinned)


def test_the_recommendation_says_how_sure_it_is():
    once = recommend([row_of("muxpool:loop", [100]), row_of("muxpool:prefork", [120], pinned="not pinned")],
                     "echo")
    assert "use --engine prefork" in once
    assert "Warning: measured once (--repeat 1)" in once, once
    assert "muxpool:prefork ran unpinned" in once, once

    overlap = recommend([row_of("muxpool:loop", [100, 110, 105]), row_of("muxpool:threaded", [90, 108, 95])],
                        "echo")
    assert "use --engine loop" in overlap
    assert "Not a clear lead" in overlap and "loop 100–110, threaded 90–108" in overlap, overlap
    assert "unpinned" not in overlap and "Warning" not in overlap

    clear = recommend([row_of("muxpool:loop", [100, 110, 105]), row_of("muxpool:threaded", [50, 58, 55])],
                      "echo")
    assert "A clear lead" in clear, clear


def test_a_server_with_warmup_errors_is_not_recommended():
    text = recommend([row_of("muxpool:loop", [100, 101]),
                      row_of("muxpool:prefork", [500, 501], warmup_errors={"wrong_reply": 2})], "echo")
    assert "use --engine loop" in text, text


def test_tables_fit_80_columns_even_with_extreme_figures():
    rows = [row_of("muxpool:threadpool", [123_456, 234_567], errors={"closed": 1234}, p99_s=1.23456),
            row_of("socketserver", [99_999], warmup_errors={"wrong_reply": 500}, pinned="not pinned"),
            Row("muxpool:threaded", failure="server exited with 1: boom", pinned=PINNED)]
    buf = io.StringIO()
    console = Console(file=buf, width=80)
    render_comparison(rows, "myservice:handle: 200 connections, 64-byte line messages, 10 s x 3", console)
    render(report_of(1_234_567, errors={"wrong_reply": 5, "closed": 12, "reset": 3},
                     warmup_errors={"timeout": 4}, p99_s=1.23456), console)
    text = buf.getvalue()
    assert "…" not in text, text
    assert max(map(len, text.splitlines())) <= 80, text
    assert "0 (+500)" in text and "timeout=4" in text, text
