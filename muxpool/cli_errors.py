"""The command's mistakes as one line each: ``<what> (<how to fix>)`` and an exit code.

:func:`explain` turns what the API raises (``ConfigError``, ``AppError``,
``HandlerError``, ``MissingDependency``, a bind's ``OSError``) into that
line; anything it does not know is a bug, and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import re
import socket
import ssl
import traceback
from typing import Any

USAGE = 2  # usage or configuration: nothing ran
RUNTIME = 1  # it ran, and failed


class UserError(Exception):
    """A mistake the user can fix; ``code`` is the exit status."""

    def __init__(self, what: str, fix: str, code: int = USAGE):
        self.what, self.fix, self.code = what, fix, code
        super().__init__(f"{what} ({fix})")


def explain(exc: BaseException, args: argparse.Namespace | None) -> tuple[str, int] | None:
    """``(line, exit code)`` for a user's mistake; ``None`` for a bug."""
    from .config import ConfigError
    from .errors import MissingDependency
    from .handlers import AppError, HandlerError

    if isinstance(exc, UserError):
        return str(exc), exc.code
    if isinstance(exc, ConfigError):
        return config_line(exc.option, exc.value, exc.problem, exc.fix), USAGE
    if isinstance(exc, (AppError, HandlerError)):
        return str(exc), USAGE
    if isinstance(exc, MissingDependency):
        need = str(exc).partition(": pip install")[0]
        return f"{need}, which is not installed (pip install 'muxpool[{exc.extra}]')", USAGE
    if isinstance(exc, ssl.SSLError):
        reason = re.sub(r" \(_ssl\.c:\d+\)$", "", str(exc))  # where in CPython's C: no help here
        return (f"cannot load the TLS certificate: {reason} (give --certfile a PEM "
                "certificate chain, and --keyfile its private key if it is not in that file)"), USAGE
    if isinstance(exc, OSError):
        return _os_error(exc, args)
    if isinstance(exc, ValueError):  # the API's own refusals (pool=, a socketserver handler on loop)
        return str(exc), USAGE
    return None


def config_line(option: str, value: Any, problem: str, fix: str) -> str:
    """A config error or warning as the user typed it: ``--workers 0 is out of range (...)``."""
    from .config import ServerConfig, flag

    if option not in ServerConfig.names():  # the environment's, not a flag: LISTEN_FDS=2 ...
        return f"{option}={value} {problem} ({fix})"
    if isinstance(value, str) and (not value or " " in value):
        value = repr(value)  # as it would be typed: --busy-message ''
    given = flag(option) if isinstance(value, bool) else f"{flag(option)} {value}"
    return f"{given} {problem} ({fix})"


def _os_error(exc: OSError, args: argparse.Namespace | None) -> tuple[str, int]:
    unix = getattr(args, "unix_path", None)
    where = unix or _address(getattr(args, "host", "127.0.0.1"), getattr(args, "port", 8088))
    if isinstance(exc, socket.gaierror) or (exc.errno or 0) < 0:  # getaddrinfo's EAI_* are negative
        return (f"cannot resolve --host {getattr(args, 'host', '?')}: {_strerror(exc)} "
                "(give an IP address, or a name this machine resolves)"), USAGE
    # The kernel's own words where they exist: scripts (and this repo's tests) look for them.
    fixes = {
        errno.EADDRINUSE: "stop the server using it, or pick another "
                          + ("--unix path" if unix else "--port; --port 0 picks a free one"),
        errno.EACCES: "pick a path you may write" if unix else
                      "ports below 1024 need privileges: pick --port 1024 or above",
        errno.EADDRNOTAVAIL: "give --host 127.0.0.1, 0.0.0.0, :: or an address of this machine",
        errno.EEXIST: "remove it, or pick another --unix path",
        errno.ENOENT: "create its folder, or pick another --unix path",
    }
    problems = {errno.EEXIST: "the path exists and is not a socket",
                errno.ENOENT: "its folder does not exist"}
    if exc.errno in fixes and getattr(args, "command", None) == "serve":
        problem = problems.get(exc.errno) or _strerror(exc)
        return f"cannot listen on {where}: {problem} ({fixes[exc.errno]})", RUNTIME
    return f"{_strerror(exc)} (--debug shows where it happened)", RUNTIME


def _strerror(exc: OSError) -> str:
    # socket.create_server appends "(while attempting to bind on address ...)": we say where.
    return (exc.strerror or str(exc)).partition(" (while attempting")[0]


def _address(host: str, port: Any) -> str:
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def import_failure(spec: str, exc: BaseException) -> UserError:
    """The app's own module raised while being imported: say what and where."""
    frames = traceback.extract_tb(exc.__traceback__)
    at = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames and not isinstance(exc, SyntaxError) else ""
    return UserError(f"importing {spec.partition(':')[0]} raised {type(exc).__name__}: {exc}{at}",
                     "fix the module, or install what it imports; --debug shows the traceback",
                     code=RUNTIME)


def _number(kind, test, wanted: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
        if value != value or not test(value):  # value != value: NaN
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
        return value
    return parse


def positive(kind):
    """An argparse type: a number above 0."""
    return _number(kind, lambda v: 0 < v < float("inf"), "a number above 0" if kind is float
                   else "a whole number, 1 or more")


def nonnegative(kind):
    """An argparse type: 0 or more."""
    return _number(kind, lambda v: 0 <= v < float("inf"), "a number, 0 or more" if kind is float
                   else "a whole number, 0 or more")


whole = nonnegative(int)
