"""Hostile clients by the hundred: stalled TLS handshakes and never-reading clients at once.

test_reliability.py meets one hostile client at a time; here many arrive
together, as they do in an attack or behind a broken proxy, on every engine
(``muxpool serve`` subprocesses, measured through /proc as there):

* hundreds of TLS clients that never finish their handshake — some silent,
  some trickling a real ClientHello a byte at a time, which a per-read timeout
  never catches — are each closed ``tls_handshake_timeout`` after they were
  accepted, while a client that finished its handshake is answered throughout;
* dozens of clients that send megabytes and never read hold the server's
  memory to a few ``write_high_water``s each, and are closed at
  ``write_timeout``, while a bystander is answered throughout;
* on a Unix socket, connection churn and a never-reading client, as over TCP.

Figures are printed (``pytest -s``); docs/reliability.md records them.
"""

from __future__ import annotations

import contextlib
import itertools
import selectors
import socket
import ssl
import threading
import time
from typing import Self

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
)
from support.waiting import DEADLINE, wait_for

pytestmark = pytest.mark.timeout(120)

poll = wait_for


def client_hello(context: ssl.SSLContext) -> bytes:
    """The bytes a TLS client sends first (its ClientHello), made without a socket."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


class ClientCrowd:
    """Client sockets driven by one thread (``drive``) until closed; close() stops both."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.drive, daemon=True)

    def drive(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(DEADLINE)
        for sock in self.socks:
            sock.close()


class Stallers(ClientCrowd):
    """Many connections that never complete a TLS handshake, opened without blocking.

    Even-numbered ones stay silent; odd ones send a real ClientHello one byte
    every ``TRICKLE_EVERY`` seconds, so no single read ever waits long.
    """

    TRICKLE_EVERY = 0.2

    def __init__(self, address, count: int, hello: bytes):
        super().__init__()
        self.address, self.count, self.hello = address, count, hello
        self.trickled = 0  # bytes sent by all tricklers together

    def open(self) -> None:
        for _ in range(self.count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.socks.append(sock)
            sock.setblocking(False)
            sock.connect_ex(self.address)  # EINPROGRESS; the kernel finishes it
        self._thread.start()

    def drive(self) -> None:
        position = {i: 0 for i in range(1, self.count, 2)}
        while position and not self._stop.wait(self.TRICKLE_EVERY):
            for i, at in list(position.items()):
                try:
                    self.socks[i].send(self.hello[at:at + 1])
                except (BlockingIOError, InterruptedError):
                    continue  # still connecting (its SYN was dropped and is retried)
                except OSError:  # closed by the server
                    del position[i]
                    continue
                self.trickled += 1
                position[i] = at + 1
                if at + 1 == len(self.hello):  # never: the timeout comes long before
                    del position[i]


class Sampler:
    """Calls ``fn`` every ``interval`` s on a thread until stopped; keeps what it returns.
    ``errors`` holds what it raised (the test reports it)."""

    def __init__(self, fn, interval: float):
        self.fn, self.interval = fn, interval
        self.values: list = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.values.append(self.fn())
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(DEADLINE)


_requests = itertools.count()


def timed_echo(sock: socket.socket) -> float:
    """One lockstep raw-framing request on ``sock``; its round trip in seconds."""
    payload = b"bystander %d" % next(_requests)
    t0 = time.perf_counter()
    sock.sendall(payload)
    assert recv_exactly(sock, len(RAW_PREFIX) + len(payload)) == RAW_PREFIX + payload
    return time.perf_counter() - t0


@pytest.mark.parametrize("engine", ENGINES)
def test_hundreds_of_stalled_tls_handshakes_are_each_closed_at_the_timeout(engine, tls_files, tmp_path):
    """300 connections that never finish a TLS handshake, half of them trickling a ClientHello
    a byte every 0.2 s, with --tls-handshake-timeout 1: every one is closed by the handshake
    timeout (one WARNING each), a client that had finished its handshake is answered
    throughout, a new TLS client is served afterwards, and the server's fds return to their
    baseline. (Past --max-connections they would be closed at once: test_overload.py.)"""
    needs_gevent(engine)
    certfile, ctx = tls_files
    stalled, max_connections, timeout = 300, 400, 1.0
    reason = "(tls_handshake_timeout)"
    with cli_server(engine, tmp_path / "server.log", "--certfile", str(certfile),
                    "--max-connections", str(max_connections),
                    "--tls-handshake-timeout", str(timeout)) as server:
        address = server.address
        for i in range(4 * len(server.workers)):  # warm up (each worker, very likely)
            _tls_cycle(address, ctx, b"warm %d" % i)
        poll(lambda: server.held() == 0, what="the warm-up connections to be dropped")
        baseline = server.fds()

        with (socket.create_connection(address, timeout=DEADLINE) as raw,
              ctx.wrap_socket(raw, server_hostname="127.0.0.1") as good):
            greeted_echo(good, b"before")
            stallers = Stallers(address, stalled, client_hello(ctx))
            rounds = 1  # every staller fits: all time out together
            try:
                started = time.monotonic()
                with Sampler(lambda: timed_echo(good), 0.005) as rtt:
                    stallers.open()
                    poll(lambda: server.log().count(reason) >= stalled, timeout=2 * (rounds + 1) * timeout + 5,
                         interval=0.05, what=f"all {stalled} handshakes to time out")
                    all_closed = time.monotonic() - started
                trickled = stallers.trickled
            finally:
                stallers.close()
            assert not rtt.errors, rtt.errors
            poll(lambda: server.held() == 1, timeout=15, what="only the good client to be held")
            assert server.log().count(reason) == stalled  # one each, no more
            timed_echo(good)
        _tls_cycle(address, ctx, b"new")
        poll(lambda: server.held() == 0, timeout=15, what="every connection to be dropped")
        slack = 2 * len(server.workers)
        final = poll(lambda: (n := server.fds()) <= baseline + slack and (n,), timeout=15,
                     what=f"the server's fd count to return to its baseline {baseline}")[0]
        latencies = sorted(rtt.values)
        print(f"\n[stalled tls] {engine}: {stalled} stalled handshakes ({trickled} bytes trickled) all "
              f"closed in {all_closed:.1f} s ({rounds} rounds of {timeout} s expected); good client: "
              f"{len(latencies)} requests, p50 {percentile(latencies, 0.5) * 1000:.2f} ms, "
              f"p99 {percentile(latencies, 0.99) * 1000:.2f} ms; fds {baseline} -> {final}")
        server.check_running()


def _tls_cycle(address, ctx: ssl.SSLContext, payload: bytes) -> None:
    with (socket.create_connection(address, timeout=DEADLINE) as raw,
          ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock):
        greeted_echo(sock, payload)


# --- dozens of clients that never read ----------------------------------------------------------


class Hogs(ClientCrowd):
    """``count`` clients, each sending up to ``cap`` bytes as fast as the server takes them and
    reading nothing (a small receive buffer, so the kernel hides little of what the server
    holds back), driven by one thread. ``closed`` counts those the server has reset."""

    def __init__(self, address, count: int, cap: int):
        super().__init__()
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.settimeout(DEADLINE)
            sock.connect(address)
            self.socks.append(sock)
        self.cap = cap
        self.sent = 0
        self.closed = 0
        self.capped = 0
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def drive(self) -> None:
        chunk = b"x" * 65536
        selector = selectors.DefaultSelector()
        try:
            for sock in self.socks:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_WRITE, [0])
            while selector.get_map() and not self._stop.is_set():
                for key, _ in selector.select(0.1):
                    sent = key.data
                    try:
                        n = key.fileobj.send(chunk)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except (ConnectionResetError, BrokenPipeError):
                        self.closed += 1
                        selector.unregister(key.fileobj)
                        continue
                    sent[0] += n
                    self.sent += n
                    if sent[0] >= self.cap:
                        self.capped += 1
                        selector.unregister(key.fileobj)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            selector.close()

    @property
    def sending(self) -> bool:
        return self._thread.is_alive()


@pytest.mark.parametrize("engine", ENGINES)
def test_dozens_of_never_reading_clients_hold_bounded_memory_and_are_closed(engine, tmp_path):
    """40 clients each send up to 16 MiB of requests and read nothing, with
    --write-high-water 256 KiB and --write-timeout 2: the server's RSS (summed over its
    processes, sampled every 5 ms) grows by less than 3 write_high_waters per client plus
    8 MiB per process (without the bound: +490-560 MiB), every one of them is closed for write_timeout (logged), and a bystander is answered
    throughout (a request every 10 ms)."""
    needs_gevent(engine)
    hogs_count, cap = 40, 16 << 20
    high_water, write_timeout = 256 << 10, 2.0
    with cli_server(engine, tmp_path / "server.log", "--write-high-water", str(high_water),
                    "--write-timeout", str(write_timeout)) as server:
        address = server.address
        for n in range(4 * len(server.workers)):  # the reply path warmed up on each worker, very likely
            with socket.create_connection(address, timeout=DEADLINE) as warm:
                assert recv_exactly(warm, len(RAW_GREETING)) == RAW_GREETING
                for i in range(3):
                    raw_echo_large(warm, bytes([65 + (n + i) % 26]) * 60_000)
        bystander = socket.create_connection(address, timeout=DEADLINE)
        hogs = None
        try:
            greeted_echo(bystander, b"before")
            poll(lambda: server.held() == 1, what="only the bystander held")
            baseline = server.rss_kib()
            hogs = Hogs(address, hogs_count, cap)
            started = time.monotonic()
            with Sampler(server.rss_kib, 0.005) as rss, Sampler(lambda: timed_echo(bystander), 0.01) as rtt:
                hogs.start()
                poll(lambda: not hogs.sending and server.held() == 1, timeout=60, interval=0.05,
                     what="every never-reading client to be closed")
                all_closed = time.monotonic() - started
            assert not rss.errors and not rtt.errors, rss.errors + rtt.errors
            assert hogs.error is None, hogs.error
            peak = max(rss.values)
            growth_kib = peak - baseline
            # Per process serving, 8 MiB for its allocator's own slack.
            limit_kib = hogs_count * 3 * high_water // 1024 + 8192 * len(server.pids)
            closes = server.log().count("(write_timeout)")
            latencies = sorted(rtt.values)
            print(f"\n[never-readers] {engine}: {hogs_count} clients sent {hogs.sent / 2**20:.0f} MiB "
                  f"({hogs.capped} reached the {cap >> 20} MiB cap); all closed in {all_closed:.1f} s, "
                  f"{closes} write_timeout closes logged; server RSS {baseline} -> peak {peak} KiB "
                  f"(+{growth_kib} KiB, limit {limit_kib}, {len(rss.values)} samples); bystander "
                  f"{len(latencies)} requests, p50 {percentile(latencies, 0.5) * 1000:.2f} ms, "
                  f"p99 {percentile(latencies, 0.99) * 1000:.2f} ms, max {latencies[-1] * 1000:.1f} ms")
            assert growth_kib < limit_kib, f"server RSS grew {growth_kib} KiB (limit {limit_kib} KiB)"
            assert closes >= hogs_count, f"{closes} write_timeout closes logged for {hogs_count} clients"
            assert len(latencies) >= 20
            timed_echo(bystander)
        finally:
            if hogs is not None:
                hogs.close()
            bystander.close()
        plain_cycle(address, 0)
        server.check_running()


# --- the same on a Unix socket ------------------------------------------------------------------


def unix_cycle(server, i: int) -> None:
    with server.connect() as sock:
        greeted_echo(sock, b"unix cycle %d" % i)


@pytest.mark.parametrize("engine", ENGINES)
def test_on_a_unix_socket_churn_leaks_nothing_and_a_never_reader_is_closed(engine, tmp_path):
    """Over a Unix socket (--unix): 2,000 connect/request/close cycles bring the server's fds
    back to their baseline, and a client that sends up to 100 MiB and never reads is closed
    about write_timeout after its sends stall, with the server's RSS bounded, while a
    bystander and a newcomer are answered."""
    needs_gevent(engine)
    high_water, write_timeout, cycles, threads = 1 << 20, 1.0, 2000, 4
    with cli_server(engine, tmp_path / "server.log", "--write-high-water", str(high_water),
                    "--write-timeout", str(write_timeout), unix_path=tmp_path / "muxpool.sock") as server:
        slack = 2 * len(server.workers)  # a lazily made fd or two per serving process
        before = server.fds()
        for i in range(4 * len(server.workers)):
            unix_cycle(server, -1 - i)
        baseline = poll(lambda: (n := server.fds()) <= before + slack and (n,),
                        what="the warm-up connections to be dropped")[0]

        failures: list[BaseException] = []

        def churn(index: int) -> None:
            try:
                for i in range(index, cycles, threads):
                    unix_cycle(server, i)
            except Exception as exc:  # noqa: BLE001 - reported by the main thread
                failures.append(exc)

        clients = [threading.Thread(target=churn, args=(i,), daemon=True) for i in range(threads)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(60)
        assert not any(client.is_alive() for client in clients) and not failures, failures[:1]
        after_churn = poll(lambda: (n := server.fds()) <= baseline + slack and (n,), timeout=15,
                           what=f"the server's fd count to return to its baseline {baseline}")[0]

        with server.connect() as bystander, server.connect() as hog:
            greeted_echo(bystander, b"before")
            rss_before = server.rss_kib()
            hog.settimeout(0.2)
            chunk, sent, peak = b"x" * 65536, 0, rss_before
            started = last_progress = time.monotonic()
            ended = "cap reached"
            while sent < 100 << 20 and time.monotonic() - started < 15:
                try:
                    sent += hog.send(chunk)
                    last_progress = time.monotonic()
                except TimeoutError:
                    pass
                except (ConnectionResetError, BrokenPipeError) as exc:
                    ended = type(exc).__name__
                    break
                peak = max(peak, server.rss_kib())
            closed_after = time.monotonic() - last_progress
            growth_kib = peak - rss_before
            limit_kib = 3 * high_water // 1024 + 2048 * len(server.pids)
            print(f"\n[unix] {engine}: {cycles} cycles, fds {baseline} -> {after_churn}; a never-reader "
                  f"sent {sent / 2**20:.1f} MiB, then {ended} {closed_after:.2f} s after its sends stalled; "
                  f"RSS +{growth_kib} KiB (limit {limit_kib})")
            assert ended in ("ConnectionResetError", "BrokenPipeError")
            assert closed_after < write_timeout + 1.0
            assert growth_kib < limit_kib
            timed_echo(bystander)
        unix_cycle(server, 0)
        server.check_running()
