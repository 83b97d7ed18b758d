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
import inspect
import os
import sys
import types
from typing import Any, Callable

from .errors import AppError, HandlerError

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


# The two forms' argument orders differ, and stay so: the function form has
# always been handle(message, conn) and the class form on_message(conn, message)
# (socketserver's and asyncio's protocols put the connection first). Every
# refusal below spells out both, so the mix-up is fixed in one reading.
_FORMS = ("give a function handle(message, conn) or a class with "
          "on_message(self, conn, message)")


def resolve_handler(app: Any) -> Callable[[], Session]:
    """Return a zero-argument factory of per-connection :class:`Session` objects.

    Raises :class:`HandlerError` (a ``TypeError``) for anything that is not a
    handler form, or whose callbacks cannot take the arguments they will get.
    """
    if isinstance(app, type):
        if not hasattr(app, "on_message"):
            raise HandlerError(f"handler class {app.__qualname__} has no on_message method "
                               f"(define on_message(self, conn, message))")
        _check_methods(app, app.__qualname__, unbound=True)
        return lambda: _session_of(app())
    if hasattr(app, "on_message"):
        _check_methods(app, type(app).__qualname__, unbound=False)
        shared = _session_of(app)
        return lambda: shared
    if callable(app) and not isinstance(app, types.ModuleType):
        _check_call(app, 2, _name(app), "(message, conn)",
                    "the function form takes the message first; a class's "
                    "on_message(self, conn, message) takes the connection first")
        shared = Session(_no_connect, FunctionHandler(app).on_message, _no_disconnect)
        return lambda: shared
    kind = "a module" if isinstance(app, types.ModuleType) else f"a {type(app).__name__}"
    raise HandlerError(f"{_name(app)} is {kind}, not a handler ({_FORMS})")


_METHODS = (("on_connect", "(self, conn)"), ("on_message", "(self, conn, message)"),
            ("on_disconnect", "(self, conn, error)"))


def _check_methods(obj: Any, owner: str, unbound: bool) -> None:
    for method, expected in _METHODS:
        if not hasattr(obj, method):
            continue
        fn = getattr(obj, method)
        wanted = expected.count(",") + 1
        # A plain function on a class also takes self; a static or class method does not.
        takes_self = unbound and not isinstance(inspect.getattr_static(obj, method),
                                                (staticmethod, classmethod))
        _check_call(fn, wanted if takes_self else wanted - 1, f"{owner}.{method}", expected,
                    "a class's methods take the connection first; the function form is "
                    "handle(message, conn)")


def _check_call(fn: Callable, count: int, name: str, expected: str, note: str) -> None:
    short = name.rpartition(".")[2]
    if inspect.iscoroutinefunction(fn):
        raise HandlerError(f"handler {name} is async def, and muxpool calls handlers as plain "
                           f"functions: it would never be awaited (define def {short}{expected}; "
                           "a handler may block on the threadpool, threaded or gevent engine)")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: it may well take them
    try:
        signature.bind(*range(count))
    except TypeError:
        called = expected.replace("self, ", "")
        raise HandlerError(f"handler {name}{signature} cannot be called as {short}{called} "
                           f"(define it as def {short}{expected}: {note})") from None


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)


def load_app(spec: str, app_dir: str | None = None) -> Any:
    """Import ``"module:attr"`` (``attr`` may be dotted), as gunicorn does: from
    ``app_dir`` (default: the working directory), put first on ``sys.path``.

    Raises :class:`AppError` when the module or attribute is not there; an
    exception raised by the module's own code propagates."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AppError(f"app {spec!r} is not module:attr "
                       "(name the module and the handler in it, e.g. mymodule:handle)")
    folder = os.path.abspath(app_dir if app_dir is not None else os.getcwd())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise  # the module is there; something it imports is not
        raise AppError(f"no module named {exc.name!r} in {folder} or on the Python path (run muxpool "
                       "from the folder that holds it, or give --app-dir FOLDER)") from None
    for depth, part in enumerate(attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            owner = module_name + "".join("." + p for p in attr.split(".")[:depth])
            raise AppError(f"{owner} has no attribute {part!r} (check the name after ':'; "
                           f"{_FORMS})") from None
    return obj


class EchoService:
    """The lesson's select() server: greet, then answer ``response: <message>``."""

    greeting = b"Hello client-side"
    prefix = b"response: "

    def on_connect(self, conn) -> bytes:
        return self.greeting

    def on_message(self, conn, message: bytes) -> bytes:
        return self.prefix + message
