"""Tiny purpose-built TCP servers for the load generator's tests (tests/test_bench.py).

Each speaks the lesson's protocol with ``raw`` framing and fixed-size requests:
a 17-byte greeting, then ``response: `` + message for each ``size``-byte
request. Requests are read as exact ``size``-byte records, so requests that
TCP merged or split (open loop, pipelining) are still answered one by one.
Each server misbehaves in exactly one documented way, and counts what it did,
so a test can tell "the generator miscounted" from "the server did not do it".

Blocking sockets, one thread per connection. Every blocking call has a short
timeout and re-checks the stop flag, so :meth:`TestServer.stop` returns
promptly whatever the clients do. Use as a context manager::

    with CountedEchoServer(replies_per_conn=5) as srv:
        ... srv.port ...
"""

from __future__ import annotations

import socket
import struct
import threading
import time

GREETING = b"Hello client-side"  # 17 bytes, as muxpool's EchoService sends it
PREFIX = b"response: "
POLL = 0.1  # seconds each blocking call waits before re-checking the stop flag

assert len(GREETING) == 17


class TestServer:
    """Accept loop + one thread per connection; subclasses implement :meth:`serve`."""

    __test__ = False  # not a pytest test class

    def __init__(self, size: int = 64):
        self.size = size
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.connections = 0        # accepted so far
        self.replies = 0            # replies sent (correct or not)
        self.errors: list[str] = []  # unexpected exceptions in connection threads
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.listener.settimeout(POLL)
        self.port = self.listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"{type(self).__name__}-accept",
                                          daemon=True)

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> "TestServer":
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._acceptor.join(5)
        with self.lock:
            socks, threads = list(self._socks), list(self._threads)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(5)
        for sock in socks:
            sock.close()
        self.listener.close()
        alive = [t.name for t in threads + [self._acceptor] if t.is_alive()]
        assert not alive, f"test server threads did not stop: {alive}"

    def __enter__(self) -> "TestServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def _accept_loop(self) -> None:
        index = 0
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(POLL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._run_conn, args=(sock, index),
                                      name=f"{type(self).__name__}-conn{index}", daemon=True)
            with self.lock:
                self.connections += 1
                self._socks.append(sock)
                self._threads.append(thread)
            index += 1
            thread.start()

    def _run_conn(self, sock: socket.socket, index: int) -> None:
        try:
            self.send(sock, GREETING)
            self.serve(sock, index)
        except (ConnectionError, BrokenPipeError):
            pass  # the generator closed or reset the connection: normal at the end of a run
        except OSError as exc:
            if not self.stopping.is_set():
                with self.lock:
                    self.errors.append(f"conn {index}: {exc!r}")
        except Exception as exc:  # a bug in the test server itself: make it visible
            with self.lock:
                self.errors.append(f"conn {index}: {exc!r}")

    # --- helpers for subclasses --------------------------------------------------------

    def serve(self, sock: socket.socket, index: int) -> None:
        raise NotImplementedError

    def send(self, sock: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except TimeoutError:
                if self.stopping.is_set():
                    raise ConnectionAbortedError("server stopping") from None
                continue
            view = view[sent:]

    def recv_request(self, sock: socket.socket) -> bytes | None:
        """Exactly ``size`` bytes, or None at EOF / when stopping."""
        buf = bytearray()
        while len(buf) < self.size:
            try:
                chunk = sock.recv(self.size - len(buf))
            except TimeoutError:
                if self.stopping.is_set():
                    return None
                continue
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def reply(self, sock: socket.socket, data: bytes) -> None:
        self.send(sock, data)
        with self.lock:
            self.replies += 1

    def drain_until_eof(self, sock: socket.socket) -> None:
        """Read and discard until the peer closes (or we stop)."""
        while not self.stopping.is_set():
            try:
                if not sock.recv(65536):
                    return
            except TimeoutError:
                continue


class CountedEchoServer(TestServer):
    """Answers exactly ``replies_per_conn`` requests correctly on each connection,
    then half-closes (FIN, no RST: it keeps reading and discarding what the
    client still sends) so the client sees a clean end of stream."""

    def __init__(self, replies_per_conn: int, size: int = 64):
        super().__init__(size)
        self.replies_per_conn = replies_per_conn

    def serve(self, sock, index):
        for _ in range(self.replies_per_conn):
            message = self.recv_request(sock)
            if message is None:
                return
            self.reply(sock, PREFIX + message)
        sock.shutdown(socket.SHUT_WR)
        self.drain_until_eof(sock)


class WrongReplyServer(TestServer):
    """Every ``every``-th reply on a connection has one wrong byte (``every=1``:
    all of them); the others are correct. ``position`` picks the byte (negative
    counts from the end). Counts the wrong replies it sent in ``wrong``."""

    def __init__(self, every: int, position: int = -1, size: int = 64):
        super().__init__(size)
        self.every = every
        self.position = position
        self.wrong = 0

    def serve(self, sock, index):
        n = 0
        while (message := self.recv_request(sock)) is not None:
            n += 1
            reply = bytearray(PREFIX + message)
            if n % self.every == 0:
                reply[self.position] ^= 0x01
                with self.lock:
                    self.wrong += 1
            self.reply(sock, bytes(reply))


class StallingEchoServer(TestServer):
    """A correct echo server that stalls once: the first request read at least
    ``stall_after`` seconds after the first request of all starts a stall of
    ``stall_for`` seconds, during which *no* connection answers anything (each
    connection's thread holds every request it reads until the stall ends;
    what it has not read waits in the socket buffers). ``stalled_at`` and
    ``stall_ends`` record when it happened (``time.monotonic()``)."""

    def __init__(self, stall_after: float = 0.3, stall_for: float = 1.2, size: int = 64):
        super().__init__(size)
        self.stall_after = stall_after
        self.stall_for = stall_for
        self.first_request: float | None = None
        self.stalled_at: float | None = None
        self.stall_ends = 0.0

    def _hold(self) -> None:
        now = time.monotonic()
        with self.lock:
            if self.first_request is None:
                self.first_request = now
            elif self.stalled_at is None and now - self.first_request >= self.stall_after:
                self.stalled_at = now
                self.stall_ends = now + self.stall_for
            ends = self.stall_ends
        if now < ends:
            self.stopping.wait(ends - now)  # the stall itself (teardown cuts it short)

    def serve(self, sock, index):
        while (message := self.recv_request(sock)) is not None:
            self._hold()
            self.reply(sock, PREFIX + message)


class NeverReadsServer(TestServer):
    """Greets, then never reads or answers: a server that hung. Whatever the
    client sends piles up in the socket buffers until they are full."""

    def serve(self, sock, index):
        self.stopping.wait()


class ResetsAfterFirstRequestServer(TestServer):
    """Greets, reads one request, then resets the connection (RST: SO_LINGER 0)."""

    def __init__(self, size: int = 64):
        super().__init__(size)
        self.resets = 0

    def serve(self, sock, index):
        if self.recv_request(sock) is None:
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with self.lock:
            self.resets += 1
        sock.close()
