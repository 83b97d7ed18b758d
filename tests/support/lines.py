"""Line-protocol reading over a plain socket, for the drain and reload tests."""

from __future__ import annotations

import socket

GREETING = b"Hello client-side\n"  # the CLI's echo service, line framing


GREETING = b"Hello client-side\n"


class Lines:
    """Line reading over a socket; ``readline()`` returns None at EOF (a reset raises)."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, b""

    def readline(self) -> bytes | None:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(262144)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line


def first_line(sock: socket.socket) -> bytes:
    """The first line the server sends on ``sock``, newline included: a greeting, a
    busy message; what came before EOF (b"" for none) when the server closed it."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    return data
