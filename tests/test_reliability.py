"""Reliability under hostile clients and churn: leaks, floods, never-reading clients, resets.

Every test runs on every engine: loop, threadpool, threaded, prefork (2 worker
processes, threadpool inside each; prefork-threaded: threaded inside each) and
gevent. The server is always a
``muxpool serve`` subprocess (gevent needs a monkey-patched process, and /proc
then says what the server holds): its fds, RSS and connections are summed
over the parent and, for prefork, its workers (see ``reliability_helpers``);
what it logs is read from its stderr.

Every test is bounded (pytest-timeout plus its own deadlines), uses loopback
only, stops every server and subprocess it started even when it fails, and
waits by polling a condition with a deadline, never by sleeping a fixed time.
Figures measured here (fd counts, cycle rates, p50/p99 under a flood, RSS
growth, close delays) are printed, so ``pytest -s`` shows them;
docs/reliability.md records them.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from support.engines import CLI_ENGINES as ENGINES
from support.engines import needs_gevent
from support.served import (
    RAW_GREETING,
    RAW_PREFIX,
    cli_server,
    greeted_echo,
    percentile,
    plain_cycle,
    raw_echo_large,
    recv_exactly,
    server_unread_bytes,
    unread_bytes,
    wait_for_close,
)
from support.servers import GREETING, PREFIX
from support.waiting import DEADLINE, wait_for

from muxpool import Client, make_framer

pytestmark = pytest.mark.timeout(90)

poll = wait_for


def _log_records(log: str) -> list[tuple[str, str]]:
    """``(level, line)`` for every WARNING-or-worse record in the CLI's log
    (format ``%(asctime)s %(levelname)s %(message)s``)."""
    records = []
    for line in log.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[2] in ("WARNING", "ERROR", "CRITICAL"):
            records.append((parts[2], line))
    return records


# --- 1. churn: file descriptors do not leak ----------------------------------------------------


def tls_cycle(address, i: int, ctx) -> None:
    """The same over TLS; the client closes without close_notify (as most clients that vanish do)."""
    with (socket.create_connection(address, timeout=DEADLINE) as raw,
          ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock):
        greeted_echo(sock, b"tls cycle %d" % i)


def tls_close_notify_cycle(address, i: int, ctx) -> float:
    """TLS closed cleanly: after its reply the client sends close_notify and waits for the
    server's close_notify, which every engine sends in answer."""
    with (socket.create_connection(address, timeout=DEADLINE) as raw,
          ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock):
        greeted_echo(sock, b"tls cycle %d" % i)
        sock.settimeout(CLOSE_NOTIFY_WAIT)
        started = time.monotonic()
        sock.unwrap()  # sends close_notify, then reads until the server's
        return time.monotonic() - started


def oversized_line_cycle(address, i: int, ctx) -> float:
    """The SERVER closes: a line past --max-message-size is a framing error."""
    with socket.create_connection(address, timeout=DEADLINE) as sock:
        assert recv_exactly(sock, len(RAW_GREETING) + 1) == RAW_GREETING + b"\n"
        sock.sendall(b"x" * 1000 + b"\n")
        return wait_for_close(sock)


def idle_cycle(address, i: int, ctx) -> float:
    """The SERVER closes: greeted, then silent until --idle-timeout."""
    with socket.create_connection(address, timeout=DEADLINE) as sock:
        assert recv_exactly(sock, len(RAW_GREETING)) == RAW_GREETING
        return wait_for_close(sock)


@dataclass
class Churn:
    cycles: int
    threads: int
    cycle: Callable
    options: list[str] = field(default_factory=list)
    closed_by_server: str = ""  # what the server logs for every connection it closes
    clean: bool = False  # the clients close cleanly: the server must log no warning


IDLE_TIMEOUT = 0.2
CLOSE_NOTIFY_WAIT = 3.0  # the server answers a close_notify in milliseconds; generous under load
CHURNS = {
    # 8 client threads, each a closed loop.
    # 6,000 cycles: a descriptor leaked even once per thousand connections shows.
    "plain": Churn(6_000, 8, plain_cycle),
    # Handshakes cost CPU on both ends (on CI's two cores, with three other test
    # workers): fewer cycles, still hundreds of times the fd slack a leak must pass.
    "tls": Churn(1_000, 8, tls_cycle, clean=True),  # no close_notify: an EOF, not worth a warning
    "tls-close-notify": Churn(500, 8, tls_close_notify_cycle, clean=True),
    "oversized-line": Churn(2_000, 8, oversized_line_cycle,
                            ["--framing", "line", "--max-message-size", "64"], "exceeds max_message_size"),
    # Each cycle waits IDLE_TIMEOUT for the server: many threads wait at once.
    "idle-timeout": Churn(600, 60, idle_cycle, ["--idle-timeout", str(IDLE_TIMEOUT)], "(idle_timeout)"),
}


CHURN_CASES = [pytest.param(engine, kind, id=f"{engine}-{kind}") for kind in CHURNS for engine in ENGINES]


@pytest.mark.parametrize(("engine", "kind"), CHURN_CASES)
def test_connect_close_churn_leaks_no_file_descriptor(engine, kind, tmp_path, request):
    """Thousands of connections opened and closed (by the client, plainly or over TLS, or
    by the server after a framing error or an idle timeout): the server's fds, summed over
    every process serving, return to their baseline, and it still serves."""
    needs_gevent(engine)
    churn = CHURNS[kind]
    # The warnings that count here are the ones churn causes. A stalled loop has
    # its own tests (test_loop_watchdog); with three serving processes, eight client
    # threads and another test worker on two cores, the scheduler alone can hold a
    # loop thread back for half a second.
    options, ctx = list(churn.options) + ["--loop-stall-warning", "2"], None
    if kind.startswith("tls"):
        certfile, ctx = request.getfixturevalue("tls_files")
        options += ["--certfile", str(certfile)]
    with cli_server(engine, tmp_path / "server.log", *options) as server:
        address = server.address
        for i in range(4 * len(server.workers)):  # warm up (each worker, very likely)
            churn.cycle(address, -1 - i, ctx)
        poll(lambda: server.held() == 0, what="the warm-up connections to be dropped")
        baseline = server.fds()
        logged_before = server.log().count(churn.closed_by_server) if churn.closed_by_server else 0

        failures: list[BaseException] = []
        done = [0] * churn.threads
        waits: list[float] = []

        def client(index: int) -> None:
            try:
                for i in range(index, churn.cycles, churn.threads):
                    waited = churn.cycle(address, i, ctx)
                    if waited is not None:
                        waits.append(waited)
                    done[index] += 1
            except Exception as exc:  # noqa: BLE001 - reported by the main thread
                failures.append(exc)

        started = time.monotonic()
        workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(churn.threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(max(1.0, started + 60 - time.monotonic()))
        elapsed = time.monotonic() - started
        assert not any(w.is_alive() for w in workers), f"clients still running: {sum(done)} cycles done"
        assert not failures, f"{len(failures)} cycles failed, first: {failures[0]!r}"
        assert sum(done) == churn.cycles

        poll(lambda: server.held() == 0, timeout=15, what="the server to drop every closed connection")
        slack = 2 * len(server.workers)  # a lazily made fd or two per serving process
        final = poll(lambda: (n := server.fds()) <= baseline + slack and (n,), timeout=15,
                     what=f"the server's fd count to return to its baseline {baseline}")[0]
        detail = ""
        if waits:
            waits.sort()
            detail = (f"; server closed each after p50 {statistics.median(waits) * 1000:.0f} ms, "
                      f"max {waits[-1] * 1000:.0f} ms")
        if churn.closed_by_server:
            logged = server.log().count(churn.closed_by_server) - logged_before
            detail += f"; {logged} closes logged"
        warnings = len(_log_records(server.log()))
        processes = f" over {len(server.pids)} processes" if len(server.pids) > 1 else ""
        print(f"\n[churn] {engine} {kind}: {churn.cycles} cycles ({churn.threads} threads) in "
              f"{elapsed:.1f} s ({churn.cycles / elapsed:.0f}/s); fds{processes} baseline {baseline}, "
              f"after {final}{detail}; {warnings} warnings logged")
        assert abs(final - baseline) <= slack
        if churn.closed_by_server:  # the server closed them, for the reason under test
            assert logged >= churn.cycles, f"only {logged} of {churn.cycles} closes logged"
        if churn.clean:
            assert warnings == 0, server.log()[-4000:]
        server.check_running()
        churn.cycle(address, 0, ctx)  # still serving


# --- 2. a flood beyond max_connections ---------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_flood_beyond_max_connections_keeps_answering_the_first_client(engine, nofile_limit, tmp_path):
    """A client connects first; then 5,000 connections open and stay silent, far more than
    max_connections=50 plus the listen backlog (1,024): each serving process holds exactly
    50, the kernel queues a backlog's worth and drops the rest's handshakes (they retry).
    The first client is answered throughout, and afterwards it and a new client are answered."""
    needs_gevent(engine)
    flood_size, max_connections = 5000, 50
    needed = flood_size + 256  # the client end of every flood socket (the server is another process)
    if nofile_limit < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {nofile_limit} is below the {needed} descriptors needed")
    with cli_server(engine, tmp_path / "server.log", "--framing", "line",
                    "--max-connections", str(max_connections)) as server:
        address = server.address
        expected = [max_connections] * len(server.workers)  # max_connections is per process
        with Client(*address, framing="line", greeting=True, timeout=DEADLINE) as good:
            flood: list[socket.socket] = []
            opener = None
            try:
                assert good.greeting == GREETING
                assert good.request(b"before") == PREFIX + b"before"

                flooding = threading.Event()
                flood_error: list[BaseException] = []

                def open_flood() -> None:
                    try:
                        for _ in range(flood_size):
                            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                            flood.append(sock)
                            sock.setblocking(False)
                            err = sock.connect_ex(address)
                            assert err in (0, errno.EINPROGRESS, errno.EAGAIN), errno.errorcode.get(err, err)
                    except Exception as exc:  # noqa: BLE001 - reported by the main thread
                        flood_error.append(exc)
                    finally:
                        flooding.set()

                opener = threading.Thread(target=open_flood, daemon=True)
                latencies: list[float] = []
                opener.start()
                # Lockstep requests while the flood opens, then for 2 s more while it is held open.
                hold_until = None
                i = 0
                while True:
                    now = time.monotonic()
                    if flooding.is_set() and hold_until is None:
                        hold_until = now + 2.0
                    if hold_until is not None and now > hold_until:
                        break
                    payload = b"during flood %d" % i
                    t0 = time.perf_counter()
                    reply = good.request(payload)
                    latencies.append(time.perf_counter() - t0)
                    assert reply == PREFIX + payload
                    i += 1
                opener.join(DEADLINE)
                assert not flood_error, flood_error
                assert len(flood) == flood_size
                # Each process holds its maximum and no more; the rest wait in the backlog.
                poll(lambda: server.held_per_worker() == expected, timeout=15,
                     what=f"the server to hold max_connections per process {expected}")
                held = server.held_per_worker()
                assert held == expected

                latencies.sort()
                p50, p99 = percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000
                print(f"\n[flood] {engine}: {len(latencies)} requests during a {flood_size}-connection flood "
                      f"(max_connections=50, held {'+'.join(map(str, held))}): p50 {p50:.2f} ms, "
                      f"p99 {p99:.2f} ms, max {latencies[-1] * 1000:.2f} ms")
                assert len(latencies) >= 100
            finally:
                if opener is not None:
                    opener.join(DEADLINE)  # it appends no socket after this
                for sock in flood:
                    sock.close()
            # The server is still up: the old client and a new one are answered.
            assert good.request(b"after") == PREFIX + b"after"
            fresh = poll(lambda: _try_client(address), timeout=DEADLINE, what="a new client to be served")
            try:
                assert fresh.request(b"new") == PREFIX + b"new"
            finally:
                fresh.close()
        server.check_running()


def _try_client(address):
    """A connected line-framing Client once the server has room for it, else None."""
    client = Client(*address, framing="line", greeting=True, timeout=DEADLINE)
    try:
        return client.connect()
    except OSError:
        client.close()
        return None


# --- 3. a client that sends and never reads ----------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_never_reading_client_is_bounded_by_write_high_water_and_closed(engine, tmp_path):
    """A client sends up to 100 MiB of requests and reads nothing: the server's RSS
    (summed over every process) grows by less than a few write_high_waters, the client is
    closed (reset) about write_timeout after reply bytes last reached it, and a bystander
    connected before and a newcomer are answered. (threaded: the reply's send blocks in the
    kernel, SO_SNDBUF = write_high_water, and the close comes when SO_SNDTIMEO expires.)"""
    needs_gevent(engine)
    high_water = 1 << 20
    write_timeout = 1.0
    with cli_server(engine, tmp_path / "server.log", "--write-high-water", str(high_water),
                    "--write-timeout", str(write_timeout)) as server:
        address = server.address
        # Warm up the reply path with large messages (on every prefork worker, very likely),
        # so the baseline includes it.
        for n in range(4 * len(server.workers)):
            with socket.create_connection(address, timeout=DEADLINE) as warm:
                assert recv_exactly(warm, len(RAW_GREETING)) == RAW_GREETING
                for i in range(5):
                    raw_echo_large(warm, bytes([65 + (n + i) % 26]) * 60_000)
        bystander = socket.create_connection(address, timeout=DEADLINE)
        hog = socket.create_connection(address, timeout=DEADLINE)
        try:
            assert recv_exactly(bystander, len(RAW_GREETING)) == RAW_GREETING
            for i in range(5):
                raw_echo_large(bystander, bytes([65 + i]) * 60_000)
            poll(lambda: server.held() == 2, what="only the bystander and the hog held")
            baseline = server.rss_kib()

            outcome: dict = {}
            chunk = b"x" * 65536
            cap_bytes, cap_seconds = 100 * 1024 * 1024, 5.0 + write_timeout + 4.0

            def send_forever() -> None:
                hog.settimeout(0.2)
                sent, started = 0, time.monotonic()
                last_progress = started
                try:
                    while sent < cap_bytes and time.monotonic() - started < cap_seconds:
                        try:
                            n = hog.send(chunk)
                        except TimeoutError:
                            continue
                        sent += n
                        last_progress = time.monotonic()
                    outcome["result"] = "cap reached"
                except (ConnectionResetError, BrokenPipeError) as exc:
                    outcome["result"] = type(exc).__name__
                    outcome["closed_at"] = time.monotonic()
                    outcome["closed_after_stall"] = outcome["closed_at"] - last_progress
                outcome["sent"] = sent
                outcome["elapsed"] = time.monotonic() - started

            # Reply bytes reaching the hog's kernel receive queue (which it never reads) show
            # the server's replies progressing; once it stops growing, the server's writes can
            # only fill its own send buffer: write_timeout expires at most this long after.
            queued, last_reply_progress = 0, time.monotonic()
            sender = threading.Thread(target=send_forever, daemon=True)
            peak = baseline
            sender.start()
            while sender.is_alive():
                peak = max(peak, server.rss_kib())
                with contextlib.suppress(OSError):
                    now_queued = unread_bytes(hog)
                    if now_queued > queued:
                        last_reply_progress = time.monotonic()
                    queued = now_queued
                sender.join(0.01)
            peak = max(peak, server.rss_kib())
            growth_kib = peak - baseline
            # 3 x write_high_water + 2 MiB margin, on every engine: once replies pass the
            # high-water mark, reading pauses (or, on threaded and gevent, the reply's send blocks).
            limit_kib = 3 * high_water // 1024 + 2048
            processes = f" (sum of {len(server.pids)} processes)" if len(server.pids) > 1 else ""
            closed_at = outcome.get("closed_at", float("nan"))
            print(f"\n[never-reader] {engine}: sent {outcome.get('sent', 0) / 2**20:.1f} MiB in "
                  f"{outcome.get('elapsed', 0):.2f} s, then {outcome.get('result')} "
                  f"{closed_at - last_reply_progress:.2f} s after reply bytes last reached it "
                  f"({queued / 1024:.0f} KiB unread), "
                  f"{outcome.get('closed_after_stall', float('nan')):.2f} s after its own sends last did; "
                  f"server RSS{processes} {baseline} KiB -> peak {peak} KiB (+{growth_kib} KiB, "
                  f"limit {limit_kib} KiB)")
            assert outcome.get("result") in ("ConnectionResetError", "BrokenPipeError"), outcome
            # On threaded the kernel times each send (SO_SNDTIMEO); a send cut short by it
            # must end the reply, not start another whole timeout for the rest.
            assert closed_at - last_reply_progress < write_timeout + 1.0, outcome  # was 2.2-2.9 s on threaded
            assert growth_kib < limit_kib, f"server RSS grew {growth_kib} KiB (limit {limit_kib} KiB)"
            # The server dropped the hog and still answers the bystander and newcomers.
            poll(lambda: server.held() == 1, what="the hog to be dropped")
            bystander.sendall(b"still there")
            assert recv_exactly(bystander, len(RAW_PREFIX) + 11) == RAW_PREFIX + b"still there"
            plain_cycle(address, 0, None)
            assert "write_timeout" in server.log()
        finally:
            hog.close()
            bystander.close()
        server.check_running()


@pytest.mark.parametrize("engine", ENGINES)
def test_sigterm_gives_up_on_a_never_reading_client_at_drain_timeout(engine, tmp_path):
    """SIGTERM while a client sends and never reads, so its replies can never all be
    flushed and write_timeout (60 s) is far away: the drain waits drain_timeout for it,
    no longer, then closes what is left and the server exits 0; a well-behaved client
    connected at the same time is answered, then closed cleanly."""
    needs_gevent(engine)
    drain_timeout = 2.0
    # A reply counts as done once the kernel has taken it. With a small write_high_water
    # (threaded and gevent: the socket's send buffer), the reply to a 64 KiB read never fits
    # in what the kernel frees, so it stays in the server and the drain must wait for it.
    # (With 1 MiB, the drain's shutdown(SHUT_RD) woke a blocked send that then fitted, and
    # the server rightly had nothing left in flight: seen under load, 1 run in 6.)
    with cli_server(engine, tmp_path / "server.log", "--drain-timeout", str(drain_timeout),
                    "--write-timeout", "60", "--write-high-water", "8192") as server:
        good = socket.create_connection(server.address, timeout=DEADLINE)
        hog = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small receive buffer: the server's replies cannot all hide in the hog's kernel.
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        hog.settimeout(DEADLINE)
        hog.connect(server.address)
        try:
            greeted_echo(good, b"before")
            # Send until the server has stopped reading the hog: two sends in a row time out
            # (0.5 s each) and its requests wait unread at the server's end, untouched between
            # them. (One stall is not enough: on a busy machine the server may only be slow,
            # catch up, hand every reply to the kernel and have nothing left in flight.)
            hog.settimeout(0.5)
            chunk, unread_at_stall = b"x" * 65536, None
            give_up = time.monotonic() + 30
            while time.monotonic() < give_up:
                try:
                    hog.send(chunk)
                    unread_at_stall = None
                    continue
                except TimeoutError:
                    pass
                unread = server_unread_bytes(server.port, hog)
                if unread and unread == unread_at_stall:
                    break
                unread_at_stall = unread
            else:
                pytest.fail("the server kept reading a client that never reads")
            good.sendall(b"still served")
            assert recv_exactly(good, len(RAW_PREFIX) + 12) == RAW_PREFIX + b"still served"

            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            assert wait_for_close(good) < DEADLINE  # drained at once: nothing in flight
            code = server.proc.wait(drain_timeout + 10)
            took = time.monotonic() - signalled
            print(f"\n[drain vs never-reader] {engine}: exited {code} {took:.2f} s after SIGTERM "
                  f"(drain_timeout {drain_timeout} s)")
            assert code == 0, server.log()[-3000:]
            assert drain_timeout - 0.2 <= took < drain_timeout + 3.0, server.log()[-3000:]
            assert "did not finish in time" in server.log()
        finally:
            hog.close()
            good.close()


# --- 4. connection reset mid-reply -------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_reset_mid_reply_logs_no_error_and_others_are_answered(engine, tmp_path):
    """20 clients pipeline 500 requests and reset the connection (RST) while the server
    writes the replies: nothing is logged at ERROR, no traceback is printed, every reset
    connection is dropped, and a bystander and a newcomer are answered."""
    needs_gevent(engine)
    resets, requests = 20, 500
    with cli_server(engine, tmp_path / "server.log", "--framing", "line") as server:
        address = server.address
        bystander = Client(*address, framing="line", greeting=True, timeout=DEADLINE).connect()
        try:
            assert bystander.request(b"before") == PREFIX + b"before"
            wire = make_framer("line").encode
            burst = b"".join(wire(b"request %04d " % i + b"y" * 1000) for i in range(requests))
            for n in range(resets):
                sock = socket.create_connection(address, timeout=DEADLINE)
                try:
                    assert recv_exactly(sock, len(wire(GREETING))) == wire(GREETING)
                    sock.sendall(burst)
                    if n % 2:  # half the time, wait for the first reply bytes: surely mid-reply
                        assert sock.recv(1)
                finally:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()  # RST: the server is still writing replies
                assert bystander.request(b"between %d" % n) == PREFIX + b"between %d" % n
            poll(lambda: server.held() == 1, what="every reset connection to be dropped")
            assert bystander.request(b"after") == PREFIX + b"after"
            fresh = Client(*address, framing="line", greeting=True, timeout=DEADLINE).connect()
            try:
                assert fresh.request(b"new") == PREFIX + b"new"
            finally:
                fresh.close()
        finally:
            bystander.close()
        server.check_running()
        log = server.log()
        records = _log_records(log)
        errors = [line for level, line in records if level != "WARNING"]
        print(f"\n[reset] {engine}: {resets} resets mid-reply; {len(records) - len(errors)} warnings, "
              f"{len(errors)} errors logged")
        assert not errors, errors
        assert "Traceback" not in log, log[-3000:]
