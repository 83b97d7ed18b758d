"""Handler apps for the server tests, and for ``muxpool serve server_apps:...``.

Stdlib and muxpool's public handler forms only. Apps that carry test state
(events, counters, records) are classes the test instantiates, so nothing
here is module-level mutable state: each test gets fresh objects.
"""

from __future__ import annotations

import random
import threading
import time

GREETING = b"Hello client-side"
PREFIX = b"response: "


# --- function handlers -------------------------------------------------------


def shout(message, conn):
    """A function handler (no greeting): the message upper-cased."""
    return b"shout: " + bytes(message).upper()


def size_of(message, conn):
    """Reply with the message's length, so a maximum-size message gets a short reply."""
    return b"size %d" % len(message)


# --- class handlers ------------------------------------------------------------


class Greeter:
    """The echo service's behaviour; subclasses change one thing."""

    def on_connect(self, conn):
        return GREETING

    def on_message(self, conn, message):
        return PREFIX + message


class JitterEcho(Greeter):
    """Echo after sleeping a random 0-2 ms, so out-of-order replies would show."""

    def on_message(self, conn, message):
        time.sleep(random.random() * 0.002)
        return PREFIX + message


class ExplodeOn(Greeter):
    """Raise for the message ``b"boom"``; echo anything else."""

    def on_message(self, conn, message):
        if message == b"boom":
            raise RuntimeError("boom requested by the test")
        return PREFIX + message


class SizeGreeter(Greeter):
    """Greet, then reply with each message's size."""

    def on_message(self, conn, message):
        return b"size %d" % len(message)


class SlowEcho(Greeter):
    """A shared instance: counts messages as they arrive, then sleeps ``delay``.

    ``all_arrived`` is set once ``expected`` messages have reached a handler.
    """

    def __init__(self, delay: float, expected: int):
        self.delay = delay
        self.expected = expected
        self.arrived = 0
        self.all_arrived = threading.Event()
        self._lock = threading.Lock()

    def on_message(self, conn, message):
        with self._lock:
            self.arrived += 1
            if self.arrived >= self.expected:
                self.all_arrived.set()
        time.sleep(self.delay)
        return PREFIX + message


class ShutdownOn(Greeter):
    """A shared instance: ``b"stop"`` shuts the server down from inside the handler.

    ``returned`` is set when the ``shutdown`` call has returned, and
    ``elapsed`` says how long the call took.
    """

    def __init__(self, wait: bool):
        self.wait = wait
        self.returned = threading.Event()
        self.elapsed: float | None = None

    def on_message(self, conn, message):
        if message != b"stop":
            return PREFIX + message
        started = time.monotonic()
        conn.server.shutdown(wait=self.wait)
        self.elapsed = time.monotonic() - started
        self.returned.set()
        return b"bye"


class BlockOn(Greeter):
    """A shared instance: ``b"slow"`` blocks for up to ``delay`` s (until ``release``)."""

    def __init__(self, delay: float):
        self.delay = delay
        self.started = threading.Event()
        self.release = threading.Event()

    def on_message(self, conn, message):
        if message == b"slow":
            self.started.set()
            self.release.wait(self.delay)
        return PREFIX + message


class Counter:
    """Per-connection state: the class form makes one instance per connection."""

    def __init__(self):
        self.count = 0

    def on_connect(self, conn):
        return b"counter ready"

    def on_message(self, conn, message):
        self.count += 1
        return b"%d" % self.count


class TwoReplies(Greeter):
    """``conn.send`` from inside the handler, then a returned reply: two messages, in order."""

    def on_message(self, conn, message):
        conn.send(b"first: " + message)
        return b"second: " + message


def recording_class(records: list, lock: threading.Lock):
    """A handler class whose every instance appends its disconnects to ``records``.

    Each record is ``(instance, peer, error)``.
    """

    class Recording(Greeter):
        def on_disconnect(self, conn, error):
            with lock:
                records.append((self, conn.peer, error))

    return Recording
