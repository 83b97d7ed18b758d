"""What a server is told: :class:`ServerConfig` (every engine's options) and
the listening socket it asks for.

Each option is documented once, in its field's metadata (:func:`option`):
the help text, the kind of value, the smallest one, how to fix a bad one and
the engines it applies to. Validation (``__post_init__``, below) and the
CLI's ``serve`` flags are both generated from that, so they cannot drift
apart. A config is frozen: derive another with :func:`dataclasses.replace`,
which validates the result again.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import stat
from dataclasses import dataclass, field, fields, replace
from typing import Any

from . import systemd
from .errors import ConfigError
from .framing import DEFAULT_MAX_MESSAGE_SIZE, FRAMERS

log = logging.getLogger("muxpool.config")

_MAX_ENCODED = 0xFFFFFFFF  # the most a 4-byte length prefix can carry

__all__ = ["ENGINE_NAMES", "WORKER_ENGINES", "ServerConfig", "flag", "make_listener", "option"]

# engines/__init__.py's name table, which sits above this module; a test keeps them equal.
ENGINE_NAMES = ("loop", "threadpool", "threaded", "gevent", "auto", "prefork")
WORKER_ENGINES = ("loop", "threadpool", "threaded")  # what a prefork worker can run

_NEVER = "give seconds, or 0 for never"
_BYTES = "give a size in bytes, 1 or more"


def option(default: Any, help: str, kind: str, fix: str = "", *, least: float | None = None,
           most: float | None = None, above: float | None = None, optional: bool = False,
           choices: tuple = (), engines: tuple | None = None, inapplicable: str = "error",
           exists: bool = False, cli: str | None = None) -> Any:
    """A :class:`ServerConfig` field and everything said about it.

    ``kind`` is count, seconds, choice, path, string or switch; ``least`` /
    ``most`` bound it (``above``: strictly); ``optional``: ``None`` is
    allowed (for optional seconds the CLI reads 0 as ``None``, "never");
    ``engines``: the only engines it does anything on, and ``inapplicable``
    whether a value set for another one is an ``"error"`` or a ``"warning"``;
    ``exists``: a path that must be a file; ``cli``: a flag name other than
    ``--`` + the name with dashes.
    """
    return field(default=default, metadata={
        "help": help, "kind": kind, "fix": fix, "least": least, "most": most, "above": above,
        "optional": optional or default is None, "choices": tuple(choices), "engines": engines,
        "inapplicable": inapplicable, "exists": exists, "cli": cli})


def flag(name: str) -> str:
    """The ``serve`` flag of option ``name``: ``max_connections`` → ``--max-connections``."""
    return _FLAGS[name]


# Slots: a handler call reads options off it (handler_timeout, say), and with
# over 30 fields an instance dict makes each read a dict lookup.
@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Options shared by every engine; ``muxpool serve``'s flags are generated from them.

    Construction refuses a value that cannot work with :class:`~muxpool.ConfigError`
    (a ``ValueError`` naming the option), and an option set for an engine that
    would ignore it with an error or, where the rest still works, a logged warning.
    """

    host: str = option("127.0.0.1", "address to listen on (default 127.0.0.1; '::' for IPv6)",
                       "string", "give one, e.g. 127.0.0.1, 0.0.0.0 or ::")
    port: int = option(8088, "TCP port (default 8088; 0 picks a free one)", "count",
                       "give a port from 0 to 65535; 0 picks a free one", least=0, most=65535)
    unix_path: str | None = option(None, "listen on this Unix socket path instead of TCP", "path",
                                   "give a path, or leave the option out", cli="--unix")
    fd: int | None = option(None, "serve on this inherited listening socket (a descriptor number) "
                            "instead of binding one; without it, a socket systemd passes "
                            "(LISTEN_FDS) is used", "count", "give a descriptor number, 0 or more",
                            least=0)
    dualstack: bool = option(False, "with an IPv6 host, accept IPv4 too", "switch")
    engine: str = option("auto", "where handlers run (default auto: inline like loop, on a thread "
                         "once a call blocks; threadpool with --pool)", "choice", choices=ENGINE_NAMES)
    framing: str = option("raw", "raw (each received chunk is a message), line, or length "
                          "(4-byte prefix)", "choice", choices=tuple(FRAMERS))
    workers: int | None = option(None, "handler threads for the threadpool and auto engines "
                                 "(default 32)", "count",
                                 "give 1 or more handler threads, or leave it out for 32",
                                 least=1, engines=("threadpool", "auto"))
    handoff_after: float = option(0.002, "auto: a handler call running this many seconds off the "
                                  "CPU is blocked: another thread takes over the loop (default "
                                  "0.002)", "seconds", "give seconds, more than 0, e.g. 0.002",
                                  least=0, above=0, engines=("auto",))
    processes: int | None = option(None, "worker processes for the prefork engine (default: the "
                                   "number of cores)", "count", "give 1 or more worker processes, "
                                   "or leave it out for one per core", least=1, engines=("prefork",))
    worker_engine: str = option("threadpool", "engine inside each prefork worker: loop, threadpool "
                                "or threaded", "choice", choices=WORKER_ENGINES, engines=("prefork",))
    max_connections: int = option(10_000, "connections served at once (per prefork worker); more are "
                                  "accepted and closed at once (see --busy-message), never left "
                                  "waiting", "count", "give 1 or more", least=1)
    idle_timeout: float | None = option(300.0, "close a connection that completes no message for "
                                        "this many seconds (0: never)", "seconds", _NEVER,
                                        least=0, optional=True)
    max_message_size: int = option(DEFAULT_MAX_MESSAGE_SIZE, "largest message in bytes; larger "
                                   "closes the connection", "count", _BYTES, least=1)
    write_high_water: int = option(1024 * 1024, "unsent reply bytes above which a connection's "
                                   "reading pauses", "count", _BYTES, least=1)
    write_timeout: float | None = option(30.0, "close a connection whose replies make no progress "
                                         "this long", "seconds", _NEVER, least=0, optional=True)
    handler_timeout: float | None = option(None, "close a connection whose handler runs longer than "
                                           "this", "seconds", _NEVER, least=0)
    drain_timeout: float = option(10.0, "seconds shutdown waits for in-flight work", "seconds",
                                  "give seconds, 0 or more", least=0)
    # Deep enough that a burst of thousands of connects is not dropped by the kernel
    # before the accept loop can serve or close it (a client whose handshake the
    # kernel completed by SYN cookie, then dropped, waits with no one to tell it);
    # the kernel caps it at net.core.somaxconn.
    backlog: int = option(4096, "listen() backlog", "count",
                          "give 0 or more; the kernel caps it at net.core.somaxconn", least=0)
    reuse_port: bool = option(False, "set SO_REUSEPORT on the listening socket (TCP only); prefork: "
                              "one such socket per worker, kept open by the supervisor, so the "
                              "kernel spreads connections evenly over the workers", "switch")
    stats_interval: float | None = option(None, "log connections, messages/s, handler p50/p99 every "
                                          "N seconds", "seconds", "give seconds between stats "
                                          "lines, or 0 for none", least=0)
    certfile: str | None = option(None, "serve TLS with this certificate chain (PEM)", "path",
                                  "give the path of a PEM file", exists=True)
    keyfile: str | None = option(None, "the private key for --certfile (if not in the same file)",
                                 "path", "give the path of a PEM file", exists=True)
    tls_handshake_timeout: float = option(10.0, "close a TLS client that has not finished its "
                                          "handshake in this many seconds", "seconds",
                                          "give seconds, more than 0", least=0, above=0)
    loop_stall_warning: float | None = option(0.5, "log where the event loop is when a handler or "
                                              "callback keeps it from polling this many seconds "
                                              "(0: never; default 0.5)", "seconds", _NEVER,
                                              least=0, optional=True)
    # A warning, not an error: the server works as asked without the watchdog,
    # and one config is often shared by a prefork deployment and a
    # threadpool run on a laptop. Saying so is what matters.
    max_requests: int | None = option(None, "prefork: replace a worker once it has handled this many "
                                      "messages (socketserver handlers: connections); the new one "
                                      "starts before the old one drains, so nothing is refused "
                                      "(default: never)", "count", "give 1 or more, or leave it out "
                                      "for never", least=1, engines=("prefork",))
    max_requests_jitter: int = option(0, "prefork: add up to this many to each worker's "
                                      "--max-requests, at random, so workers are not all replaced "
                                      "at once", "count", "give 0 or more", least=0,
                                      engines=("prefork",))
    max_worker_memory: int | None = option(None, "prefork: replace a worker whose resident memory "
                                           "passes this many bytes, as --max-requests does "
                                           "(default: never)", "count", "give a size in bytes, 1 "
                                           "or more, or leave it out for never", least=1,
                                           engines=("prefork",))
    worker_timeout: float | None = option(30.0, "prefork: kill and replace a worker whose event loop "
                                          "has not run for this many seconds (0: never; default "
                                          "30)", "seconds", _NEVER, least=0, optional=True,
                                          engines=("prefork",), inapplicable="warning")
    linger_timeout: float = option(1.0, "after a graceful close's FIN, read and discard what the "
                                   "client still sends for at most this many seconds, so its "
                                   "replies are not reset (default 1)", "seconds",
                                   "give seconds, 0 or more", least=0)
    metrics_port: int | None = option(None, "serve Prometheus metrics on http://METRICS_HOST:PORT/"
                                      "metrics (0 picks a free port; needs muxpool[metrics]; "
                                      "default: none)", "count", "give a port from 0 to 65535, or "
                                      "leave it out for no metrics", least=0, most=65535)
    metrics_host: str = option("127.0.0.1", "address --metrics-port listens on (default "
                               "127.0.0.1)", "string", "give one, e.g. 127.0.0.1 or ::1")
    access_log: bool = option(False, "log one line per closed connection: peer, duration, "
                              "messages, bytes, close reason (logger muxpool.access)", "switch")
    busy_message: str | None = option(None, "at --max-connections, send this (framed) to a client "
                                      "before closing it (default: close it with no message)",
                                      "string", "give some text, or leave the option out")

    def __post_init__(self) -> None:
        """Refuse, naming the option, a value that would fail later or be
        silently replaced (``workers=0`` once meant 32) or ignored."""
        _check(self, fields(self))

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


_FLAGS = {f.name: f.metadata.get("cli") or "--" + f.name.replace("_", "-") for f in fields(ServerConfig)}


# --- validation, from the metadata --------------------------------------------


def _check(config: Any, fields: tuple) -> None:
    """Every field's own value, then combinations, then engine applicability."""
    for f in fields:
        value = getattr(config, f.name)
        if f.metadata.get("kind") not in _KINDS:  # a bug, not a user's: declare it with option()
            raise TypeError(f"option {f.name} has no kind in its metadata")
        if value is None and f.metadata["optional"]:
            continue
        _KINDS[f.metadata["kind"]](f.name, value, f.metadata)
    _check_combinations(config)
    for f in fields:
        _check_engine(config, f)


def _count(name: str, value: Any, meta) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(name, value, "is not a whole number", meta["fix"])
    _check_range(name, value, meta)


def _seconds(name: str, value: Any, meta) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(name, value, "is not a number of seconds", meta["fix"])
    _check_range(name, value, meta)


def _check_range(name: str, value: float, meta) -> None:
    least, most, above = meta["least"], meta["most"], meta["above"]
    if ((least is not None and value < least) or (most is not None and value > most)
            or (above is not None and value <= above)):
        raise ConfigError(name, value, "is out of range", meta["fix"])


def _choice(name: str, value: Any, meta) -> None:
    if not isinstance(value, str) or value not in meta["choices"]:
        raise ConfigError(name, value, "is not one of the choices", "choose " + ", ".join(meta["choices"]))


def _switch(name: str, value: Any, meta) -> None:
    if not isinstance(value, bool):
        raise ConfigError(name, value, "is not a bool", "give True or False")


def _string(name: str, value: Any, meta) -> None:
    if not isinstance(value, str):
        raise ConfigError(name, value, "is not text", meta["fix"])
    if not value and name != "host":  # an empty host is judged with unix_path, below
        raise ConfigError(name, value, "is empty", meta["fix"])


def _path(name: str, value: Any, meta) -> None:
    _string(name, value, meta)
    if meta["exists"] and not os.path.isfile(value):
        problem = "is a folder" if os.path.isdir(value) else "does not exist"
        raise ConfigError(name, value, problem, meta["fix"])


_KINDS = {"count": _count, "seconds": _seconds, "choice": _choice, "switch": _switch,
          "string": _string, "path": _path}


def _check_combinations(config: Any) -> None:
    if not (config.host or config.unix_path):
        raise ConfigError("host", config.host, "is not an address", "give one, e.g. 127.0.0.1, 0.0.0.0 or ::")
    if config.fd is not None and config.unix_path:
        raise ConfigError("fd", config.fd, "is an inherited socket, so unix_path would bind nothing",
                          "give fd or unix_path, not both")
    if config.keyfile and not config.certfile:
        raise ConfigError("keyfile", config.keyfile, "needs a certfile", "give certfile too, or neither")
    if config.framing == "length" and config.max_message_size > _MAX_ENCODED:
        raise ConfigError("max_message_size", config.max_message_size,
                          "is more than a 4-byte length prefix can carry",
                          f"give at most {_MAX_ENCODED} with framing length")
    if config.reuse_port and config.unix_path:
        raise ConfigError("reuse_port", config.reuse_port, "is for TCP: a Unix socket's path has "
                          "one listener", "leave reuse_port out with unix_path")
    if config.metrics_host != "127.0.0.1" and config.metrics_port is None:
        raise ConfigError("metrics_host", config.metrics_host, "needs metrics_port",
                          "give metrics_port too, or leave metrics_host out")
    if config.dualstack and ":" not in config.host:
        raise ConfigError("dualstack", config.dualstack, f"needs an IPv6 host, not {config.host!r}",
                          "listen on host '::' to accept IPv4 and IPv6")


def _check_engine(config: Any, f) -> None:
    """An option that only some engines read, set for another: a flag that would
    silently do nothing. A prefork server's handlers run on its worker_engine,
    so an option for that engine applies to prefork too."""
    engines, value = f.metadata["engines"], getattr(config, f.name)
    # The default, or "off" (None, 0), asks nothing of any engine.
    if engines is None or value == f.default or value is None or value == 0:
        return
    if config.engine in engines or (config.engine == "prefork" and config.worker_engine in engines):
        return
    prefork = config.engine == "prefork"
    where = f"prefork's {config.worker_engine} workers" if prefork else config.engine
    problem = f"applies to the {' or '.join(engines)} engine, not {where}"
    fix = f"use {'worker_engine' if prefork else 'engine'} {engines[0]}, or leave {f.name} out"
    if f.metadata["inapplicable"] == "error":
        raise ConfigError(f.name, value, problem, fix)
    log.warning("%s=%r %s, so it does nothing (%s)", f.name, value, problem, fix,
                extra={"config_warning": (f.name, value, problem + ", so it does nothing", fix)})


def resolve_config(config: ServerConfig | None, overrides: dict) -> ServerConfig:
    """A server's options: ``config`` (or the defaults) with keyword ``overrides``,
    validated as a whole (an override may not fit the rest); a TypeError names
    unknown options."""
    unknown = set(overrides) - set(ServerConfig.names())
    if unknown:
        raise TypeError(f"unknown server option(s): {', '.join(sorted(unknown))}")
    if config is not None and not isinstance(config, ServerConfig):
        raise TypeError(f"config= takes a ServerConfig, not {type(config).__name__}")
    if config is None:
        return ServerConfig(**overrides)
    return replace(config, **overrides) if overrides else config


def make_listener(config: ServerConfig) -> socket.socket:
    """The listening socket the config asks for: the inherited ``fd``, else the
    first one systemd passed this process (socket activation), else one bound
    here (TCP v4/v6, dual-stack, or Unix). An inherited socket that is not a
    listening stream socket is a :class:`ConfigError` (:mod:`muxpool.systemd`).

    A Unix path is taken over only from a dead server's socket: a path that is
    not a socket, or a socket some server still accepts on, is an ``OSError``
    that says so (gunicorn refuses the same)."""
    if config.fd is not None:
        sock = systemd.socket_from_fd(config.fd)
    elif activated := systemd.listen_fds():
        # A server has one listener: the first is the unit's first ListenStream=
        # (systemd passes them in the unit's order). The others are closed here
        # only; systemd keeps its own copies.
        sock = activated[0]
        for extra in activated[1:]:
            extra.close()
    elif config.unix_path:
        _remove_stale_socket(config.unix_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(config.unix_path)
        sock.listen(config.backlog)
    else:
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        dualstack = config.dualstack and family == socket.AF_INET6 and socket.has_dualstack_ipv6()
        sock = socket.create_server((config.host, config.port), family=family,
                                    backlog=config.backlog, reuse_port=config.reuse_port,
                                    dualstack_ipv6=dualstack)
    sock.setblocking(False)
    return sock


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket; not replacing it", path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # a socket nobody listens on: left by a server that died
            return
        except OSError:
            pass
    raise OSError(errno.EADDRINUSE, f"another server is listening on {path}", path)


def socket_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the socket file at ``path``, so a server unlinks only its own."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def unlink_own_socket(path: str, identity: tuple[int, int] | None) -> None:
    """Remove ``path`` if it is still the socket we bound (a newer server's is left alone)."""
    if identity is not None and socket_identity(path) == identity:
        try:
            os.unlink(path)
        except OSError:
            pass
