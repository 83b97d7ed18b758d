"""Handlers for comparisons: ``echo``, ``io:MS`` and ``cpu:MS``.

Each is the lesson's echo service (greeting, ``response: <message>``) with
work added per message: ``io:MS`` blocks for MS milliseconds the way a
database call does (``time.sleep``: it releases the GIL, and gevent's
monkey-patching makes it cooperative); ``cpu:MS`` computes for MS
milliseconds in pure Python (it holds the GIL).
"""

from __future__ import annotations

import time

from ..handlers import EchoService


class IOWorkload(EchoService):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_message(self, conn, message: bytes) -> bytes:
        time.sleep(self.seconds)
        return self.prefix + message


class CPUWorkload(EchoService):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_message(self, conn, message: bytes) -> bytes:
        deadline = time.perf_counter() + self.seconds
        x = 0
        while time.perf_counter() < deadline:  # pure-Python work, as long as asked
            for i in range(200):
                x += i * i
        return self.prefix + message


def make_workload(name: str) -> EchoService:
    """``"echo"``, ``"io:5"`` or ``"cpu:1"`` (milliseconds) → a shared handler instance."""
    kind, _, ms = name.partition(":")
    if kind == "echo" and not ms:
        return EchoService()
    try:
        seconds = float(ms) / 1000
    except ValueError:
        seconds = -1.0
    if kind in ("io", "cpu") and seconds >= 0:
        return (IOWorkload if kind == "io" else CPUWorkload)(seconds)
    raise ValueError(f"unknown workload {name!r}: use echo, io:MS or cpu:MS")
