"""One client connection on the multiplexer: buffers, backpressure, order.

All methods except :meth:`Connection.send` and :meth:`Connection.close` run on
the loop thread; those two may be called from any thread (a handler on a
pool thread) and hop to the loop with ``defer``.

Order: at most one handler call per connection runs at a time; messages that
arrive meanwhile wait in ``backlog`` and run in arrival order, so replies
leave in request order whatever engine runs the handler.

Backpressure: reading pauses while the backlog is long (in messages or in
bytes) or while more than ``write_high_water`` bytes of replies wait for a
slow reader — queued messages then wait too, the inline path's included — and
resumes below a quarter of that, so a client that never reads cannot grow
memory: at most about ``write_high_water`` plus one reply is buffered.

Its deadlines are :mod:`muxpool.clocks`; how it ends (a lingering close, or
an abort) is :mod:`muxpool.closing`.
"""

from __future__ import annotations

import collections
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from . import calls
from .clocks import ConnectionClocks
from .closing import LingeringClose, call_disconnect
from .errors import ConnectionBroken, ConnectionClosed, ProtocolError
from .logs import conn_fields
from .multiplexer import EVENT_READ, EVENT_WRITE, READ_EVENTS, WRITE_EVENTS
from .stats import handler_failed, set_reason
from .tls import TLSSession

if TYPE_CHECKING:
    from .context import ConnectionContext

log = logging.getLogger("muxpool.server")

MAX_BACKLOG = 64  # queued messages per connection before reading pauses
READ_SIZE = 65536
# recv(n) allocates n bytes before it knows how many arrive. Up to ~480 bytes
# that comes from CPython's small-object allocator; 64 KiB is a malloc and a
# shrinking realloc per read (about 5% of a small message's CPU on the loop).
# So a connection reads small until a read comes back full, then large.
SMALL_READ = 512 - 33  # 33: a bytes object's header, on 64-bit CPython


def _call_connect(conn: "Connection", _unused: Any):
    return conn.session.on_connect(conn)


class Connection(ConnectionClocks, LingeringClose):
    """A client connection as a handler sees it: ``send``, ``close``, ``peer``."""

    # What the metrics and the access log read once it closes (stats.CLOSE_REASONS).
    # Slots, not the instance dict: past 30 attributes CPython gives up on an
    # object's shared-key dict, and every self.x on the read and write paths
    # becomes a dict lookup (LOAD_ATTR_WITH_HINT); a slot is one load. On a
    # 50-connection echo, loop ran 14,050 -> 12,700 instructions per message.
    # The bases keep a __dict__: anything else set on a connection still works.
    __slots__ = ("ctx", "mux", "config", "server", "sock", "peer", "id", "stats", "inline", "later",
                 "session", "framer", "encode", "outbuf", "backlog", "backlog_bytes", "busy",
                 "reading", "eof", "closing", "closed", "lingering", "heard", "held", "timing_message",
                 "counted", "events", "last_active", "opened", "write_progress", "idle_timer",
                 "write_timer", "handler_timer", "tls_timer", "linger_timer", "linger_left",
                 "_draining_new", "_running_next", "_close_called", "broken", "tls", "bytes_in",
                 "bytes_out", "messages", "read_size")
    close_reason: str | None = None
    errors = 0

    def __init__(self, ctx: "ConnectionContext", sock: socket.socket, peer: Any, conn_id: int):
        self.ctx = ctx
        self.mux = ctx.mux
        self.config = ctx.config
        self.server = ctx.server  # for handlers (socketserver's name): conn.server.shutdown()
        self.sock = sock
        self.peer = peer
        self.id = conn_id
        self.stats = ctx.stats
        self.bytes_in = self.bytes_out = self.messages = 0
        self.read_size = SMALL_READ  # READ_SIZE for good once a read comes back full (_read_wider)
        self.inline = ctx.inline  # the handler may run from the read itself (loop, auto)
        self.later = ctx.later or ctx.mux.defer  # what send/close do off the loop thread
        self.session = ctx.new_session()
        self.framer = ctx.new_framer()
        self.encode = ctx.encode
        self.outbuf = bytearray()
        self.backlog: collections.deque = collections.deque()
        self.backlog_bytes = 0
        self.busy = False
        self.reading = True   # we want input
        self.eof = False      # the peer sent EOF, or we stopped reading for good
        self.closing = False  # close once the work in hand is done and flushed
        self.closed = False
        self.lingering = False  # our FIN is sent: discarding input until the peer's EOF
        self.heard = False  # a message has arrived (a drain waits for a new client's first)
        self.held: list[bytes] = []  # inline messages waiting for a slow reader to catch up
        self.timing_message = False  # the call in hand is a message's (what the stats count)
        self.counted = ctx.stats.counted  # keep bytes and messages (ServerStats.counted)
        self.events = 0
        self.last_active = self.opened = time.monotonic()
        self.write_progress = 0.0
        self.idle_timer = None
        self.write_timer = None
        self.handler_timer = None
        self.tls_timer = None
        self.linger_timer = None
        self.linger_left = 0
        self._draining_new = False  # drain() is waiting for this new client's first message
        self._running_next = False
        self._close_called = False  # the handler called close(): send() raises from now on
        self.broken: OSError | None = None  # the socket error that ended it (a reset, say)
        context = ctx.ssl_context
        self.tls = TLSSession(context) if context is not None else None

    def start(self) -> None:
        """Accepted (loop thread): watch the socket, start the idle clock, greet the
        client — after its TLS handshake, which must end in time."""
        self.update_interest()
        config = self.config
        if config.idle_timeout:
            self.idle_timer = self.mux.call_later(config.idle_timeout, self._check_idle)
        if self.tls is None:
            self.dispatch(_call_connect, None)
        else:
            self._time_handshake()

    @property
    def handshaken(self) -> bool:
        """No TLS, or its handshake is done (the server times it)."""
        return self.tls is None or self.tls.handshaken

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.peer}>"

    # --- for handlers, from any thread ------------------------------------

    def send(self, message: bytes) -> None:
        """Frame and send ``message``. Raises ``ConnectionBroken`` once the peer
        has reset or vanished, ``ConnectionClosed`` once closed by this side."""
        if self.closed or self._close_called:
            raise_closed(self.peer, self.broken)
        data = self.encode(message)
        mux = self.mux
        if mux.in_loop_thread():
            self.write(data)
        else:
            self.later(lambda: self.write(data))

    def close(self) -> None:
        """Stop reading, flush what was sent, then close. Idempotent."""
        self._close_called = True
        set_reason(self, "closed")
        if self.mux.in_loop_thread():
            self.close_when_done(drop_backlog=True)
        else:
            self.later(lambda: self.close_when_done(drop_backlog=True))

    # --- loop thread -------------------------------------------------------

    def update_interest(self) -> None:
        events = (EVENT_READ if self.reading and not self.eof else 0) | (EVENT_WRITE if self.outbuf else 0)
        if events == self.events or self.closed or self.lingering:
            return
        mux = self.mux
        # Reading only (nearly always): the loop calls read() with no dispatch step.
        callback = self.on_ready if events & EVENT_WRITE else self.read
        if not events:
            mux.unregister(self.sock)
        elif not self.events:
            mux.register(self.sock, events, callback)
        else:
            mux.modify(self.sock, events, callback)
        self.events = events


    def on_ready(self, mask: int) -> None:
        if mask & READ_EVENTS:
            self.read()
        if mask & WRITE_EVENTS and not self.closed:
            self.flush()

    def read(self, mask: int = 0) -> None:
        size = self.read_size
        try:
            data = self.sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.abort(exc)
            return
        n = len(data)
        if n >= SMALL_READ and size == SMALL_READ:  # full: more may be waiting
            data = self._read_wider(data)
            n = len(data)
        if self.tls is not None or not n or self.held:
            self.received(data)
            return
        # The fast path, written out (each call here costs requests/s): plain
        # data, its handler calls run right here (loop, auto) or go to the engine.
        if self.counted:
            self.bytes_in += n
        framer = self.framer
        try:
            messages = framer.feed(data)
        except ProtocolError as exc:
            self._malformed(exc)
            return
        if not messages:
            return  # a partial message: the framer keeps it
        # Idle means "no complete message", not "no byte": a client that
        # trickles one byte a second (slowloris) still goes idle. The time is
        # the poll's that reported these bytes: they had arrived by then.
        self.last_active = self.mux.now
        self.heard = True
        if self.inline and not self.busy:
            if self.counted:  # the server's total sums these (ServerStats.messages_total)
                self.messages += len(messages)
            self.handle_inline(messages)
        else:  # counted as each call ends (_call_done)
            dispatch, on_message = self.dispatch, self.session.on_message
            for message in messages:
                dispatch(on_message, message)
        if framer.pending_error is not None or self._draining_new:
            self._after_messages(True)

    def _read_wider(self, data: bytes) -> bytes:
        """A small read came back full: this client's messages are larger. Take the
        rest now, as one large read would have (raw framing takes a chunk as a
        message), and read large from now on. 64 KiB: below glibc's mmap
        threshold (a 256 KiB recv, asyncio's size, costs an mmap/munmap pair per
        read, 5x slower here); a bytes object straight from recv beats recv_into
        and a copy."""
        self.read_size = READ_SIZE
        try:
            return data + self.sock.recv(READ_SIZE)
        except OSError:  # nothing more yet, or an error the next read meets
            return data

    def received(self, data: bytes) -> None:
        """What :meth:`read` got, on any path: TLS, EOF, a handler running elsewhere."""
        n = len(data)
        if self.counted:
            self.bytes_in += n
        if self.tls is not None:
            data = self.tls_receive(data)
            if data is None:
                return
            if self.tls.peer_closed:
                n = 0  # nothing more will come: EOF, after this plaintext
        framer = self.framer
        try:
            messages = framer.feed(data)
            if n == 0 and data and framer.pending_error is None:
                messages += framer.feed(b"")
        except ProtocolError as exc:
            self._malformed(exc)
            return
        if n == 0:
            self.eof = True
            set_reason(self, "eof" if framer.pending_error is None else "protocol_error")
            self.update_interest()
        if messages:
            self.last_active = self.mux.now  # see read()
            self.heard = True
        if self.inline and not self.busy:
            if self.counted:
                self.messages += len(messages)
            if self.held:
                self.held.extend(messages)  # after those that wait for a slow reader
            else:
                self.handle_inline(messages)
        else:
            for message in messages:
                self.dispatch(self.session.on_message, message)
        if n == 0 and framer.pending_error is None:
            self.maybe_finish()
        else:
            self._after_messages(bool(messages))

    def _malformed(self, exc: ProtocolError) -> None:
        log.warning("closing %s: %s", self.peer, exc, extra=conn_fields(self))
        set_reason(self, "protocol_error")
        self.close_when_done()

    def _after_messages(self, got_messages: bool) -> None:
        """After a read's good messages: close for a framing error that followed
        them, or for a drain that was waiting for this new client's first."""
        if self.framer.pending_error is not None:
            self._malformed(self.framer.pending_error)
        elif self._draining_new and got_messages:
            self._draining_new = False
            self.close_when_done()

    def tls_receive(self, data: bytes) -> bytes | None:
        """Decrypt; ``None`` when there is nothing for the framer yet. The
        greeting waits for the handshake: nothing can be sent before it."""
        tls = self.tls
        was_handshaken = tls.handshaken
        try:
            plaintext, reply = tls.receive(data)
        except ProtocolError as exc:
            log.warning("closing %s: %s", self.peer, exc, extra=conn_fields(self))
            set_reason(self, "protocol_error")
            self.abort(exc)
            return None
        if reply:
            self.write(reply, raw=True)
        if tls.handshaken and not was_handshaken:
            self._tls_ready()
        if not data or tls.peer_closed:
            return plaintext  # EOF: the framer must see it
        return plaintext or None

    def handle_inline(self, messages: list[bytes]) -> None:
        """The ``loop`` engine's fast path: call the handler right here, with
        none of the engine hand-off (no timers are armed: see Server.inline).
        An engine may replace it (``inline_method``: auto's calls can be handed off)."""
        on_message = self.session.on_message  # with metrics on, it times itself (timed_sessions)
        waiting = iter(messages)
        for message in waiting:
            try:
                reply = on_message(self, message)
            except (Exception, SystemExit) as exc:  # sys.exit() in a handler ends that call, not the server
                self.call_failed(exc)
                return
            if reply is not None and not self.closed:
                try:  # written out, not calls.frame_reply: a call per message costs requests/s
                    data = self.encode(reply)
                except (ProtocolError, TypeError) as exc:
                    self.reply_refused(exc)
                    return
                self.write(data)
            if self.closing or self.closed:
                return  # the handler closed it: the rest of this read is dropped
            if self.outbuf and len(self.outbuf) > self.config.write_high_water:  # empty once a reply has gone
                # A slow reader: the rest waits for flush(), as on the other engines,
                # so one read of tiny requests cannot turn into gigabytes of replies.
                self.held = list(waiting)
                return

    def call_failed(self, exc: BaseException) -> None:
        """A handler call on the inline path raised: logged, counted, and the
        connection closes, dropping what waits behind it."""
        calls.handler_failed(self.peer, exc, conn_id=self.id)
        handler_failed(self)
        self.close_when_done(drop_backlog=True)

    def reply_refused(self, exc: Exception) -> None:
        """The framer refused a handler's reply (a ``str``, say, or too large):
        logged, counted as a failed call, and the connection closes."""
        calls.unframeable(self.peer, exc, conn_id=self.id)
        handler_failed(self)
        self.close_when_done(drop_backlog=True)

    def dispatch(self, fn, arg) -> None:
        """Run ``fn(conn, arg)`` through the engine, after any earlier call."""
        if self.busy:
            self.backlog.append((fn, arg))
            if isinstance(arg, bytes):
                self.backlog_bytes += len(arg)
            if self.reading and (len(self.backlog) >= MAX_BACKLOG
                                 or self.backlog_bytes > self.config.write_high_water):
                self.reading = False
                self.update_interest()
            return
        self.busy = True
        self._start_call(fn, arg)

    def _start_call(self, fn, arg) -> None:
        limit = self.config.handler_timeout
        if limit:
            self.handler_timer = self.mux.call_later(limit, self._handler_overdue)
        # The stats count messages: a greeting or a goodbye is not one (a line's p50
        # over an interval of disconnects would read 0.01 ms).
        self.timing_message = fn is not _call_connect and fn is not call_disconnect
        self.ctx.engine.run(self, fn, arg, self._call_done)

    def _call_done(self, ok: bool, value: Any, elapsed: float) -> None:
        """The engine's report that the current call ended (loop thread)."""
        ctx = self.ctx
        if self.timing_message and self.counted:
            ctx.stats.record(elapsed)
            self.messages += 1
        if self.handler_timer is not None:
            self.handler_timer.cancel()
            self.handler_timer = None
            limit = self.config.handler_timeout
            if elapsed > limit and not self.closed:
                set_reason(self, "handler_timeout")
                self.abort(calls.over_time(self.peer, limit, elapsed, conn_id=self.id), reset=True)
        self.busy = False
        if ok:
            if value is not None and not self.closed:
                try:  # written out, not calls.frame_reply: a call per message costs requests/s
                    data = self.encode(value)
                except (ProtocolError, TypeError) as exc:
                    self.reply_refused(exc)
                else:
                    self.write(data)
        else:
            calls.handler_failed(self.peer, value, conn_id=self.id)
            handler_failed(self)
            self.close_when_done(drop_backlog=True)
        self.after_call()
        if ctx.draining:
            ctx.check_drained()

    def after_call(self) -> None:
        """A call has ended: start the next queued one, or resume reading and finish."""
        if self.backlog:
            self.run_next()
        else:
            if self.closing or self.eof:
                self.maybe_finish()  # which does nothing unless one of them is set
            elif not self.reading:
                self.resume_if_drained()

    def _tls_ready(self) -> None:
        """The TLS handshake finished: now it is a client like any other."""
        if self.tls_timer is not None:
            self.tls_timer.cancel()
            self.tls_timer = None
        self.dispatch(_call_connect, None)

    def run_next(self) -> None:
        """Start the queued calls in turn — unless replies are waiting for a slow
        reader: then the queue waits too (flush() resumes it), so
        write_high_water bounds what this connection buffers. A loop, not a
        recursion: an engine that runs the call at once reports it done from
        inside run_handler, and thousands may be queued."""
        if self._running_next:
            return  # the loop below, further up this stack, takes the next one
        self._running_next = True
        backlog, high_water = self.backlog, self.config.write_high_water
        try:
            while backlog and not self.busy and (len(self.outbuf) <= high_water or self.closed):
                fn, arg = backlog.popleft()
                if isinstance(arg, bytes):
                    self.backlog_bytes -= len(arg)
                self.busy = True
                self._start_call(fn, arg)
        finally:
            self._running_next = False

    def write(self, data: bytes, raw: bool = False) -> None:
        """Send ``data`` (encrypted first under TLS, unless ``raw``); what the
        socket will not take waits in ``outbuf``."""
        if self.closed or self.lingering:
            return  # our write side is shut: nothing more can go
        if self.tls is not None and not raw:
            data = self.tls.send(data)
        if not self.outbuf:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.abort(exc)
                return
            if self.counted:
                self.bytes_out += sent
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
            self.write_progress = time.monotonic()
            self._watch_writes()
        self.outbuf += data
        if len(self.outbuf) > self.config.write_high_water and self.reading:
            self.reading = False
        self.update_interest()

    def flush(self) -> None:
        try:
            sent = self.sock.send(self.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.abort(exc)
            return
        del self.outbuf[:sent]
        if self.counted:
            self.bytes_out += sent
        self.write_progress = time.monotonic()
        if len(self.outbuf) <= self.config.write_high_water // 4:
            if self.held:
                held, self.held = self.held, []
                self.handle_inline(held)
            if self.backlog:
                self.run_next()
            if self.closed:
                return
        if not self.outbuf:
            self.update_interest()
            self.maybe_finish()
        if not self.reading and not self.closing and not self.eof:
            self.resume_if_drained()

    def resume_if_drained(self) -> None:
        high_water = self.config.write_high_water
        if (not self.held and len(self.outbuf) <= high_water // 4
                and len(self.backlog) < MAX_BACKLOG // 2 and self.backlog_bytes <= high_water // 4):
            self.reading = True
            self.update_interest()

def raise_closed(peer: Any, broken: OSError | None) -> None:
    """What ``send`` raises on a connection that is over: broken by the peer, or closed by us."""
    if broken is not None:
        raise ConnectionBroken(peer, str(broken)) from broken
    raise ConnectionClosed(f"connection {peer} is closed")


