"""What a server is told: :class:`ServerConfig` (every engine's options; the
CLI's ``serve`` flags are generated from its fields) and the listening socket
it asks for."""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass, fields

from .framing import DEFAULT_MAX_MESSAGE_SIZE


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
    backlog: int = 1024
    reuse_port: bool = False
    stats_interval: float | None = None
    certfile: str | None = None
    keyfile: str | None = None
    tls_handshake_timeout: float = 10.0
    loop_stall_warning: float | None = 0.5
    worker_timeout: float | None = 30.0
    linger_timeout: float = 1.0
    busy_message: str | None = None

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
