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

Closing is a lingering close, as on the loop engines: the connection's own
thread sends its FIN (``shutdown(SHUT_WR)``), then reads and discards until
the client's EOF or ``linger_timeout``, then closes — so the kernel never
resets a connection whose replies are still on their way. ``SHUT_RD`` is
never used: once our FIN is out, Linux answers any byte arriving on a socket
shut for reading with RST.

Drain and ``close()`` from another thread: a thread idle in ``recv`` cannot
be told to stop without touching the socket, so the server's loop *claims*
it — both sides race to delete one token (``_idle["recv"]``, a single
atomic step under the GIL); only the winner acts. If
the loop wins, the thread was idle between messages: the loop sends the FIN
for it and the thread, woken by the client's EOF (or any late bytes, which it
discards), finishes the lingering close. If the thread wins, it has a message
in hand: it answers it, sees ``closing`` and closes by itself.
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

from . import calls
from .clocks import HandshakeClock
from .closing import LINGER_MAX_BYTES, discard_ready
from .connection import READ_SIZE, SMALL_READ, raise_closed  # SMALL_READ: small messages, no malloc
from .errors import ConnectionBroken, ConnectionClosed, HandlerTimeout, MuxpoolError, ProtocolError
from .logs import conn_fields
from .stats import handler_failed, set_reason

if TYPE_CHECKING:
    from .context import ConnectionContext

log = logging.getLogger("muxpool.server")

# A blocked call timed out: socket.timeout from a Python-level timeout;
# BlockingIOError (and SSLWantReadError through TLS) when the kernel's
# SO_RCVTIMEO/SO_SNDTIMEO expired.
_READ_TIMEOUTS = (socket.timeout, BlockingIOError, ssl.SSLWantReadError)
_WRITE_TIMEOUTS = (socket.timeout, BlockingIOError, ssl.SSLWantWriteError)
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST at once


class StreamConnection(HandshakeClock):
    """What a handler sees as ``conn`` on the thread- and greenlet-per-connection engines."""

    # The loop's idle, write and handler timers do not apply: the kernel or a socket
    # timeout times those calls. tls_timer is the loop's, for the whole handshake.
    idle_timer = write_timer = handler_timer = None
    linger_timer = None  # the loop's: ends a lingering close it started for an idle thread
    handshaken = False
    outbuf = b""  # replies go straight to the kernel: no buffer in user space
    # Written by the connection's thread, read by the loop (stats.CLOSE_REASONS).
    close_reason: str | None = None
    bytes_in = bytes_out = messages = errors = 0

    def __init__(self, ctx: "ConnectionContext", sock: socket.socket, peer: Any, conn_id: int):
        self.ctx = ctx
        self.config = ctx.config
        self.server = ctx.server  # for handlers (socketserver's name): conn.server.shutdown()
        self.sock = sock
        self.peer = peer
        self.id = conn_id
        self.closing = False
        self.closed = False
        self.heard = False  # a message has arrived (a drain waits for a new client's first)
        self._draining_new = False
        self._idle: dict[str, bool] = {}  # {"recv": True} while the thread waits between messages
        self._write_shut = False  # the loop sent our FIN for an idle thread
        self._aborted = False
        self._reset = False  # close with RST (an abort), not a lingering close
        self._close_called = False  # the handler called close(): send() raises from now on
        self.broken: OSError | None = None  # the socket error a send met (a reset, say)
        # The connection's own thread sends its replies without the lock until
        # another sender appears (_share_sends); a lock per reply costs requests/s.
        self._send_lock = ctx.engine.make_lock()
        self._replying = False  # the connection's thread is in a reply's send, unlocked
        self._shared = False  # a handler has called send(): every reply takes the lock
        self._calls = 0  # handler calls started; a handler_timeout timer checks it
        self._kernel_timeouts = False
        # Made here, on the loop thread, which collects it for the stats line.
        self.tally = ctx.stats.tally() if ctx.config.stats_interval or ctx.stats.timed else None
        self.counted = ctx.stats.counted  # keep bytes and messages (ServerStats.counted)
        self.opened = time.monotonic()

    def start(self) -> None:
        """Accepted (loop thread): time the whole TLS handshake (not each read), and
        hand the connection to its own thread or greenlet."""
        if self.ctx.ssl_context is not None:
            self._time_handshake()
        self.ctx.engine.spawn(self.serve, f"muxpool-conn-{self.id}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.peer}>"

    # --- for handlers --------------------------------------------------------

    def send(self, message: bytes) -> None:
        """Frame and send ``message`` now (blocking). Raises ``ConnectionBroken``
        once the peer has reset or vanished, ``ConnectionClosed`` once closed by this side."""
        if self.closed or self._close_called or self.broken is not None:
            raise_closed(self.peer, self.broken)
        try:
            data = self.ctx.encode(message)
            self._share_sends()
            self._write(data)
        except _WRITE_TIMEOUTS:
            raise ConnectionClosed(f"connection {self.peer} closed: write_timeout") from None
        except OSError as exc:
            self.broken = exc
            raise ConnectionBroken(self.peer, str(exc)) from exc

    def close(self) -> None:
        """Read no more; the reply in progress is still sent, then the socket closes."""
        self._close_called = True
        set_reason(self, "closed")
        self.close_when_done()

    # --- for the server (any thread) ----------------------------------------------

    def start_tls(self) -> None:
        """Wrap the socket and finish the handshake within tls_handshake_timeout."""
        context = self.ctx.ssl_context
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
        self.sock.settimeout(2 * self.config.tls_handshake_timeout + 1)
        self.sock.do_handshake()
        self.handshaken = True

    def close_when_done(self, drop_backlog: bool = False) -> None:
        """Finish the message in hand, then close (lingering). Any thread."""
        if self.closing or self.closed:
            return
        self.closing = True
        self._draining_new = False
        mux = self.ctx.mux
        if mux.in_loop_thread():
            self._claim_if_idle()
        else:
            mux.defer(self._claim_if_idle)

    def drain(self) -> None:
        """The server drains (loop thread). A client that has sent nothing yet —
        accepted a moment ago, its first request on the way — has its first
        message answered if it comes within linger_timeout."""
        if self.closing or self.closed:
            return
        set_reason(self, "drain")
        if self.heard:
            self.close_when_done()
            return
        self._draining_new = True
        self.linger_timer = self.ctx.mux.call_later(self.ctx.linger_time(), self._new_client_waited)

    def _new_client_waited(self) -> None:
        self.linger_timer = None
        if self._draining_new:
            self.close_when_done()

    def _claim_if_idle(self) -> None:
        """Loop thread: if the connection's thread waits between messages, send
        the FIN for it, and end the wait at the linger deadline if the client
        neither closes nor sends."""
        if self.closed:
            return
        try:
            del self._idle["recv"]
        except KeyError:
            return  # not idle: the thread sees ``closing`` after the message in hand
        self._write_shut = True
        try:
            # The plain socket's shutdown: ssl.SSLSocket's would unwrap the TLS layer.
            socket.socket.shutdown(self.sock, socket.SHUT_WR)
        except OSError:
            pass
        self.linger_timer = self.ctx.mux.call_later(self.ctx.linger_time(), lambda: self.abort(None))

    def abort(self, error: BaseException | None, reset: bool = False) -> None:
        """End the connection now (any thread): its thread wakes to an error and closes."""
        if self._sock_closed:
            return
        self.closing = True
        self._aborted = True
        self._reset = self._reset or reset
        self.shutdown_socket()

    def shutdown_socket(self) -> None:
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    _sock_closed = False
    _timed_out: HandlerTimeout | None = None  # the loop's handler_timeout timer fired

    # --- the connection's own thread or greenlet ------------------------------------

    def _share_sends(self) -> None:
        """Before the first send() (any thread): from now on the connection's
        thread takes the send lock for its replies too. It may have read
        ``_shared`` unset just before: then it is in that reply's send, with
        ``_replying`` raised, and is waited out here (a send of its own, at
        most write_timeout). Under the GIL, and between greenlets, the two
        flags are a handshake: each side raises its own, then reads the other's."""
        if self._shared:
            return
        self._shared = True
        pause = 0.0001
        while self._replying:  # never so on the connection's own thread: not in a send
            time.sleep(pause)  # cooperative under gevent's patch
            pause = min(pause * 2, 0.01)

    def _write(self, data: bytes) -> None:
        try:
            self._send_locked(data)
        except _WRITE_TIMEOUTS:
            self._log_write_timeout()
            raise

    def _send_locked(self, data: bytes) -> None:
        with self._send_lock:
            if not self._kernel_timeouts:
                self.sock.settimeout(self.config.write_timeout)
            sent = self.sock.send(data)
            if self.counted:
                self.bytes_out += sent
            if sent != len(data):
                self._send_rest(data, sent)

    def _send_rest(self, data: bytes, sent: int) -> None:
        """A send took part of a reply (the send lock or ``_replying`` held). On a thread, the kernel
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
            sent = self.sock.send(view)
            if self.counted:
                self.bytes_out += sent
            view = view[sent:]

    def _log_write_timeout(self) -> None:
        set_reason(self, "write_timeout")
        self._reset = True  # a client that stopped reading: RST frees what the kernel still holds
        log.warning("closing %s: reply blocked for %s s (write_timeout)", self.peer,
                    self.config.write_timeout, extra=conn_fields(self))

    def prepare_socket(self) -> None:
        self.sock.setblocking(True)
        self.start_tls()
        config = self.config
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.write_high_water)
        except OSError:
            pass
        # A Python-level socket timeout polls before every recv and send: a
        # syscall per message. Real threads can let the kernel time the blocking
        # call instead (SO_RCVTIMEO / SO_SNDTIMEO); greenlets cannot.
        self._kernel_timeouts = self.ctx.engine.kernel_timeouts
        if self._kernel_timeouts:
            for option, seconds in ((socket.SO_RCVTIMEO, config.idle_timeout),
                                    (socket.SO_SNDTIMEO, config.write_timeout)):
                self.sock.setsockopt(socket.SOL_SOCKET, option, _timeval(seconds))

    def serve(self) -> None:
        """Run the connection to its end; always closes the socket and reports it."""
        error: BaseException | None = None
        ending = "abort"
        calls.handler_thread.active = True  # this thread serves handlers only
        try:
            self.prepare_socket()
            ending = self.run()
        except HandlerTimeout as exc:  # returned late: logged; reset, as the loop engines do
            error, self._reset = exc, True
            set_reason(self, "handler_timeout")
        except (OSError, ProtocolError, ConnectionClosed) as exc:
            # When we closed it (drain, close()), the blocked read's error is
            # our own doing: gevent raises where a thread's recv returns b"".
            error = None if self.closing else exc
            if not self.closing:
                log.debug("connection %s ended: %s", self.peer, exc, extra=conn_fields(self))
                if isinstance(exc, OSError) and not isinstance(exc, MuxpoolError):
                    self.broken = exc
                set_reason(self, "protocol_error" if isinstance(exc, (ProtocolError, ssl.SSLError))
                           else "reset")
        except (Exception, SystemExit) as exc:  # a handler's (sys.exit() too): logged, the server goes on
            error = exc
            calls.handler_failed(self.peer, exc, conn_id=self.id)
            handler_failed(self)
        finally:
            self.finish(error or self._timed_out, ending)

    def run(self) -> str:
        """Serve messages until the connection ends; returns how to close it:
        ``"eof"`` (the client closed: nothing unread can follow), ``"linger"``
        (we close: lingering) or ``"abort"`` (close at once)."""
        # The per-message path is written out flat, with everything bound to
        # locals: on a thread per connection it runs under the GIL once per
        # request, and each attribute lookup or call here costs requests/s.
        ctx, sock = self.ctx, self.sock
        self.session = session = ctx.new_session()
        framer = ctx.new_framer()
        feed, encode, config = framer.feed, ctx.encode, ctx.config
        handle = session.on_message
        if config.handler_timeout:
            handle = functools.partial(self._timed, handle)
        if self.tally is not None:  # only then: two clock reads per message
            handle = functools.partial(_tallied, self.tally.add, handle)
        greeting = self._timed(session.on_connect, self)
        if greeting is not None:
            self._write(encode(greeting))
        recv, send = sock.recv, sock.send
        # Greenlets time each blocking call in Python: set it before each one.
        settimeout = None if self._kernel_timeouts else sock.settimeout
        full_idle = idle = config.idle_timeout
        write_timeout = config.write_timeout
        partial_since = 0.0  # when bytes of a message not yet complete started arriving
        # Greenlets and TLS cannot take the non-blocking top-up read below.
        small = SMALL_READ if self._kernel_timeouts and ctx.ssl_context is None else READ_SIZE
        read_size = small
        idle_flag = self._idle
        counted = self.counted
        # The framer's one buffer for its life (framer.pending, without a
        # property call per message): bytes of a message not yet complete.
        partial = framer._buf
        heard = False
        while True:
            idle_flag["recv"] = True
            if self.closing:  # after the flag: a close that comes later finds it set
                idle_flag.pop("recv", None)  # whoever took it, the linger is ours to finish
                return "linger"
            if settimeout is not None:
                settimeout(idle)
            try:
                data = recv(read_size)
            except _READ_TIMEOUTS:
                return self._timed_out_idle(full_idle)
            try:
                del idle_flag["recv"]  # the loop deletes it when it sends our FIN: one of us wins
            except KeyError:
                # The loop sent our FIN while we waited: the client's EOF, or
                # bytes sent before it saw ours, which are discarded.
                return "eof" if not data else "linger"
            received = len(data)
            if received >= small:  # rare while messages are small
                if received == read_size == SMALL_READ:
                    # Take the rest of what arrived in the same chunk, as one large
                    # read would have (raw framing treats a chunk as a message).
                    data += self._ready_bytes()
                    received = len(data)
                    read_size = READ_SIZE
            else:
                read_size = small
            if counted:
                self.bytes_in += received
            try:
                messages = feed(data)
            except ProtocolError as exc:
                log.warning("closing %s: %s", self.peer, exc, extra=conn_fields(self))
                set_reason(self, "protocol_error")
                return "linger" if data else "eof"
            if messages:
                if counted:
                    self.messages += len(messages)
                if not heard:
                    heard = self.heard = True
                    if self._draining_new:  # a client accepted just before a drain: this one answered
                        self._draining_new = False
                        self.closing = True
            elif not data:
                return "eof"
            for message in messages:
                reply = handle(self, message)
                if reply is not None:
                    try:
                        out = encode(reply)
                    except (ProtocolError, TypeError) as exc:  # as on the loop: logged, closed
                        calls.unframeable(self.peer, exc, conn_id=self.id)
                        handler_failed(self)
                        return "linger"
                    self._replying = True  # before reading _shared: see _share_sends
                    try:
                        if self._shared:
                            self._send_locked(out)
                        else:
                            if settimeout is not None:
                                settimeout(write_timeout)
                            sent = send(out)
                            if counted:
                                self.bytes_out += sent
                            if sent != len(out):
                                self._send_rest(out, sent)
                    except _WRITE_TIMEOUTS:
                        self._log_write_timeout()
                        raise
                    finally:
                        self._replying = False
            if full_idle and (partial_since or partial):
                partial_since, idle = self._idle_left(framer, messages, partial_since)
            if framer.pending_error is not None:
                log.warning("closing %s: %s", self.peer, framer.pending_error, extra=conn_fields(self))
                set_reason(self, "protocol_error")
                return "linger"

    def _timed_out_idle(self, full_idle: float | None) -> str:
        """The read timed out: the idle_timeout ran out, unless the loop sent
        our FIN meanwhile (then the linger is ours to finish)."""
        try:
            del self._idle["recv"]
        except KeyError:
            return "linger"
        log.info("closing %s: no complete message for %s s (idle_timeout)", self.peer,
                 full_idle, extra=conn_fields(self))
        set_reason(self, "idle")
        return "abort"

    def _send_close_notify(self) -> None:
        """End the TLS session as the loop engines do; without blocking: a peer
        that never answers with its own close_notify must not hold the thread."""
        try:
            self.sock.setblocking(False)
            self.sock.unwrap()
        except (OSError, ValueError):  # ssl.SSLError is an OSError
            pass

    def _linger(self) -> None:
        """Our FIN (unless the loop sent it), then discard input until the client's
        EOF, linger_timeout or LINGER_MAX_BYTES: closing with unread input would
        make the kernel reset the connection and destroy replies in flight."""
        sock = self.sock
        try:
            if not self._write_shut:
                socket.socket.shutdown(sock, socket.SHUT_WR)
            deadline = time.monotonic() + self.ctx.linger_time()
            left = LINGER_MAX_BYTES
            while left > 0 and not self._aborted:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if self._kernel_timeouts:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(remaining))
                else:
                    sock.settimeout(remaining)
                data = socket.socket.recv(sock, READ_SIZE)  # raw bytes: under TLS, nothing to decrypt
                if not data:
                    return  # the client's EOF: a clean close
                left -= len(data)
            self._reset = self._reset or left <= 0
        except _READ_TIMEOUTS:
            pass
        except (OSError, ValueError):  # reset, or closed: nothing left to protect
            return
        discard_ready(sock)  # unread input would turn the close into a reset

    def _ready_bytes(self) -> bytes:
        try:
            return self.sock.recv(READ_SIZE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return b""

    def _idle_left(self, framer, messages, partial_since: float) -> tuple[float, float | None]:
        """Idle means "no complete message", not "no byte": a client that trickles
        a message a byte at a time (slowloris) gets only the time that was left
        when its message began. Returns the new (partial_since, read timeout)."""
        full_idle = self.config.idle_timeout
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
        limit = self.config.handler_timeout
        if not limit:
            return fn(*args)
        # A thread cannot be interrupted: the loop closes the socket when time
        # is up, so the client learns at once; the handler's reply is dropped.
        self._calls += 1
        call = self._calls
        mux = self.ctx.mux
        mux.defer(lambda: mux.call_later(limit, lambda: self._overdue(call, limit)))
        started = time.perf_counter()
        try:
            result = fn(*args)
        finally:
            self._calls += 1
        elapsed = time.perf_counter() - started
        if elapsed > limit:
            raise calls.over_time(self.peer, limit, elapsed, conn_id=self.id)
        return result

    def _overdue(self, call: int, limit: float) -> None:
        if self._calls == call and not self.closed:
            self._timed_out = calls.over_time(self.peer, limit, conn_id=self.id)
            self.abort(None, reset=True)

    def finish(self, error: BaseException | None, ending: str = "abort") -> None:
        self.closed = True
        if self._timed_out is not None:
            set_reason(self, "handler_timeout")
        set_reason(self, "eof" if ending == "eof" else "shutdown")
        if self.tally is not None:
            self.tally.done = True  # its last count is in: the loop may drop it once collected
        graceful = error is None and not self._aborted
        if graceful and ending != "abort" and not self._write_shut and isinstance(self.sock, ssl.SSLSocket):
            self._send_close_notify()
        if graceful and ending == "linger":
            self._linger()
        try:
            if self._reset:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            self._sock_closed = True
            self.sock.close()
        except OSError:
            pass
        session = getattr(self, "session", None)
        if session is not None:
            try:
                session.on_disconnect(self, error)
            except Exception:
                log.exception("on_disconnect failed for %s", self.peer, extra=conn_fields(self))
        self.ctx.closed_from_any_thread(self)


def _tallied(add, handle, conn, message):
    started = time.perf_counter()
    try:
        return handle(conn, message)
    finally:
        add(time.perf_counter() - started)


def _writable(sock: socket.socket) -> bool:
    poller = select.poll()  # not select(): descriptors past 1024 are common here
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


def _timeval(seconds: float | None) -> bytes:
    """A ``struct timeval`` for SO_RCVTIMEO/SO_SNDTIMEO; zero means no timeout."""
    seconds = seconds or 0.0
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
