"""A graceful close loses nothing and resets nothing, on every engine.

Closing a socket whose receive queue holds unread bytes makes the kernel send
RST, and an RST throws away the replies still queued for the client. So every
graceful close is a lingering close (FIN, then discard until the client's EOF
or ``linger_timeout``), on every engine; each test here fails without it:

* batch clients under SIGTERM: every batch of 10 pipelined lines is answered
  whole or not at all, and no client sees a reset;
* a pipelining client (a writer thread keeps a window of requests in flight,
  a reader thread takes 64 KiB replies) under SIGTERM: every message whose
  handler ran — the app records them — has its reply delivered;
* a client that keeps sending after SIGTERM holds the drain no longer than
  ``linger_timeout``;
* a protocol error after good messages, with the client still sending: the
  good replies arrive, then a clean EOF;
* a never-reading client of a handler that turns each 2-byte line into 64 KiB
  holds the server's memory to ``write_high_water`` and is closed at
  ``write_timeout``.

Each test runs ``muxpool serve`` in a subprocess (reliability_helpers) and
prints its figures (``pytest -s``); docs/reliability.md records them.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
from server_apps import read_records
from support.engines import CLI_ENGINES as ENGINES
from support.engines import needs_gevent
from support.lines import GREETING, Lines
from support.served import cli_server
from support.waiting import DEADLINE, wait_for

pytestmark = pytest.mark.timeout(90)

def sigterm_and_wait(server, timeout: float = DEADLINE) -> tuple[int, float]:
    """SIGTERM the server (for prefork: the parent, which drains its workers); its exit
    code and the seconds it took to exit."""
    started = time.monotonic()
    os.kill(server.proc.pid, signal.SIGTERM)
    code = server.proc.wait(timeout)
    return code, time.monotonic() - started


# --- batches under SIGTERM ---------------------------------------------------------------------


class BatchClient(threading.Thread):
    """Sends batches of 10 lines in one write and reads their 10 replies, until the server closes."""

    def __init__(self, address, index: int):
        super().__init__(daemon=True)
        self.address, self.index = address, index
        self.batches = 0
        self.ending: str | None = None  # "eof" (clean), "reset", "partial", or a problem

    def run(self) -> None:
        try:
            with socket.create_connection(self.address, timeout=DEADLINE) as sock:
                lines = Lines(sock)
                assert lines.readline() + b"\n" == GREETING
                while True:
                    batch = [b"c%d b%d m%d" % (self.index, self.batches, k) for k in range(10)]
                    sock.sendall(b"".join(m + b"\n" for m in batch))
                    for got, message in enumerate(batch):
                        reply = lines.readline()
                        if reply is None:
                            self.ending = "eof" if got == 0 else f"partial: {got} of 10 replies"
                            return
                        assert reply == b"response: " + message, reply
                    self.batches += 1
        except (ConnectionResetError, BrokenPipeError) as exc:
            self.ending = f"reset after {self.batches} batches: {exc!r}"
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.ending = f"problem: {exc!r}"


@pytest.mark.parametrize("engine", ENGINES)
def test_sigterm_answers_every_batch_whole_or_not_at_all_and_resets_nothing(engine, tmp_path):
    needs_gevent(engine)
    with cli_server(engine, tmp_path / "server.log", "--framing", "line", "--drain-timeout", "5") as server:
        clients = [BatchClient(server.address, i) for i in range(20)]
        for client in clients:
            client.start()
        wait_for(lambda: all(c.batches >= 3 for c in clients), what="every client's first 3 batches")
        code, took = sigterm_and_wait(server)
        for client in clients:
            client.join(DEADLINE)
        log = server.log()
    assert not any(c.is_alive() for c in clients)
    endings = [c.ending for c in clients]
    print(f"\n[batches] {engine}: {sum(c.batches for c in clients)} batches answered whole by 20 "
          f"clients; endings {sorted(set(endings))}; exit {code} after {took:.2f} s")
    assert endings == ["eof"] * 20, endings
    assert code == 0, log[-2000:]
    assert "did not finish in time" not in log


# --- a pipelining client under SIGTERM --------------------------------------------------------


class PipeliningClient:
    """A writer thread keeps up to WINDOW numbered requests in flight; a reader thread
    reads the 64 KiB replies; both stop when the server closes."""

    WINDOW = 32

    def __init__(self, address):
        self.sock = socket.create_connection(address, timeout=DEADLINE)
        self.port = self.sock.getsockname()[1]
        self.received: list[int] = []
        self.sent = 0
        self.ending: str | None = None
        self._window = threading.Semaphore(self.WINDOW)
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._write, daemon=True),
                         threading.Thread(target=self._read, daemon=True)]

    def start(self) -> "PipeliningClient":
        for thread in self._threads:
            thread.start()
        return self

    def _write(self) -> None:
        try:
            while not self._done.is_set():
                if self._window.acquire(timeout=0.05):
                    self.sock.sendall(b"%d\n" % self.sent)
                    self.sent += 1
        except OSError:
            pass  # the server has closed: the reader says how

    def _read(self) -> None:
        lines = Lines(self.sock)
        try:
            while (reply := lines.readline()) is not None:
                number, _, filler = reply.partition(b":")
                assert len(filler) == 65536
                self.received.append(int(number))
                self._window.release()
            self.ending = "eof"
            self._done.set()
            self.sock.shutdown(socket.SHUT_WR)  # a client that sees EOF says it is done too
        except ConnectionResetError as exc:
            self.ending = f"reset after {len(self.received)} replies: {exc!r}"
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.ending = f"problem: {exc!r}"
        finally:
            self._done.set()

    def join(self) -> None:
        for thread in self._threads:
            thread.join(DEADLINE)
        self.sock.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_sigterm_delivers_the_reply_of_every_message_a_handler_ran(engine, tmp_path):
    needs_gevent(engine)
    record = tmp_path / "handled.jsonl"
    with cli_server(engine, tmp_path / "server.log", "linger_apps:RecordingBigReply", "--framing", "line",
                    "--drain-timeout", "5", env={"LINGER_RECORD": str(record)}) as server:
        clients = [PipeliningClient(server.address).start() for _ in range(4)]
        wait_for(lambda: all(len(c.received) >= 50 for c in clients), what="50 replies on each client")
        code, took = sigterm_and_wait(server)
        for client in clients:
            client.join()
        log = server.log()
    handled = {r["port"]: r["handled"] for r in read_records(record)}
    lost = {c.port: sorted(set(handled.get(c.port, [])) - set(c.received)) for c in clients}
    print(f"\n[pipelining] {engine}: handled {sum(map(len, handled.values()))}, delivered "
          f"{sum(len(c.received) for c in clients)}, sent {sum(c.sent for c in clients)}; lost "
          f"{sum(map(len, lost.values()))}; endings {sorted({c.ending for c in clients})}; "
          f"exit {code} after {took:.2f} s")
    assert [c.ending for c in clients] == ["eof"] * 4, [c.ending for c in clients]
    assert all(not numbers for numbers in lost.values()), lost
    for client in clients:  # in order, and nothing the server did not handle
        assert client.received == handled[client.port][:len(client.received)]
    assert code == 0, log[-2000:]


# --- a client that keeps sending after SIGTERM ------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_a_client_that_keeps_sending_holds_the_drain_only_for_linger_timeout(engine, tmp_path):
    needs_gevent(engine)
    drain, linger = 5.0, 0.5
    with cli_server(engine, tmp_path / "server.log", "--framing", "line", "--drain-timeout", str(drain),
                    "--linger-timeout", str(linger)) as server:
        sock = server.connect()
        assert Lines(sock).readline() + b"\n" == GREETING
        stop = threading.Event()

        def flood():  # reads everything (so nothing backs up), sends without end
            sock.settimeout(0.01)
            while not stop.is_set():
                try:
                    sock.send(b"more\n" * 100)
                except (TimeoutError, BlockingIOError):
                    pass
                except OSError:
                    return
                try:
                    while sock.recv(65536):
                        pass
                    return  # the server's EOF; still we sent until here
                except (TimeoutError, BlockingIOError):
                    pass
                except OSError:
                    return

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        try:
            wait_for(lambda: server.held() == 1 if not server.unix_path else True, what="the flooder held")
            code, took = sigterm_and_wait(server)
        finally:
            stop.set()
            flooder.join(DEADLINE)
            sock.close()
    print(f"\n[flooder] {engine}: exit {code} {took:.2f} s after SIGTERM "
          f"(linger_timeout {linger} s, drain_timeout {drain} s)")
    assert code == 0
    assert took < linger + 1.5, f"the drain took {took:.2f} s with linger_timeout={linger}"


# --- a protocol error while the client still sends --------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_a_protocol_error_answers_the_good_messages_then_ends_cleanly(engine, tmp_path):
    needs_gevent(engine)
    with cli_server(engine, tmp_path / "server.log", "--framing", "line", "--max-message-size", "64") as server:
        sock = server.connect()
        lines = Lines(sock)
        assert lines.readline() + b"\n" == GREETING
        good = [b"good %d" % i for i in range(5)]
        # The good ones, one too long, then more than one read's worth the server will
        # never read as messages: it must discard them, or its close resets the connection.
        replies, ending = [], None
        try:
            sock.sendall(b"".join(m + b"\n" for m in good) + b"y" * 200 + b"\n")
            for _ in range(20):
                sock.sendall(b"late\n" * 2000)
            while (reply := lines.readline()) is not None:
                replies.append(reply)
            ending = "eof"
        except (ConnectionResetError, BrokenPipeError) as exc:
            ending = f"reset: {exc!r}"
        sock.close()
        server.check_running()
    assert replies == [b"response: " + m for m in good]
    assert ending == "eof"


# --- a never-reader of a handler that amplifies -----------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_a_never_reader_of_64_kib_replies_holds_memory_bounded_and_is_closed_at_write_timeout(
        engine, tmp_path):
    needs_gevent(engine)
    write_timeout = 2.0
    with cli_server(engine, tmp_path / "server.log", "linger_apps:amplify", "--framing", "line",
                    "--write-timeout", str(write_timeout)) as server:
        baseline = server.rss_kib()
        peak = baseline
        sock = server.connect()
        sock.setblocking(False)
        started, closed_at, sent = time.monotonic(), None, 0
        deadline = started + write_timeout + 10
        while closed_at is None and time.monotonic() < deadline:
            try:
                sent += sock.send(b"a\n" * 4096)  # 4,096 requests a write; never a read
            except BlockingIOError:
                pass
            except OSError:
                closed_at = time.monotonic()
            peak = max(peak, server.rss_kib())
            if closed_at is None:
                time.sleep(0.005)  # a sampling interval, not a synchronisation
        sock.close()
        server.check_running()
    grew = (peak - baseline) / 1024
    after = None if closed_at is None else closed_at - started
    print(f"\n[amplified never-reader] {engine}: sent {sent / 1024:.0f} KiB of 2-byte requests; "
          f"RSS +{grew:.1f} MiB; closed after {after if after is None else round(after, 2)} s "
          f"(write_timeout {write_timeout} s)")
    assert after is not None, "the never-reader was not closed"
    assert grew < 10, f"RSS grew {grew:.1f} MiB"
    # The client learns once its own buffer is full and the server has reset it.
    assert write_timeout - 0.1 <= after <= write_timeout + 1.0, after
