"""Handlers for comparisons: ``echo``, ``io:MS``, ``cpu:MS`` and ``mixed``.

Each is the lesson's echo service (greeting, ``response: <message>``) with
work added per message: ``io:MS`` blocks for MS milliseconds the way a
database call does (``time.sleep``: it releases the GIL, and gevent's
monkey-patching makes it cooperative); ``cpu:MS`` computes for MS
milliseconds in pure Python (it holds the GIL). ``mixed`` (``mixed:MS``,
default 1000) echoes, except that a request of exactly ``SLEEP`` blocks MS
milliseconds first: the generator's clients echo while one more connection
(``loadtest.sleeper``) sends only those, so one blocking handler shares the
server with many quick ones.
"""

from __future__ import annotations

import time

from ..handlers import EchoService

SLEEP = b"sleep"  # the mixed workload's slow request (the generator's bodies start with digits)


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


class MixedWorkload(EchoService):
    def __init__(self, seconds: float = 1.0):
        self.seconds = seconds

    def on_message(self, conn, message: bytes) -> bytes:
        if message == SLEEP:
            time.sleep(self.seconds)
        return self.prefix + message


def make_workload(name: str) -> EchoService:
    """``"echo"``, ``"io:5"``, ``"cpu:1"`` or ``"mixed"`` (``"mixed:1000"``;
    milliseconds) → a shared handler instance."""
    kind, _, ms = name.partition(":")
    if kind == "echo" and not ms:
        return EchoService()
    if kind == "mixed" and not ms:
        return MixedWorkload()
    try:
        seconds = float(ms) / 1000
    except ValueError:
        seconds = -1.0
    workloads = {"io": IOWorkload, "cpu": CPUWorkload, "mixed": MixedWorkload}
    if kind in workloads and seconds >= 0:
        return workloads[kind](seconds)
    raise ValueError(f"unknown workload {name!r}: use echo, io:MS, cpu:MS or mixed[:MS]")
