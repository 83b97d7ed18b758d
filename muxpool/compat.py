"""Run ``socketserver.BaseRequestHandler`` subclasses unchanged.

A socketserver handler owns its connection for its whole life: it reads and
writes a blocking socket (``self.request``, or ``rfile``/``wfile`` for a
``StreamRequestHandler``). So it runs on an engine that may block, with the
real socket handed over: a thread per connection (``threaded``), a pool
thread per connection (``threadpool``: at most ``workers`` at once, the rest
wait their turn), or a greenlet (``gevent``). ``self.server`` is the muxpool
``Server``, which also answers ``server_address`` and ``socket`` as
socketserver's does; ``setup()``, ``handle()`` and ``finish()`` run as in the
standard library. Framing, ``max_message_size`` and ``handler_timeout`` do not
apply: the handler reads the bytes itself.
"""

from __future__ import annotations

import logging
import socket
import socketserver
from typing import Any

from .stream import StreamConnection

log = logging.getLogger("muxpool.server")


def is_request_handler(app: Any) -> bool:
    return isinstance(app, type) and issubclass(app, socketserver.BaseRequestHandler)


class RequestHandlerConnection(StreamConnection):
    """One socketserver handler instance on its own connection."""

    def prepare_socket(self) -> None:
        self.sock.setblocking(True)
        self.start_tls()
        self.sock.settimeout(self.config.idle_timeout)

    def run(self) -> str:
        # BaseRequestHandler.__init__ runs setup(), handle() and finish().
        self.ctx.app(self.sock, self.peer, self.server)
        return "eof"  # the handler has read what it wanted; it decides how its protocol ends

    def close_when_done(self, drop_backlog: bool = False) -> None:
        """The handler does its own reads: shutting the read side is the one way
        to end its blocked ``recv`` (with EOF, as a client closing would)."""
        if self.closing or self.closed:
            return
        self.closing = True
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RD)
        except OSError:
            pass

    drain = close_when_done
