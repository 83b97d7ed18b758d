"""What a server is told: :class:`ServerConfig` (every engine's options; the
CLI's ``serve`` flags are generated from its fields) and the listening socket
it asks for."""

from __future__ import annotations

import errno
import math
import os
import socket
import stat
from dataclasses import dataclass, fields

from .errors import ConfigError
from .framing import DEFAULT_MAX_MESSAGE_SIZE, FRAMERS

_MAX_ENCODED = 0xFFFFFFFF  # the most a 4-byte length prefix can carry
WORKER_ENGINES = ("loop", "threadpool", "threaded")


@dataclass
class ServerConfig:
    """Options shared by every engine; CLI flags mirror these names."""

    host: str = "127.0.0.1"
    port: int = 8088
    unix_path: str | None = None
    dualstack: bool = False
    engine: str = "threadpool"
    framing: str = "raw"
    workers: int | None = None
    processes: int | None = None
    worker_engine: str = "threadpool"
    max_connections: int = 10_000
    idle_timeout: float | None = 300.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    write_high_water: int = 1024 * 1024
    write_timeout: float | None = 30.0
    handler_timeout: float | None = None
    drain_timeout: float = 10.0
    # Deep enough that a burst of thousands of connects is not dropped by the kernel
    # before the accept loop can serve or close it (a client whose handshake the
    # kernel completed by SYN cookie, then dropped, waits with no one to tell it);
    # the kernel caps it at net.core.somaxconn.
    backlog: int = 4096
    reuse_port: bool = False
    stats_interval: float | None = None
    certfile: str | None = None
    keyfile: str | None = None
    tls_handshake_timeout: float = 10.0
    loop_stall_warning: float | None = 0.5
    worker_timeout: float | None = 30.0
    linger_timeout: float = 1.0
    busy_message: str | None = None

    def __post_init__(self) -> None:
        """Refuse, naming the option, a value that would fail later or be
        silently replaced (``workers=0`` once meant 32)."""
        for name, (least, fix) in _COUNTS.items():
            _check_count(name, getattr(self, name), least, fix)
        for name, (optional, fix) in _SECONDS.items():
            _check_seconds(name, getattr(self, name), optional, fix)
        # engine: the engines' name table checks it (config sits below engines)
        for name, choices in (("framing", FRAMERS), ("worker_engine", WORKER_ENGINES)):
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(name, value, "is not one of the choices", "choose " + ", ".join(choices))
        for name in ("dualstack", "reuse_port"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, getattr(self, name), "is not a bool", "give True or False")
        self._check_strings()
        self._check_combinations()

    def _check_strings(self) -> None:
        if not isinstance(self.host, str) or not (self.host or self.unix_path):
            raise ConfigError("host", self.host, "is not an address", "give one, e.g. 127.0.0.1, 0.0.0.0 or ::")
        for name in ("unix_path", "certfile", "keyfile", "busy_message"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(name, value, "is empty", "give some text, or leave the option out")
        for name in ("certfile", "keyfile"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                problem = "is a folder" if os.path.isdir(path) else "does not exist"
                raise ConfigError(name, path, problem, "give the path of a PEM file")

    def _check_combinations(self) -> None:
        if self.keyfile and not self.certfile:
            raise ConfigError("keyfile", self.keyfile, "needs a certfile", "give certfile too, or neither")
        if self.framing == "length" and self.max_message_size > _MAX_ENCODED:
            raise ConfigError("max_message_size", self.max_message_size,
                              "is more than a 4-byte length prefix can carry",
                              f"give at most {_MAX_ENCODED} with framing length")
        if self.dualstack and ":" not in self.host:
            raise ConfigError("dualstack", self.dualstack, f"needs an IPv6 host, not {self.host!r}",
                              "listen on host '::' to accept IPv4 and IPv6")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def make_listener(config: ServerConfig) -> socket.socket:
    """Bind the listening socket the config asks for (TCP v4/v6, dual-stack, or Unix).

    A Unix path is taken over only from a dead server's socket: a path that is
    not a socket, or a socket some server still accepts on, is an ``OSError``
    that says so (gunicorn refuses the same)."""
    if config.unix_path:
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


# option: (smallest value, how to fix a bad one); None is allowed where the default is None.
_COUNTS = {
    "port": (0, "give a port from 0 to 65535; 0 picks a free one"),
    "workers": (1, "give 1 or more handler threads, or leave it out for 32"),
    "processes": (1, "give 1 or more worker processes, or leave it out for one per core"),
    "max_connections": (1, "give 1 or more"),
    "max_message_size": (1, "give a size in bytes, 1 or more"),
    "write_high_water": (1, "give a size in bytes, 1 or more"),
    "backlog": (0, "give 0 or more; the kernel caps it at net.core.somaxconn"),
}
# option: (may it be None, how to fix a bad value)
_SECONDS = {
    "idle_timeout": (True, "give seconds, or 0 for never"),
    "write_timeout": (True, "give seconds, or 0 for never"),
    "handler_timeout": (True, "give seconds, or 0 for never"),
    "stats_interval": (True, "give seconds between stats lines, or 0 for none"),
    "loop_stall_warning": (True, "give seconds, or 0 for never"),
    "worker_timeout": (True, "give seconds, or 0 for never"),
    "drain_timeout": (False, "give seconds, 0 or more"),
    "linger_timeout": (False, "give seconds, 0 or more"),
    "tls_handshake_timeout": (False, "give seconds, more than 0"),
}


def _check_count(name: str, value, least: int, fix: str) -> None:
    if value is None and name in ("workers", "processes"):
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(name, value, "is not a whole number", fix)
    if value < least or (name == "port" and value > 65535):
        raise ConfigError(name, value, "is out of range", fix)


def _check_seconds(name: str, value, optional: bool, fix: str) -> None:
    if value is None and optional:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(name, value, "is not a number of seconds", fix)
    if value < 0 or (value == 0 and name == "tls_handshake_timeout"):
        raise ConfigError(name, value, "is out of range", fix)
