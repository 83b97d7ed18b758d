"""What a handler sees as ``conn``, on every engine.

``peer`` is where the client is (``(host, port)``, or the Unix socket path),
``id`` a number unique within the server. ``send(message)`` frames and sends
a message: it raises :class:`~muxpool.ConnectionClosed` once this side has
closed the connection (``close()``, a drain, a timeout) and
:class:`~muxpool.ConnectionBroken` once the peer has reset it or vanished (the
socket error is its ``__cause__``). ``close()`` reads no more, sends what was
sent before it, then closes; it is idempotent and safe from any thread.
A handler's ``on_disconnect(conn, error)`` gets ``None`` for a clean end, the
socket error for a broken connection, or :class:`~muxpool.HandlerTimeout`
when a call ran past ``handler_timeout``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Conn(Protocol):
    peer: Any
    id: int

    def send(self, message: bytes) -> None: ...

    def close(self) -> None: ...
