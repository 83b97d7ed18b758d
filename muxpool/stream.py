"""A connection served by one thread or greenlet on a blocking socket.

The ``threaded`` and ``gevent`` engines give each connection its own flow of
control: read, frame, call the handler, write, in a loop — the model of
``socketserver``'s ``ThreadingMixIn`` and of gevent's ``StreamServer``. The
server's loop still accepts, counts and drains connections; only the
connection's own I/O moves here.

Options map onto the blocking model: ``idle_timeout`` is the socket's read
timeout; ``write_timeout`` bounds each blocked write; ``write_high_water``
sizes the kernel send buffer (a handler that writes to a client that does not
read simply blocks, so memory cannot grow); ``handler_timeout`` can only be
checked when the handler returns (a thread cannot be interrupted), and the
connection is then closed.

Drain: ``close_when_done`` shuts the socket's read side, so the blocked
``recv`` returns and the loop ends after the messages already read.
"""

from __future__ import annotations

import errno
import functools
import logging
import select
import socket
import ssl
import struct
import time
from typing import TYPE_CHECKING, Any

from .errors import ConnectionClosed, ProtocolError

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("muxpool.server")

READ_SIZE = 65536
# recv(n) allocates n bytes before it knows how many arrive. Up to ~480 bytes
# that comes from CPython's small-object allocator (no malloc arena to share
# between threads), so connection threads read small while messages are small
# and switch to READ_SIZE after a read that comes back full.
SMALL_READ = 512 - 33  # 33: a bytes object's header, on 64-bit CPython
# A blocked call timed out: socket.timeout from a Python-level timeout;
# BlockingIOError (and SSLWantReadError through TLS) when the kernel's
# SO_RCVTIMEO/SO_SNDTIMEO expired.
_READ_TIMEOUTS = (socket.timeout, BlockingIOError, ssl.SSLWantReadError)
_WRITE_TIMEOUTS = (socket.timeout, BlockingIOError, ssl.SSLWantWriteError)


class StreamConnection:
    """What a handler sees as ``conn`` on the thread- and greenlet-per-connection engines."""

    # The loop's idle, write and handler timers do not apply: the kernel or a socket
    # timeout times those calls. tls_timer is the loop's, for the whole handshake.
    idle_timer = write_timer = handler_timer = tls_timer = None
    handshaken = False
    outbuf = b""  # replies go straight to the kernel: no buffer in user space

    def __init__(self, server: "Server", sock: socket.socket, peer: Any, conn_id: int):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.id = conn_id
        self.closing = False
        self.closed = False
        self._send_lock = server.engine.make_lock()
        self._calls = 0  # handler calls started; a handler_timeout timer checks it
        self._kernel_timeouts = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.peer}>"

    # --- for handlers --------------------------------------------------------

    def send(self, message: bytes) -> None:
        """Frame and send ``message`` now (blocking); ``ConnectionClosed`` once closed."""
        if self.closed:
            raise ConnectionClosed(f"connection {self.peer} is closed")
        self._write(self.server.encoder.encode(message))

    def close(self) -> None:
        """Read no more; the reply in progress is still sent, then the socket closes."""
        self.close_when_done()

    # --- for the server (any thread) ----------------------------------------------

    def start_tls(self) -> None:
        """Wrap the socket and finish the handshake within tls_handshake_timeout."""
        context = self.server.ssl_context
        if context is None:
            self.handshaken = True
            return
        self.sock = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        # The loop's tls_timer aborts (and logs) a handshake that takes too long in
        # all, which a per-read timeout alone would not: a client trickling its
        # hello a byte at a time never makes one read wait long. If it fired while
        # the socket was being wrapped, its shutdown missed the new socket: stop
        # here. The per-read timeout is only a backstop, long enough to lose to it.
        if self.closing:
            raise ConnectionClosed(f"no TLS handshake with {self.peer} in time")
        self.sock.settimeout(2 * self.server.config.tls_handshake_timeout + 1)
        self.sock.do_handshake()
        self.handshaken = True

    def close_when_done(self, drop_backlog: bool = False) -> None:
        if self.closing or self.closed:
            return
        self.closing = True
        try:
            # The plain socket's shutdown: ssl.SSLSocket.shutdown would also drop
            # the TLS layer, and the reply in progress would leave unencrypted.
            socket.socket.shutdown(self.sock, socket.SHUT_RD)  # wakes a blocked recv with EOF
        except OSError:
            pass

    def abort(self, error: BaseException | None) -> None:
        if self.closed:
            return
        self.closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # --- the connection's own thread or greenlet ------------------------------------

    def _write(self, data: bytes) -> None:
        with self._send_lock:
            if not self._kernel_timeouts:
                self.sock.settimeout(self.server.config.write_timeout)
            try:
                sent = self.sock.send(data)
                if sent != len(data):
                    self._send_rest(data, sent)
            except _WRITE_TIMEOUTS:
                self._log_write_timeout()
                raise

    def _send_rest(self, data: bytes, sent: int) -> None:
        """A send took part of a reply (send lock held). On a thread, the kernel
        returns a partial count only when SO_SNDTIMEO ran out with the buffer
        full (sendall would then start a whole new timeout, doubling
        write_timeout), or when a signal cut a blocked send short, which the
        threaded engine prevents by blocking signals in connection threads. A
        greenlet's send is partial whenever the buffer fills, and times each
        wait itself."""
        view = memoryview(data)[sent:]
        while view:
            if self._kernel_timeouts and not _writable(self.sock):
                raise BlockingIOError(errno.EAGAIN, "write_timeout ran out part-way through a reply")
            view = view[self.sock.send(view):]

    def _log_write_timeout(self) -> None:
        log.warning("closing %s: reply blocked for %s s (write_timeout)", self.peer,
                    self.server.config.write_timeout)

    def prepare_socket(self) -> None:
        self.sock.setblocking(True)
        self.start_tls()
        config = self.server.config
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.write_high_water)
        except OSError:
            pass
        # A Python-level socket timeout polls before every recv and send: a
        # syscall per message. Real threads can let the kernel time the blocking
        # call instead (SO_RCVTIMEO / SO_SNDTIMEO); greenlets cannot.
        self._kernel_timeouts = self.server.engine.kernel_timeouts
        if self._kernel_timeouts:
            for option, seconds in ((socket.SO_RCVTIMEO, config.idle_timeout),
                                    (socket.SO_SNDTIMEO, config.write_timeout)):
                self.sock.setsockopt(socket.SOL_SOCKET, option, _timeval(seconds))

    def serve(self) -> None:
        """Run the connection to its end; always closes the socket and reports it."""
        error: BaseException | None = None
        self.server.in_handler.active = True  # this thread serves handlers only
        try:
            self.prepare_socket()
            self.run()
        except (OSError, ProtocolError, ConnectionClosed) as exc:
            # When we closed it (drain, close()), the blocked read's error is
            # our own doing: gevent raises where a thread's recv returns b"".
            error = None if self.closing else exc
            if not self.closing:
                log.debug("connection %s ended: %s", self.peer, exc)
        except (Exception, SystemExit) as exc:  # a handler's (sys.exit() too): logged, the server goes on
            error = exc
            log.error("handler failed for %s", self.peer, exc_info=exc)
        finally:
            self.finish(error)

    def run(self) -> None:
        # The per-message path is written out flat, with everything bound to
        # locals: on a thread per connection it runs under the GIL once per
        # request, and each attribute lookup or call here costs requests/s.
        server, sock = self.server, self.sock
        self.session = session = server.new_session()
        framer = server.new_framer()
        feed, encode, config = framer.feed, server.encoder.encode, server.config
        handle = session.on_message
        if config.handler_timeout:
            handle = functools.partial(self._timed, handle)
        greeting = self._timed(session.on_connect, self)
        if greeting is not None:
            self._write(encode(greeting))
        recv, send = sock.recv, sock.send
        acquire, release = self._send_lock.acquire, self._send_lock.release
        # Greenlets time each blocking call in Python: set it before each one.
        settimeout = None if self._kernel_timeouts else sock.settimeout
        full_idle = idle = config.idle_timeout
        write_timeout = config.write_timeout
        partial_since = 0.0  # when bytes of a message not yet complete started arriving
        # Greenlets and TLS cannot take the non-blocking top-up read below.
        small = SMALL_READ if self._kernel_timeouts and self.server.ssl_context is None else READ_SIZE
        read_size = small
        while not self.closing:
            if settimeout is not None:
                settimeout(idle)
            try:
                data = recv(read_size)
            except _READ_TIMEOUTS:
                log.info("closing %s: no complete message for %s s (idle_timeout)", self.peer,
                         full_idle)
                return
            received = len(data)
            if received < SMALL_READ:
                read_size = small
            elif received == read_size == SMALL_READ:
                # Take the rest of what arrived in the same chunk, as one large
                # read would have (raw framing treats a chunk as a message).
                data += self._ready_bytes()
                read_size = READ_SIZE
            try:
                messages = feed(data)
            except ProtocolError as exc:
                if not self.closing or data:
                    log.warning("closing %s: %s", self.peer, exc)
                return
            for message in messages:
                reply = handle(self, message)
                if reply is not None:
                    out = encode(reply)
                    acquire()
                    try:
                        if settimeout is not None:
                            settimeout(write_timeout)
                        sent = send(out)
                        if sent != len(out):
                            self._send_rest(out, sent)
                    except _WRITE_TIMEOUTS:
                        self._log_write_timeout()
                        raise
                    finally:
                        release()
            if full_idle and (partial_since or framer.pending):
                partial_since, idle = self._idle_left(framer, messages, partial_since)
            if framer.pending_error is not None:
                log.warning("closing %s: %s", self.peer, framer.pending_error)
                return
            if not data:
                return

    def _send_close_notify(self) -> None:
        """End the TLS session as the loop engines do; without blocking: a peer
        that never answers with its own close_notify must not hold the thread."""
        try:
            self.sock.setblocking(False)
            self.sock.unwrap()
        except (OSError, ValueError):  # ssl.SSLError is an OSError
            pass

    def _ready_bytes(self) -> bytes:
        try:
            return self.sock.recv(READ_SIZE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return b""

    def _idle_left(self, framer, messages, partial_since: float) -> tuple[float, float | None]:
        """Idle means "no complete message", not "no byte": a client that trickles
        a message a byte at a time (slowloris) gets only the time that was left
        when its message began. Returns the new (partial_since, read timeout)."""
        full_idle = self.server.config.idle_timeout
        if not framer.pending:
            self._set_read_timeout(full_idle)
            return 0.0, full_idle
        now = time.monotonic()
        if not partial_since or messages:
            partial_since = now
        idle = max(0.001, full_idle - (now - partial_since))
        self._set_read_timeout(idle)
        return partial_since, idle

    def _set_read_timeout(self, seconds: float) -> None:
        if self._kernel_timeouts:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        # else: run() calls settimeout(idle) before every recv

    def _timed(self, fn, *args):
        limit = self.server.config.handler_timeout
        if not limit:
            return fn(*args)
        # A thread cannot be interrupted: the loop closes the socket when time
        # is up, so the client learns at once; the handler's reply is dropped.
        self._calls += 1
        call = self._calls
        mux = self.server.mux
        mux.defer(lambda: mux.call_later(limit, lambda: self._overdue(call, limit)))
        started = time.perf_counter()
        try:
            result = fn(*args)
        finally:
            self._calls += 1
        elapsed = time.perf_counter() - started
        if elapsed > limit:
            log.error("handler for %s took %.3f s, over handler_timeout=%s s; closing it",
                      self.peer, elapsed, limit)
            raise ConnectionClosed(f"handler_timeout={limit} s exceeded")
        return result

    def _overdue(self, call: int, limit: float) -> None:
        if self._calls == call and not self.closed:
            log.error("handler for %s exceeded handler_timeout=%s s; closing it", self.peer, limit)
            self.abort(None)

    def finish(self, error: BaseException | None) -> None:
        self.closed = True
        if error is None and isinstance(self.sock, ssl.SSLSocket):
            self._send_close_notify()
        try:
            self.sock.close()
        except OSError:
            pass
        session = getattr(self, "session", None)
        if session is not None:
            try:
                session.on_disconnect(self, error)
            except Exception:
                log.exception("on_disconnect failed for %s", self.peer)
        self.server.forget_from_any_thread(self)


def _writable(sock: socket.socket) -> bool:
    poller = select.poll()  # not select(): descriptors past 1024 are common here
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


def _timeval(seconds: float | None) -> bytes:
    """A ``struct timeval`` for SO_RCVTIMEO/SO_SNDTIMEO; zero means no timeout."""
    seconds = seconds or 0.0
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
