"""How a connection on the loop ends (:class:`LingeringClose`, a part of
:class:`~muxpool.connection.Connection`).

A graceful close (drain, ``close()``, a protocol error after the good
messages, a failed handler) is a lingering close, as nginx's
``lingering_close``: flush the replies, ``shutdown(SHUT_WR)``, then read and
discard what the client still sends until its EOF or ``linger_timeout``
(bounded in bytes too), then close. Closing a socket with unread input makes
the kernel send RST, and an RST destroys the replies still on their way.
Aborts (a write timeout, a TLS handshake timeout, a hard stop) reset at once.
"""

from __future__ import annotations

import logging
import socket
import struct
from typing import Any

from .errors import MuxpoolError
from .logs import conn_fields
from .multiplexer import EVENT_READ
from .stats import set_reason

log = logging.getLogger("muxpool.server")

LINGER_MAX_BYTES = 8 << 20  # a client still sending this much after our FIN is reset
_DISCARD_SIZE = 65536
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST and frees the buffers


def call_disconnect(conn: Any, error: BaseException | None):
    conn.session.on_disconnect(conn, error)


class LingeringClose:
    """Closing, gracefully or at once (loop thread, but :meth:`shutdown_socket`)."""

    def close_when_done(self, drop_backlog: bool = False) -> None:
        """Graceful close: read no more; answer the messages already received
        (unless ``drop_backlog``), flush, then close."""
        if self.closed:
            return
        self.closing = True
        self.reading = False
        self._draining_new = False
        if drop_backlog:
            self.backlog.clear()
            self.backlog_bytes = 0
            self.held = []
        self.update_interest()
        self.maybe_finish()

    def drain(self) -> None:
        """The server drains: answer what has arrived, then close. A client that
        has sent nothing yet — accepted a moment ago, its first request on the
        way — has its first message answered if it comes within linger_timeout."""
        if self.closing or self.closed:
            return
        set_reason(self, "drain")
        if self.heard or self.eof:
            self.close_when_done()
            return
        self._draining_new = True
        self.linger_timer = self.mux.call_later(self.ctx.linger_time(), self._new_client_waited)

    def _new_client_waited(self) -> None:
        self.linger_timer = None
        if self._draining_new:
            self.close_when_done()

    def maybe_finish(self) -> None:
        if self.closed or self.busy or self.backlog or self.outbuf or self.held or self.lingering:
            return
        if self.closing or self.eof:
            if self.tls is not None:
                self.send_close_notify()
            if self.eof:
                self.abort(None)  # the peer's EOF came: nothing unread can follow it
            else:
                self.linger()

    def linger(self) -> None:
        """Send our FIN, then discard what the client still sends until its EOF
        (or linger_timeout, or LINGER_MAX_BYTES), so closing cannot reset the
        connection and destroy replies the client has not read yet."""
        if self.linger_timer is not None:
            self.linger_timer.cancel()
        delay = self.ctx.linger_time()
        try:
            if delay <= 0:
                raise TimeoutError
            self.sock.shutdown(socket.SHUT_WR)
        except (OSError, TimeoutError):  # the peer is gone, or the drain is over
            self.abort(None)
            return
        self.lingering = True
        self.linger_left = LINGER_MAX_BYTES
        mux = self.mux
        self.linger_timer = mux.call_later(delay, self._linger_over)
        if self.events:
            mux.modify(self.sock, EVENT_READ, self._discard)
        else:
            mux.register(self.sock, EVENT_READ, self._discard)
        self.events = EVENT_READ

    def _discard(self, mask: int) -> None:
        try:
            data = self.sock.recv(_DISCARD_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort(None)
            return
        if not data:
            self.abort(None)  # the client's EOF: a clean close
            return
        self.linger_left -= len(data)
        if self.linger_left <= 0:
            log.info("closing %s: still sending after our close (%d bytes)", self.peer,
                     LINGER_MAX_BYTES, extra=conn_fields(self))
            self.abort(None, reset=True)

    def _linger_over(self) -> None:
        self.linger_timer = None
        if not self.closed:
            discard_ready(self.sock)  # unread input would turn the close into a reset
            self.abort(None)

    def send_close_notify(self) -> None:
        """Best effort: a client waiting for the end of the TLS session
        (``SSLSocket.unwrap()``) gets it; a few dozen bytes, never worth waiting for."""
        try:
            self.sock.send(self.tls.close())
        except OSError:
            pass

    def shutdown_socket(self) -> None:
        """From any thread: end the connection at the socket, both ways (the drain
        deadline, while a handler blocks the loop; the loop cleans up when it runs)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def abort(self, error: BaseException | None, reset: bool = False) -> None:
        """Close the socket now; pending output is dropped. ``error`` is why;
        ``reset``: send RST at once (the kernel would otherwise keep trying to
        deliver what a client that stopped reading never takes)."""
        if self.closed:
            return
        self.closed = True
        if isinstance(error, OSError) and not isinstance(error, MuxpoolError):
            self.broken = error  # the socket's: the peer broke it (a HandlerTimeout is ours)
        set_reason(self, "reset" if self.broken is not None else "shutdown")
        self.backlog.clear()
        self.backlog_bytes = 0
        self.held = []
        self.outbuf.clear()
        if self.events:
            self.mux.unregister(self.sock)
            self.events = 0
        try:
            if reset:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            self.sock.close()
        except OSError:
            pass
        self._cancel_timers()
        self.ctx.closed(self)
        # on_disconnect runs after the call in progress, in the same order.
        self.dispatch(call_disconnect, error)


def discard_ready(sock: socket.socket, limit: int = 16) -> None:
    """Read and drop what is already waiting (at most ``limit`` reads), without blocking.
    Below any TLS layer (``socket.socket.recv``): an SSLSocket refuses recv flags,
    and what is dropped here is never decrypted anyway."""
    for _ in range(limit):
        try:
            if not socket.socket.recv(sock, _DISCARD_SIZE, socket.MSG_DONTWAIT):
                return
        except OSError:
            return
