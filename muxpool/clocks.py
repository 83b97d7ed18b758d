"""A connection's deadlines on the loop: the TLS handshake (both kinds of
connection), idle, write and handler (:class:`ConnectionClocks`, a part of
:class:`~muxpool.connection.Connection`). Each is a timer on the multiplexer
that decides, when it fires, whether the connection has earned its close."""

from __future__ import annotations

import logging
import time

from . import calls
from .logs import conn_fields
from .stats import set_reason

log = logging.getLogger("muxpool.server")


class HandshakeClock:
    """The TLS handshake deadline both kinds of connection keep: the whole
    handshake is timed from the accept, not each read, so a client that
    trickles its hello cannot hold a slot."""

    tls_timer = None

    def _time_handshake(self) -> None:
        self.tls_timer = self.ctx.mux.call_later(self.config.tls_handshake_timeout, self._handshake_overdue)

    def _handshake_overdue(self) -> None:
        self.tls_timer = None
        if not self.closed and not self.handshaken:
            log.warning("closing %s: no TLS handshake within %s s (tls_handshake_timeout)",
                        self.peer, self.config.tls_handshake_timeout, extra=conn_fields(self))
            set_reason(self, "tls_timeout")
            self.abort(None, reset=True)


class ConnectionClocks(HandshakeClock):
    """Idle, write and handler deadlines of a connection on the loop (loop thread)."""

    def _handler_overdue(self) -> None:
        self.handler_timer = None
        if not self.closed:
            set_reason(self, "handler_timeout")
            self.abort(calls.over_time(self.peer, self.config.handler_timeout, conn_id=self.id), reset=True)

    def _check_idle(self) -> None:
        if self.closed:
            return
        limit = self.config.idle_timeout
        quiet = time.monotonic() - self.last_active
        if quiet >= limit and not self.busy and not self.backlog and not self.held:
            log.info("closing %s: idle for %.1f s (idle_timeout)", self.peer, quiet, extra=conn_fields(self))
            set_reason(self, "idle")
            self.abort(None)
        else:
            self.idle_timer = self.mux.call_later(max(0.05, limit - quiet), self._check_idle)

    def _watch_writes(self) -> None:
        """Start the write_timeout clock: replies are waiting for the client."""
        limit = self.config.write_timeout
        if limit and self.write_timer is None:
            self.write_timer = self.mux.call_later(limit, self._check_write)

    def _check_write(self) -> None:
        self.write_timer = None
        if self.closed or not self.outbuf:
            return
        limit = self.config.write_timeout
        stalled = time.monotonic() - self.write_progress
        if stalled >= limit:
            log.warning("closing %s: no reply bytes accepted for %.1f s (write_timeout), "
                        "%d bytes unsent", self.peer, stalled, len(self.outbuf),
                        extra=conn_fields(self))
            set_reason(self, "write_timeout")
            self.abort(None, reset=True)
        else:
            self.write_timer = self.mux.call_later(limit - stalled, self._check_write)

    def _cancel_timers(self) -> None:
        for timer in (self.idle_timer, self.write_timer, self.handler_timer, self.tls_timer,
                      self.linger_timer):
            if timer is not None:
                timer.cancel()
