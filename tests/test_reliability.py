"""Reliability under hostile clients and churn: leaks, floods, never-reading clients, resets.

Every test is bounded (pytest-timeout plus its own deadlines), uses loopback
only, stops every server and subprocess it started even when it fails, and
waits by polling a condition with a deadline, never by sleeping a fixed time.
Figures measured here (fd counts, p99 under a flood, RSS growth) are printed,
so ``pytest -s`` shows them; docs/reliability.md records them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from muxpool import Client, Server, make_framer
from muxpool.loadtest.compare import free_port, stop_server
from test_server_conformance import (
    DEADLINE,
    GREETING,
    PREFIX,
    _JsonLinesHandler,
    _worker_connections,
    engine_options,
    held_connections,
    start_server,
    stop_servers,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)

RAW_GREETING = b"Hello client-side"  # the echo service's greeting, raw framing
RAW_PREFIX = b"response: "


# --- helpers ---------------------------------------------------------------------------------


poll = wait_for


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


@contextlib.contextmanager
def server_process(cmd: list[str], port: int, log_path):
    """Run ``cmd`` (a server listening on ``port``); always stopped (SIGTERM, then SIGKILL)."""
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        def listening():
            if proc.poll() is not None:
                with open(log_path, "rb") as f:
                    tail = f.read()[-2000:].decode(errors="replace")
                pytest.fail(f"server exited with {proc.returncode}: {tail}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return True
            except OSError:
                return False

        poll(listening, timeout=20, what=f"the server to listen on port {port}", interval=0.05)
        yield proc
    finally:
        stop_server(proc)


def echo_server_cmd(engine: str, port: int) -> list[str]:
    return [sys.executable, "-m", "muxpool.loadtest.servers", f"muxpool:{engine}", "--port", str(port)]


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        data = sock.recv(n - len(got))
        if not data:
            raise ConnectionError(f"EOF after {len(got)} of {n} bytes")
        got += data
    return got


def raw_cycle(port: int, payload: bytes) -> None:
    """connect, greeting, one request, its reply, close (raw framing: lockstep)."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        assert recv_exactly(sock, len(RAW_GREETING)) == RAW_GREETING
        sock.sendall(payload)
        assert recv_exactly(sock, len(RAW_PREFIX) + len(payload)) == RAW_PREFIX + payload


@pytest.fixture
def nofile_limit():
    """Raise the soft RLIMIT_NOFILE to the hard limit; restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    needed = 2 * 2100 + 256  # both ends of every flood socket live in this process
    if target < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def servers():
    """A list to append in-process servers to; every one is shut down at teardown."""
    made: list[Server] = []
    yield made
    stop_servers(made)


# --- 1. file descriptors do not leak -----------------------------------------------------------


@pytest.mark.parametrize("engine", ["loop", "threadpool", "threaded"])
def test_10000_connect_close_cycles_leak_no_file_descriptor(engine, tmp_path):
    cycles, threads = 10_000, 8
    port = free_port()
    with server_process(echo_server_cmd(engine, port), port, tmp_path / "server.log") as proc:
        pid = proc.pid
        raw_cycle(port, b"warm-up")
        poll(lambda: not _worker_connections([pid], port), what="the warm-up connection to be dropped")
        baseline = fd_count(pid)

        failures: list[BaseException] = []
        done = [0] * threads

        def client(index: int) -> None:
            try:
                for i in range(index, cycles, threads):
                    raw_cycle(port, b"cycle %d" % i)
                    done[index] += 1
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)

        started = time.monotonic()
        workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        elapsed = time.monotonic() - started
        assert not any(w.is_alive() for w in workers), f"clients still running: {sum(done)} cycles done"
        assert not failures, f"{len(failures)} cycles failed, first: {failures[0]!r}"
        assert sum(done) == cycles

        poll(lambda: not _worker_connections([pid], port), timeout=15,
             what="the server to drop every closed connection")
        final = poll(lambda: (n := fd_count(pid)) <= baseline + 2 and (n,), timeout=15,
                     what=f"the server's fd count to return to its baseline {baseline}")[0]
        print(f"\n[fd-leak] {engine}: {cycles} cycles in {elapsed:.1f} s "
              f"({cycles / elapsed:.0f}/s); fds baseline {baseline}, after {final}")
        assert abs(final - baseline) <= 2
        raw_cycle(port, b"still serving")


# --- 2. a flood beyond max_connections ---------------------------------------------------------


@pytest.mark.parametrize("engine", ["loop", "threadpool"])
def test_flood_beyond_max_connections_keeps_answering_the_first_client(engine, nofile_limit, servers):
    flood_size = 2000
    srv = Server(port=0, engine=engine, framing="line", max_connections=50, **engine_options(engine))
    servers.append(start_server(srv))
    address = srv.address[:2]
    good = Client(*address, framing="line", greeting=True, timeout=DEADLINE).connect()
    flood: list[socket.socket] = []
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
            except BaseException as exc:
                flood_error.append(exc)
            finally:
                flooding.set()

        opener = threading.Thread(target=open_flood, daemon=True)
        latencies: list[float] = []
        opener.start()
        # Requests while the flood opens, then for 2 s more while it is held open.
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
        # The server holds its maximum and no more; the rest wait in the backlog.
        poll(lambda: held_connections(srv) == 50, what="the server to hold max_connections")
        assert held_connections(srv) == 50

        latencies.sort()
        p50 = latencies[len(latencies) // 2] * 1000
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000
        print(f"\n[flood] {engine}: {len(latencies)} requests during a {flood_size}-connection flood "
              f"(max_connections=50): p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {latencies[-1] * 1000:.2f} ms")
        assert len(latencies) >= 100
    finally:
        for sock in flood:
            sock.close()
    # The server is still up: the old client and a new one are answered.
    assert good.request(b"after") == PREFIX + b"after"
    fresh = poll(lambda: _try_client(address), timeout=DEADLINE, what="a new client to be served")
    try:
        assert fresh.request(b"new") == PREFIX + b"new"
    finally:
        fresh.close()
        good.close()


def _try_client(address):
    """A connected line-framing Client once the server has room for it, else None."""
    client = Client(*address, framing="line", greeting=True, timeout=DEADLINE)
    try:
        return client.connect()
    except OSError:
        client.close()
        return None


# --- 3. a client that sends and never reads ----------------------------------------------------


@pytest.mark.parametrize("engine", ["loop", "threadpool"])
def test_never_reading_client_is_bounded_by_write_high_water_and_closed(engine, tmp_path):
    high_water = 1 << 20
    write_timeout = 1.0
    port = free_port()
    cmd = [sys.executable, "-m", "muxpool.cli", "serve", "--engine", engine, "--port", str(port),
           "--write-high-water", str(high_water), "--write-timeout", str(write_timeout)]
    with server_process(cmd, port, tmp_path / "server.log") as proc:
        pid = proc.pid
        bystander = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        hog = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        try:
            assert recv_exactly(bystander, len(RAW_GREETING)) == RAW_GREETING
            # Warm up the reply path with a few large messages, so the baseline includes it.
            for i in range(20):
                payload = bytes([65 + i % 26]) * 60_000
                bystander.sendall(payload)
                recv_exactly(bystander, len(RAW_PREFIX) + len(payload))
            poll(lambda: len(_worker_connections([pid], port)) == 2, what="both connections accepted")
            baseline = rss_kib(pid)

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
                        except socket.timeout:
                            continue
                        sent += n
                        last_progress = time.monotonic()
                    outcome["result"] = "cap reached"
                except (ConnectionResetError, BrokenPipeError) as exc:
                    outcome["result"] = type(exc).__name__
                    outcome["closed_after_stall"] = time.monotonic() - last_progress
                outcome["sent"] = sent
                outcome["elapsed"] = time.monotonic() - started

            sender = threading.Thread(target=send_forever, daemon=True)
            peak = baseline
            sender.start()
            while sender.is_alive():
                peak = max(peak, rss_kib(pid))
                sender.join(0.01)
            peak = max(peak, rss_kib(pid))
            growth_kib = peak - baseline
            # 3 x write_high_water + 2 MiB margin, on every engine: once replies pass the
            # high-water mark, reading pauses and queued messages wait too.
            limit_kib = 3 * high_water // 1024 + 2048
            print(f"\n[never-reader] {engine}: sent {outcome.get('sent', 0) / 2**20:.1f} MiB in "
                  f"{outcome.get('elapsed', 0):.2f} s, then {outcome.get('result')}"
                  f" {outcome.get('closed_after_stall', float('nan')):.2f} s after the last progress; "
                  f"server RSS {baseline} KiB -> peak {peak} KiB (+{growth_kib} KiB, limit {limit_kib} KiB)")
            assert outcome.get("result") in ("ConnectionResetError", "BrokenPipeError"), outcome
            assert outcome["closed_after_stall"] < write_timeout + 3.0, outcome
            assert growth_kib < limit_kib, f"server RSS grew {growth_kib} KiB (limit {limit_kib} KiB)"
            # The server dropped the hog and still answers the bystander and newcomers.
            poll(lambda: len(_worker_connections([pid], port)) == 1, what="the hog to be dropped")
            bystander.sendall(b"still there")
            assert recv_exactly(bystander, len(RAW_PREFIX) + 11) == RAW_PREFIX + b"still there"
            raw_cycle(port, b"newcomer")
        finally:
            hog.close()
            bystander.close()


# --- 4. connection reset mid-reply -------------------------------------------------------------


@contextlib.contextmanager
def muxpool_error_log(folder):
    """Capture WARNING and above from every ``muxpool`` logger, in this and forked processes."""
    logger = logging.getLogger("muxpool")
    handler = _JsonLinesHandler(folder / "muxpool.log.jsonl")
    handler.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield handler.path
    finally:
        logger.removeHandler(handler)


def _records(path) -> list[dict]:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("engine", ["loop", "threadpool", "threaded", "prefork"])
def test_reset_mid_reply_logs_no_error_and_others_are_answered(engine, servers, tmp_path):
    resets, requests = 20, 500
    with muxpool_error_log(tmp_path) as log_path:
        srv = Server(port=0, engine=engine, framing="line", **engine_options(engine))
        servers.append(start_server(srv))
        address = srv.address[:2]
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
            poll(lambda: held_connections(srv) == 1, what="every reset connection to be dropped")
            assert bystander.request(b"after") == PREFIX + b"after"
            fresh = Client(*address, framing="line", greeting=True, timeout=DEADLINE).connect()
            try:
                assert fresh.request(b"new") == PREFIX + b"new"
            finally:
                fresh.close()
        finally:
            bystander.close()
        records = _records(log_path)
        errors = [r for r in records if r["levelno"] >= logging.ERROR]
        print(f"\n[reset] {engine}: {resets} resets mid-reply; {len(records) - len(errors)} warnings, "
              f"{len(errors)} errors logged")
        assert not errors, errors
