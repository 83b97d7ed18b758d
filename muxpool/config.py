"""What a server is told: :class:`ServerConfig` (every engine's options; the
CLI's ``serve`` flags are generated from its fields) and the listening socket
it asks for."""

from __future__ import annotations

import os
import socket
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

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def make_listener(config: ServerConfig) -> socket.socket:
    """Bind the listening socket the config asks for (TCP v4/v6, dual-stack, or Unix)."""
    if config.unix_path:
        if os.path.exists(config.unix_path):
            os.unlink(config.unix_path)
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
