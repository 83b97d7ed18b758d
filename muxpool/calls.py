"""Calling a handler: the rules every engine and both kinds of connection share.

One place for what used to be written once per path: call it, catch what it
raises (``SystemExit`` too: ``sys.exit()`` in a handler ends that call, not
the server), time it; frame its reply or say why it cannot be; decide and log
a call over ``handler_timeout``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from .errors import HandlerTimeout, ProtocolError

log = logging.getLogger("muxpool.server")

# Set on a thread while it runs handler calls (a pool thread, a connection's
# thread): Server.shutdown() called from a handler must not wait for itself.
handler_thread = threading.local()


def call_handler(fn: Callable[..., Any], *args: Any) -> tuple[bool, Any, float]:
    """``(True, value, seconds)`` or ``(False, exception, seconds)``."""
    started = time.perf_counter()
    try:
        value = fn(*args)
    except (Exception, SystemExit) as exc:
        return False, exc, time.perf_counter() - started
    return True, value, time.perf_counter() - started


def frame_reply(encode: Callable[[bytes], bytes], reply: Any, peer: Any,
                conn_id: int | None = None) -> bytes | None:
    """The framed reply, or ``None`` (logged) when the framing cannot carry it:
    the connection then closes, as for a failed handler."""
    try:
        return encode(reply)
    except (ProtocolError, TypeError) as exc:
        unframeable(peer, exc, conn_id=conn_id)
        return None


# Each record carries the connection as fields too (``--log-format json``).
def unframeable(peer: Any, error: Exception, conn_id: int | None = None) -> None:
    log.error("handler reply to %s cannot be framed: %s", peer, error,
              extra={"peer": peer, "conn_id": conn_id})


def handler_failed(peer: Any, error: BaseException, conn_id: int | None = None) -> None:
    log.error("handler failed for %s", peer, exc_info=error, extra={"peer": peer, "conn_id": conn_id})


def over_time(peer: Any, limit: float, elapsed: float | None = None,
              conn_id: int | None = None) -> HandlerTimeout:
    """Log a call over ``handler_timeout`` (still running, or returned late) and
    return the error its connection closes with (``on_disconnect`` gets it)."""
    extra = {"peer": peer, "conn_id": conn_id}
    if elapsed is None:
        log.error("handler for %s exceeded handler_timeout=%s s; closing it", peer, limit, extra=extra)
    else:
        log.error("handler for %s took %.3f s, over handler_timeout=%s s; closing it",
                  peer, elapsed, limit, extra=extra)
    return HandlerTimeout(limit)
