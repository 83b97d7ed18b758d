"""The load generator's engine: one process driving many connections.

Each process runs its own epoll loop over its share of the connections. A
connection cycles through a ring of distinct requests whose replies are
computed in advance, so every reply is checked byte for byte against the
reply expected for that exact request — a wrong, reordered or missing reply
is an error, never a success — at the cost of one ``startswith``. Checking
walks the received byte stream, so it works the same for ``raw`` framing
(where TCP may split or merge replies) as for ``line`` and ``length``.

Closed loop (default): each connection keeps ``pipeline`` requests in flight
and sends the next one when a reply completes. Open loop (``rate``): requests
leave on a fixed schedule whatever the server does, and latency is measured
from the *intended* send time, so a stalled server cannot hide its stall
(no coordinated omission).

The hot loop talks to ``select.epoll`` directly and keeps per-request work to
a recv, a comparison and a send: this generator has to outrun the servers it
measures.

Per connection (``LoadSpec.per_connection``): its local port, the requests it
sent, the replies answered (verified), how it ended, and what was still in
flight then — so a test can check, connection by connection, that a server
which closed it (a drain, say) answered everything it took in. The hot loop
pays nothing extra for it: the count of requests sent *is* the counter that
picks the next request from the ring, and ``answered = sent - in flight`` is
derived when the connection ends. A run ends early once every connection is
gone (the server closed them all): there is nothing left to measure.
"""

from __future__ import annotations

import array
import collections
import select
import socket
import time

from ..framing import make_framer
from .expect import GREETING_WAIT, RING, detect_greeting, read_greeting, ring
from .spec import (END_OF_ERROR, END_OPEN, LoadResult, LoadSpec, error_kind, local_port, record,
                   run_queue_seconds)

__all__ = ["Generator", "LoadResult", "LoadSpec"]

RECV_SIZE = 65536
MAX_OPEN_LOOP_IN_FLIGHT = 10_000  # per connection; past it a request counts as "behind"


class _Conn:
    __slots__ = ("dead", "fd", "index", "outbuf", "port", "queue", "recv", "ring", "send", "sent", "sent_at",
                 "sock", "want")

    def __init__(self, sock: socket.socket, ring: list[tuple[bytes, bytes]], index: int):
        self.sock = sock
        self.index = index  # which ring it uses, and what a reconnection gets
        self.fd = sock.fileno()
        self.outbuf = bytearray()  # requests the socket would not take yet (a server not reading)
        self.dead = False
        self.recv = sock.recv
        self.send = sock.send
        self.ring = ring
        # Requests sent so far (warm-up included); the next one is ring[sent % RING].
        # Bumped as each request goes out, before send() is tried: a send that
        # raises is taken back in _fail(unsent=1).
        self.sent = 0
        self.port: int | None = None  # the local port, set when per-connection records are kept
        self.want = b""      # what is still missing of the reply awaited now
        self.sent_at = 0.0   # when that request left (or was meant to)
        self.queue: collections.deque = collections.deque()  # (reply, sent_at) behind it


class Generator:
    """Drives one process's connections through the warm-up, then the measurement."""

    def __init__(self, spec: LoadSpec):
        self.spec = spec
        self.framer = make_framer(spec.framing, max(1 << 20, spec.size + len(spec.reply_prefix) + 16))
        self.epoll = select.epoll()
        self.conns: dict[int, _Conn] = {}
        self.result = LoadResult()
        self.recording = spec.warmup <= 0
        # "auto": learned on the first connection that gets through (None until then)
        self.greeting = None if spec.greeting_bytes == "auto" else spec.greeting_bytes
        self.lost_in_warmup: list[int] = []  # connection indexes to connect again when measuring starts
        self.progress = None  # optionally a shared multiprocessing.Value counting requests
        if spec.per_connection:
            self.result.connections = []

    # --- connections ------------------------------------------------------------

    def _connect(self, index: int) -> None:
        spec = self.spec
        try:
            if spec.unix_path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(spec.timeout)
                sock.connect(spec.unix_path)
            else:
                sock = socket.create_connection((spec.host, spec.port), timeout=spec.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._greet(sock)
        except OSError as exc:
            self.result.errors["connect"] += 1
            if spec.per_connection:
                self.result.connections.append(record(None, 0, 0, "connect", 0, repr(exc)))
            return
        sock.setblocking(False)
        conn = _Conn(sock, ring(spec, self.framer, index), index)
        if spec.per_connection:
            conn.port = local_port(sock)
        self.conns[sock.fileno()] = conn
        self.epoll.register(sock.fileno(), select.EPOLLIN)

    def _greet(self, sock: socket.socket) -> None:
        if self.greeting is None:
            framer = None if self.spec.framing == "raw" else make_framer(self.spec.framing)
            self.greeting = detect_greeting(sock, framer, min(GREETING_WAIT, self.spec.timeout))
            self.result.greeting_bytes = self.greeting
        else:
            read_greeting(sock, self.greeting)

    def _fail(self, conn: _Conn, kind: str, unsent: int = 0, detail: str = "") -> None:
        """Count one error for the connection and drop it (once, however it is noticed).

        ``unsent``: the request being sent when the error struck never left."""
        if conn.dead:
            return
        conn.dead = True
        conn.sent -= unsent
        if self.recording:
            self.result.errors[kind] += 1
        else:
            self.result.warmup_errors[kind] += 1
            self.lost_in_warmup.append(conn.index)
        if self.result.connections is not None:
            self._record(conn, END_OF_ERROR.get(kind, kind), detail, unsent)
        self.conns.pop(conn.fd, None)
        try:
            self.epoll.unregister(conn.fd)
        except (OSError, ValueError):
            pass
        conn.sock.close()

    # --- requests ----------------------------------------------------------------

    def _send(self, conn: _Conn, when: float) -> bool:
        request, reply = conn.ring[conn.sent % RING]
        conn.sent += 1
        if conn.want:
            conn.queue.append((reply, when))
        else:
            conn.want, conn.sent_at = reply, when
        return self._write(conn, request)

    def _write(self, conn: _Conn, request: bytes) -> bool:
        """Send without blocking; what the socket will not take waits in ``outbuf``
        (a server that stops reading is backpressure, timed out by ``_expire``)."""
        if conn.outbuf:
            conn.outbuf += request
            return True
        try:
            sent = conn.send(request)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._fail(conn, error_kind(exc), unsent=1, detail=repr(exc))
            return False
        if sent != len(request):
            conn.outbuf += request[sent:]
            self.epoll.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT)
        return True

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.send(conn.outbuf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(conn, error_kind(exc), detail=repr(exc))
            return
        del conn.outbuf[:sent]
        if not conn.outbuf:
            self.epoll.modify(conn.fd, select.EPOLLIN)

    def _receive(self, conn: _Conn, data: bytes, now: float) -> int:
        """Check ``data`` against the expected stream; returns replies completed."""
        done = 0
        record = self.recording
        latencies = self.result.latencies
        verify = self.spec.verify
        while data:
            want = conn.want
            if not want:
                self._fail(conn, "unexpected_data")
                return done
            if len(data) < len(want):
                if verify and not want.startswith(data):
                    self._fail(conn, "wrong_reply")
                    return done
                conn.want = want[len(data):]
                return done
            if verify and not data.startswith(want):
                self._fail(conn, "wrong_reply")
                return done
            data = data[len(want):]
            if record:
                latencies.append(now - conn.sent_at)
            done += 1
            if conn.queue:
                conn.want, conn.sent_at = conn.queue.popleft()
            else:
                conn.want = b""
        return done

    # --- the loop --------------------------------------------------------------------

    def run(self) -> LoadResult:
        spec = self.spec
        for index in range(spec.connections):
            self._connect(index)
        self.cpu_start, self.wait_start = time.process_time(), run_queue_seconds()
        start = time.perf_counter()
        measure_at, stop_at = start + spec.warmup, start + spec.warmup + spec.duration
        self.measure_at = measure_at  # moved earlier if every connection is lost in the warm-up
        if spec.rate is None:
            for conn in list(self.conns.values()):
                for _ in range(spec.pipeline):
                    self._send(conn, start)
        self._loop(start, measure_at, stop_at)
        self._count_unanswered(time.perf_counter())
        self.result.elapsed = max(0.0, time.perf_counter() - self.measure_at)
        self.result.cpu_seconds = time.process_time() - self.cpu_start
        self.result.waited_seconds = run_queue_seconds() - self.wait_start
        for conn in list(self.conns.values()):
            if self.result.connections is not None:
                self._record(conn, END_OPEN)
            conn.sock.close()
        self.epoll.close()
        return self.result

    def _start_measuring(self, now: float) -> None:
        """The warm-up is over: forget its figures (its errors stay, apart) and
        connect again every connection it lost, so the measurement runs with
        them all and a server that keeps failing fails again where it counts."""
        self.recording = True
        self.measure_at = now
        self.result.latencies = array.array("d")
        self.result.requests = 0
        self.cpu_start, self.wait_start = time.process_time(), run_queue_seconds()
        lost, self.lost_in_warmup = self.lost_in_warmup, []
        for index in lost:
            before = len(self.conns)
            self._connect(index)
            if len(self.conns) > before:
                self.result.reconnected += 1
                if self.spec.rate is None:
                    conn = next(reversed(self.conns.values()))
                    for _ in range(self.spec.pipeline):
                        if not self._send(conn, now):
                            break

    def _record(self, conn: _Conn, end: str, detail: str = "", unsent: int = 0) -> None:
        """One connection's figures, as it ends (or as the run does): replies
        answered = requests sent - requests still awaited."""
        in_flight = (1 if conn.want else 0) + len(conn.queue) - unsent
        self.result.connections.append(
            record(conn.port, conn.sent, conn.sent - in_flight, end, len(conn.outbuf), detail))

    def _count_unanswered(self, now: float) -> None:
        """Requests still waiting at the end count with the age they have reached:
        a stall that lasts to the end of the run must show in the latencies."""
        if not self.recording:
            return
        latencies = self.result.latencies
        before = len(latencies)
        for conn in self.conns.values():
            if conn.want:
                latencies.append(now - conn.sent_at)
            latencies.extend(now - sent_at for _reply, sent_at in conn.queue)
        self.result.unanswered = len(latencies) - before

    def _loop(self, start: float, measure_at: float, stop_at: float) -> None:
        spec = self.spec
        perf = time.perf_counter
        poll = self.epoll.poll
        conns = self.conns
        closed_loop = spec.rate is None
        next_send = start
        rr = 0
        next_housekeeping = start
        counted = 0
        verify = spec.verify
        lat_append = self.result.latencies.append
        while True:
            now = perf()
            if not self.recording and (now >= measure_at or not conns):
                # Every connection lost in the warm-up: measure now, not after idling to its end.
                stop_at += min(0.0, now - measure_at)
                self._start_measuring(now)
                lat_append = self.result.latencies.append
                counted = 0
            if now >= stop_at or not conns:  # not conns: the server closed them all
                return
            if not closed_loop:
                next_send, rr = self._send_due(next_send, now, rr)
                timeout = max(0.0, min(next_send, stop_at) - perf())
            else:
                timeout = min(0.05, stop_at - now)
            events = poll(timeout)
            now = perf()
            done_total = 0
            for fd, mask in events:
                conn = conns.get(fd)
                if conn is None:
                    continue
                if mask & select.EPOLLOUT:
                    self._flush(conn)
                    if conn.dead or not mask & select.EPOLLIN:
                        continue
                try:
                    data = conn.recv(RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    self._fail(conn, error_kind(exc), detail=repr(exc))
                    continue
                if not data:
                    self._fail(conn, "closed")
                    continue
                want = conn.want
                if not conn.queue and (data == want if verify else len(data) == len(want)):
                    # The common case, inlined: exactly the one awaited reply.
                    if self.recording:
                        lat_append(now - conn.sent_at)
                    done_total += 1
                    if not closed_loop:
                        conn.want = b""
                        continue
                    request, conn.want = conn.ring[conn.sent % RING]
                    conn.sent += 1  # the request count is the ring's cursor: no extra cost
                    conn.sent_at = now
                    # _write() inlined: this is the generator's hottest line, and a
                    # method call here costs ~10% of its rate. Change both together.
                    if conn.outbuf:  # a backlog is waiting: keep the order
                        conn.outbuf += request
                        continue
                    try:
                        sent = conn.send(request)
                    except BlockingIOError:
                        sent = 0
                    except OSError as exc:
                        self._fail(conn, error_kind(exc), unsent=1, detail=repr(exc))
                        continue
                    if sent != len(request):
                        conn.outbuf += request[sent:]
                        self.epoll.modify(fd, select.EPOLLIN | select.EPOLLOUT)
                    continue
                done = self._receive(conn, data, now)
                done_total += done
                if closed_loop and done and fd in conns:
                    for _ in range(done):
                        if not self._send(conn, now):
                            break
            if self.recording:
                self.result.requests += done_total
            if now >= next_housekeeping:
                next_housekeeping = now + 0.1
                self._expire(now)
                if self.progress is not None and self.result.requests != counted:
                    with self.progress.get_lock():
                        self.progress.value += self.result.requests - counted
                    counted = self.result.requests

    def _send_due(self, next_send: float, now: float, rr: int) -> tuple[float, int]:
        """Open loop: send every request whose intended time has come."""
        interval = 1.0 / self.spec.rate
        conns = list(self.conns.values())
        while next_send <= now and conns:
            conn = conns[rr % len(conns)]
            rr += 1
            if conn.dead:  # failed during this batch: the rest go to the others
                conns = list(self.conns.values())
                continue
            if len(conn.queue) < MAX_OPEN_LOOP_IN_FLIGHT:
                self._send(conn, next_send)
            elif self.recording:
                self.result.errors["behind"] += 1
            next_send += interval
        return next_send, rr

    def _expire(self, now: float) -> None:
        """A request unanswered for ``timeout`` seconds fails its connection."""
        limit = self.spec.timeout
        for conn in list(self.conns.values()):
            if conn.want and now - conn.sent_at > limit:
                self._fail(conn, "timeout")

