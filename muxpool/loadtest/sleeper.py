"""The ``mixed`` workload's slow client: one connection whose every request
makes the handler sleep (``workloads.SLEEP``), beside the generator's fast ones.

It runs on a thread of the comparing process while the generator measures
the other connections, so a report's figures are the fast clients' alone:
what one slow handler does to everybody else's latency and requests/s. It
starts once the generator's first replies are in, i.e. once its connections
are up: on ``loop`` each of those connects would otherwise wait out a sleep
for its greeting, and the run would never begin.
"""

from __future__ import annotations

import socket
import threading

from ..framing import make_framer
from .expect import detect_greeting
from .workloads import SLEEP


class Sleeper:
    """One slow client, a request at a time, from ``start()`` to ``stop()``."""

    def __init__(self, host: str, port: int, framing: str = "raw", timeout: float = 30.0):
        self.address = (host, port)
        self.framing = framing
        self.timeout = timeout  # per reply: a sleep plus however long the server is stalled
        self.answered = 0
        self.error: BaseException | None = None
        self.first_sent = threading.Event()  # its first request is on its way
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="muxpool-bench-sleeper", daemon=True)
        self._sock: socket.socket | None = None

    def start(self) -> None:
        """Connect and begin (once; later calls do nothing)."""
        if self._sock is not None:
            return
        try:
            self._sock = socket.create_connection(self.address, timeout=self.timeout)
        except OSError as exc:
            self.error = exc
            self._sock = socket.socket()  # so stop() has one to close
            return
        self._thread.start()

    @property
    def started(self) -> bool:
        return self.first_sent.is_set()

    def stop(self) -> None:
        self._stop.set()
        if self._sock is None:
            return
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # ends a recv() waiting out a sleep
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(self.timeout)
        self._sock.close()

    def _run(self) -> None:
        sock, framer = self._sock, make_framer(self.framing)
        try:
            detect_greeting(sock, framer if self.framing != "raw" else None, 1.0)
            request = framer.encode(SLEEP)
            while not self._stop.is_set():
                sock.sendall(request)
                self.first_sent.set()
                while not self._stop.is_set() and not framer.feed(self._receive(sock)):
                    pass
                self.answered += 1
        except OSError as exc:
            if not self._stop.is_set():
                self.error = exc

    @staticmethod
    def _receive(sock: socket.socket) -> bytes:
        data = sock.recv(65536)
        if not data:
            raise ConnectionResetError("the server closed the slow client's connection")
        return data
