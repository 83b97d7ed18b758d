"""The listening sockets of a prefork server: one shared by every worker, or one per
worker slot (``reuse_port``).

Shared (the default), the workers race to accept from one queue: the kernel
wakes whichever waits, and a busy machine shares connections unevenly among
them. With ``reuse_port`` the supervisor binds one ``SO_REUSEPORT`` socket per
*lane* (a worker slot: ``processes`` of them) and the kernel spreads new
connections over the lanes by a hash of their addresses — evenly, whatever the
workers are doing. Each worker accepts from its lane's socket only.

The supervisor keeps every lane's socket open for the server's whole life, so a
lane never leaves the kernel's reuse-port group: when its worker exits (a crash,
a reload, recycling), the connections queued on it wait for the lane's next
worker instead of being reset, as they would be if the last copy of the socket
closed. That needs no ``net.ipv4.tcp_migrate_req`` (Linux 5.14+, off by
default), which moves the queue of a closing socket to a sibling: here no lane
socket closes before the server stops.
"""

from __future__ import annotations

import socket

from ..config import ServerConfig, make_listener
from ..errors import ConfigError


def bind_lanes(config: ServerConfig, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one TCP address, each with ``SO_REUSEPORT``.

    The first is the one :func:`~muxpool.config.make_listener` gives (bound here,
    or inherited: ``fd``, systemd); the others are bound to its address. An
    inherited socket without ``SO_REUSEPORT`` cannot share its address: a
    :class:`~muxpool.ConfigError` naming ``reuse_port`` says so."""
    first = make_listener(config)
    lanes = [first]
    try:
        if first.family not in (socket.AF_INET, socket.AF_INET6):
            raise ConfigError("reuse_port", True, "is for TCP, and the inherited socket is not",
                              "leave reuse_port out")
        if not first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
            raise ConfigError("reuse_port", True, "needs every listening socket bound with "
                              "SO_REUSEPORT, and the inherited one was not",
                              "set ReusePort=yes in the .socket unit, or leave reuse_port out")
        address = first.getsockname()[:2]
        dualstack = (first.family == socket.AF_INET6
                     and not first.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
        for _ in range(count - 1):
            lane = socket.create_server(address, family=first.family, backlog=config.backlog,
                                        reuse_port=True, dualstack_ipv6=dualstack)
            lane.setblocking(False)
            lanes.append(lane)
    except BaseException:
        for lane in lanes:
            lane.close()
        raise
    return lanes


__all__ = ["bind_lanes"]
