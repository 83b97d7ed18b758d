"""Handler forms, and the lesson's echo service.

A handler is one of:

* a function ``handle(message: bytes, conn) -> bytes | None``;
* a class with any of ``on_connect(conn) -> greeting | None``,
  ``on_message(conn, message) -> reply | None`` and
  ``on_disconnect(conn, error)``: one instance is made per connection, so
  ``self`` can hold that connection's state;
* an instance of such a class: shared by every connection.

:func:`resolve_handler` turns any of these into a factory of
:class:`Session` objects, which engines call without asking what form the
user chose.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

Reply = bytes | bytearray | memoryview | None


def _no_connect(conn) -> Reply:
    return None


def _no_disconnect(conn, error) -> None:
    return None


class Session:
    """The three callbacks of one connection's handler, resolved once."""

    __slots__ = ("on_connect", "on_message", "on_disconnect")

    def __init__(self, on_connect, on_message, on_disconnect):
        self.on_connect = on_connect
        self.on_message = on_message
        self.on_disconnect = on_disconnect


def _session_of(obj: Any) -> Session:
    return Session(getattr(obj, "on_connect", _no_connect), obj.on_message,
                   getattr(obj, "on_disconnect", _no_disconnect))


class FunctionHandler:
    """The function form as an object: picklable when the function is, so a
    pool in another process can run it (the threadpool engine's ``pool=``)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable):
        self.fn = fn

    def on_message(self, conn, message: bytes) -> Reply:
        return self.fn(message, conn)


def resolve_handler(app: Any) -> Callable[[], Session]:
    """Return a zero-argument factory of per-connection :class:`Session` objects.

    Raises ``TypeError`` for anything that is not a handler form.
    """
    if isinstance(app, type):
        if not hasattr(app, "on_message"):
            raise TypeError(f"handler class {app.__qualname__} has no on_message(conn, message) method")
        return lambda: _session_of(app())
    if hasattr(app, "on_message"):
        shared = _session_of(app)
        return lambda: shared
    if callable(app):
        shared = Session(_no_connect, FunctionHandler(app).on_message, _no_disconnect)
        return lambda: shared
    raise TypeError(f"{app!r} is not a handler: give a function handle(message, conn) "
                    "or a class with on_message(conn, message)")


def load_app(spec: str) -> Any:
    """Import ``"module:attr"`` (``attr`` may be dotted)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"app must look like 'module:attr', got {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class EchoService:
    """The lesson's select() server: greet, then answer ``response: <message>``."""

    greeting = b"Hello client-side"
    prefix = b"response: "

    def on_connect(self, conn) -> bytes:
        return self.greeting

    def on_message(self, conn, message: bytes) -> bytes:
        return self.prefix + message
