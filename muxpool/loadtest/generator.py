"""The load generator's engine: one process driving many connections.

Each process runs its own selectors loop over its share of the connections.
A request carries a sequence number, so every reply can be checked byte for
byte against the reply expected for that exact request: a wrong, reordered or
missing reply is an error, never a success. Checking compares the received
byte stream with the expected one, so it works the same for ``raw`` framing
(where TCP may split or merge replies) as for ``line`` and ``length``.

Closed loop (default): each connection keeps ``pipeline`` requests in flight
and sends the next one when a reply completes. Open loop (``rate``): requests
leave on a fixed schedule whatever the server does, and latency is measured
from the *intended* send time, so a stalled server cannot hide its stall
(no coordinated omission).
"""

from __future__ import annotations

import array
import collections
import errno
import selectors
import socket
import time
from dataclasses import dataclass, field

from ..framing import make_framer

RECV_SIZE = 262144
MAX_OPEN_LOOP_IN_FLIGHT = 10_000  # per connection; beyond this the request is counted "behind"


@dataclass
class LoadSpec:
    """What to send, where, and how hard (one process's share or the whole)."""

    host: str = "127.0.0.1"
    port: int = 8088
    connections: int = 50
    duration: float = 10.0
    warmup: float = 0.0
    size: int = 64
    framing: str = "raw"
    greeting_bytes: int | str = 17   # an int, or "auto": whatever arrives first
    pipeline: int = 1
    rate: float | None = None        # requests/s for this process; None = closed loop
    reply_prefix: bytes = b"response: "
    verify: bool = True
    timeout: float = 5.0
    unix_path: str | None = None


@dataclass
class LoadResult:
    """What one process measured; :func:`merge` adds several up."""

    requests: int = 0
    errors: dict = field(default_factory=lambda: collections.Counter())
    latencies: array.array = field(default_factory=lambda: array.array("d"))
    elapsed: float = 0.0
    cpu_seconds: float = 0.0


class _Conn:
    __slots__ = ("sock", "expected", "pos", "inflight", "seq", "greeting_left", "prefix")

    def __init__(self, sock, greeting_left):
        self.sock = sock
        self.expected = bytearray()
        self.pos = 0
        self.inflight: collections.deque = collections.deque()  # (end offset, intended send time)
        self.seq = 0
        self.greeting_left = greeting_left


class Generator:
    """Drives one process's connections for the warm-up, then the measurement."""

    def __init__(self, spec: LoadSpec):
        self.spec = spec
        self.framer = make_framer(spec.framing, max(1 << 20, spec.size * 2 + 1024))
        self.selector = selectors.DefaultSelector()
        self.result = LoadResult()
        self.recording = False
        self.conns: list[_Conn] = []
        self.progress = None  # an optional shared counter (multiprocessing.Value)

    # --- requests ------------------------------------------------------------

    def _request(self, conn: _Conn) -> tuple[bytes, bytes]:
        conn.seq += 1
        body = b"%d:" % conn.seq
        body = (body * (self.spec.size // len(body) + 1))[: self.spec.size] if self.spec.size >= len(body) else body
        encode = self.framer.encode
        return encode(body), encode(self.spec.reply_prefix + body)

    def _send(self, conn: _Conn, intended: float) -> None:
        wire, reply = self._request(conn)
        conn.expected += reply
        conn.inflight.append((len(conn.expected), intended))
        try:
            conn.sock.sendall(wire)  # small and rare to block: the server reads as fast as we send
        except OSError as exc:
            self._fail(conn, exc)

    # --- connections -------------------------------------------------------------

    def _connect(self) -> _Conn | None:
        spec = self.spec
        try:
            if spec.unix_path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(spec.timeout)
                sock.connect(spec.unix_path)
            else:
                sock = socket.create_connection((spec.host, spec.port), timeout=spec.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            self.result.errors["connect"] += 1
            return None
        greeting = spec.greeting_bytes
        conn = _Conn(sock, greeting if isinstance(greeting, int) else -1)
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ, conn)
        self.conns.append(conn)
        return conn

    def _fail(self, conn: _Conn, exc: BaseException | str) -> None:
        kind = exc if isinstance(exc, str) else _error_kind(exc)
        if self.recording:
            self.result.errors[kind] += 1
        self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        if conn in self.conns:
            self.conns.remove(conn)

    def _on_data(self, conn: _Conn) -> int:
        """Read and check what arrived; returns how many replies completed."""
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self._fail(conn, exc)
            return 0
        if not data:
            self._fail(conn, "closed" if conn.inflight or conn.greeting_left else "closed")
            return 0
        if conn.greeting_left:
            if conn.greeting_left < 0:  # "auto": the first chunk is the greeting
                conn.greeting_left = 0
                return self._ready(conn)
            take = min(conn.greeting_left, len(data))
            conn.greeting_left -= take
            data = data[take:]
            if not conn.greeting_left:
                self._ready(conn)
            if not data:
                return 0
        start = conn.pos
        end = start + len(data)
        if self.spec.verify and conn.expected[start:end] != data:
            self._fail(conn, "wrong_reply" if end <= len(conn.expected) else "unexpected_data")
            return 0
        conn.pos = end
        done = 0
        now = time.perf_counter()
        inflight = conn.inflight
        record = self.recording
        latencies = self.result.latencies
        while inflight and inflight[0][0] <= end:
            _end, intended = inflight.popleft()
            if record:
                latencies.append(now - intended)
            done += 1
        if conn.pos > 65536 and not inflight:
            del conn.expected[: conn.pos]
            conn.pos = 0
        return done

    def _ready(self, conn: _Conn) -> int:
        """The greeting is in: start the closed loop on this connection."""
        if self.spec.rate is None:
            now = time.perf_counter()
            for _ in range(self.spec.pipeline):
                self._send(conn, now)
        return 0

    # --- the loop --------------------------------------------------------------------

    def run(self) -> LoadResult:
        spec = self.spec
        cpu_start = time.process_time()
        for _ in range(spec.connections):
            conn = self._connect()
            if conn is not None and conn.greeting_left == 0:
                self._ready(conn)
        start = time.perf_counter()
        measure_at = start + spec.warmup
        stop_at = measure_at + spec.duration
        if spec.warmup <= 0:
            self.recording = True
        interval = 1.0 / spec.rate if spec.rate else None
        next_send = start
        turn = 0
        counted = 0
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                break
            if not self.recording and now >= measure_at:
                self.recording = True
                cpu_start = time.process_time()
                self.result.latencies = array.array("d")
            if interval is not None:
                while next_send <= now and self.conns:
                    conn = self.conns[turn % len(self.conns)]
                    turn += 1
                    if len(conn.inflight) < MAX_OPEN_LOOP_IN_FLIGHT and conn.greeting_left == 0:
                        self._send(conn, next_send)
                    elif self.recording:
                        self.result.errors["behind"] += 1
                    next_send += interval
                wait = max(0.0, min(next_send, stop_at) - time.perf_counter())
            else:
                wait = min(0.1, stop_at - now)
            for key, _mask in self.selector.select(wait):
                conn = key.data
                done = self._on_data(conn)
                if done and self.recording:
                    self.result.requests += done
                if done and interval is None and conn in self.conns:
                    sent_at = time.perf_counter()
                    for _ in range(done):
                        self._send(conn, sent_at)
            self._expire(now)
            if self.progress is not None and self.result.requests - counted >= 1000:
                with self.progress.get_lock():
                    self.progress.value += self.result.requests - counted
                counted = self.result.requests
        self.result.elapsed = time.perf_counter() - max(measure_at, start)
        self.result.cpu_seconds = time.process_time() - cpu_start
        for conn in list(self.conns):
            self._drop(conn)
        self.selector.close()
        return self.result

    def _expire(self, now: float) -> None:
        limit = self.spec.timeout
        for conn in list(self.conns):
            if conn.inflight and now - conn.inflight[0][1] > limit and self.spec.rate is None:
                self._fail(conn, "timeout")


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, ConnectionResetError) or getattr(exc, "errno", None) == errno.ECONNRESET:
        return "reset"
    if isinstance(exc, BrokenPipeError):
        return "reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "socket_error"
