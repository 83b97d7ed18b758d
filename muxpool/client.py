"""A framing-aware client, and the lesson's interactive prompt.

``Client`` speaks the same framings as the server (``raw``, ``line``,
``length``); with ``raw`` framing a message is whatever one ``recv`` returns,
exactly as the lesson's client reads it.
"""

from __future__ import annotations

import socket
import ssl
import sys
from typing import Any, TextIO

from .errors import ConnectionBroken
from .framing import DEFAULT_MAX_MESSAGE_SIZE, make_framer

RECV_SIZE = 65536


class Client:
    """``with Client("127.0.0.1", 8088) as c: c.request(b"hi")``.

    ``greeting=True`` (the built-in service greets) reads one message on
    connect into ``.greeting``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8088, *, framing: str = "raw",
                 unix_path: str | None = None, timeout: float | None = 10.0,
                 greeting: bool = True, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 tls: bool = False, cafile: str | None = None, ssl_context: ssl.SSLContext | None = None):
        self.address: Any = unix_path or (host, port)
        self.framing = framing
        self.timeout = timeout
        self.expect_greeting = greeting
        self.greeting: bytes | None = None
        self._max = max_message_size
        self._framer = make_framer(framing, max_message_size)
        self._sock: socket.socket | None = None
        self._ready: list[bytes] = []
        if ssl_context is None and (tls or cafile):
            ssl_context = ssl.create_default_context(cafile=cafile)
        self.ssl_context = ssl_context
        self.host = host

    def connect(self) -> "Client":
        if isinstance(self.address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            sock.connect(self.address)
        else:
            sock = socket.create_connection(self.address, timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
        self._sock = sock
        self._framer = make_framer(self.framing, self._max)
        if self.expect_greeting:
            self.greeting = self.receive()
        return self

    def send(self, message: bytes) -> None:
        self._require().sendall(self._framer.encode(message))

    def receive(self) -> bytes:
        """The next message; ``ConnectionBroken`` if the server closes first."""
        sock = self._require()
        while not self._ready:
            data = sock.recv(RECV_SIZE)
            self._ready.extend(self._framer.feed(data))
            if not data and not self._ready:
                raise ConnectionBroken(self.address, "closed by the server")
        return self._ready.pop(0)

    def request(self, message: bytes) -> bytes:
        self.send(message)
        return self.receive()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _require(self) -> socket.socket:
        if self._sock is None:
            raise ConnectionBroken(self.address, "not connected")
        return self._sock

    def __enter__(self) -> "Client":
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def interactive(client: Client, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """The lesson's prompt: print the greeting, then ``>>> `` until ``q``."""
    prompt = ">>> " if stdin.isatty() else ""
    with client:
        if client.greeting is not None:
            print(client.greeting.decode("utf-8", "replace"), file=stdout, flush=True)
        while True:
            print(prompt, end="", file=stdout, flush=True)
            line = stdin.readline()
            if not line:
                break
            text = line.rstrip("\r\n")
            if text == "q":
                break
            if not text:
                continue
            try:
                reply = client.request(text.encode("utf-8"))
            except ConnectionBroken as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(reply.decode("utf-8", "replace"), file=stdout, flush=True)
    return 0
