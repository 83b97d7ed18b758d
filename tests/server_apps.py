"""Handler apps for the server tests, and for ``muxpool serve server_apps:...``.

Stdlib and muxpool's public handler forms only. Apps that carry test state
(events, counters, records) are classes the test instantiates, so nothing
here is module-level mutable state: each test gets fresh objects.

The state such an app shares with the test is process-shared where it can be
(:func:`shared_event`, :func:`shared_value`, a file for records): under the
``prefork`` engine the handlers run in forked worker processes, each with its
own copy of the app, so a ``threading.Event`` set there is never seen by the
test. Create the app *before* the server starts, so the workers inherit it.
"""

from __future__ import annotations

import copyreg
import itertools
import json
import multiprocessing
import os
import random
import sys
import threading
import time

GREETING = b"Hello client-side"
PREFIX = b"response: "


# --- state shared with the test, across processes ---------------------------------


def _gevent_patched() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("threading")


# A prefork server started from a test (a process with threads) gets its workers from
# the fork server, which takes only semaphores made in its own context; forked workers
# inherit them just as well.
_FORK_SERVER = multiprocessing.get_context("forkserver")


def shared_event():
    """An Event the test can wait on while a forked worker sets it.

    A ``multiprocessing.Event`` (semaphores in shared memory, handed to prefork
    workers); a ``threading.Event`` in a gevent-patched process, where blocking on
    a semaphore would freeze the hub (and no engine there forks).
    """
    return threading.Event() if _gevent_patched() else _FORK_SERVER.Event()


class _LocalValue:
    def __init__(self, value):
        self.value = value
        self._lock = threading.Lock()

    def get_lock(self):
        return self._lock


def shared_value(typecode: str, value):
    """A ``multiprocessing.Value`` (``.value``, ``.get_lock()``); local under gevent."""
    return _LocalValue(value) if _gevent_patched() else _FORK_SERVER.Value(typecode, value)


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

    ``all_arrived`` is set once ``expected`` messages have reached a handler,
    counted over every worker process.
    """

    def __init__(self, delay: float, expected: int):
        self.delay = delay
        self.expected = expected
        self._arrived = shared_value("i", 0)
        self.all_arrived = shared_event()

    @property
    def arrived(self) -> int:
        return self._arrived.value

    def on_message(self, conn, message):
        with self._arrived.get_lock():
            self._arrived.value += 1
            if self._arrived.value >= self.expected:
                self.all_arrived.set()
        time.sleep(self.delay)
        return PREFIX + message


class Sleepy(Greeter):
    """Sleep ``delay`` seconds per message (work in flight), then echo.

    ``muxpool serve server_apps:Sleepy`` makes one instance per connection
    with the default delay, 50 ms; ``slow_message`` makes it sleep 5 s instead.
    When the environment variable ``SLEEPY_RECORD`` names a file, each message
    is appended to it (one line) as its handler starts, so a test can tell
    which requests the server took in, from any process.
    """

    slow_message = b"sleep 5"

    def __init__(self, delay: float = 0.05):
        self.delay = delay
        self.record = os.environ.get("SLEEPY_RECORD")

    def on_message(self, conn, message):
        if self.record:
            fd = os.open(self.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, bytes(message) + b"\n")
            finally:
                os.close(fd)
        time.sleep(5.0 if message == self.slow_message else self.delay)
        return PREFIX + message


class PidGreeter(Greeter):
    """Greet with ``pid <n>``, the serving process, so a client knows its prefork worker."""

    def on_connect(self, conn):
        return b"pid %d" % os.getpid()


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
    """A shared instance: ``b"slow"`` blocks for up to ``delay`` s (until ``release``).

    ``started`` and ``release`` work across worker processes.
    """

    def __init__(self, delay: float):
        self.delay = delay
        self.started = shared_event()
        self.release = shared_event()

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


class CrossSender(Greeter):
    """A shared instance: one client's handler sends to another client's connection.

    ``name <x>`` files this connection as ``x``; ``push <x> <count> <size>`` sends
    ``count`` messages of ``size`` bytes (:func:`pushed`) to connection ``x`` from
    this connection's handler, while that client's own replies may be in flight.
    """

    def __init__(self):
        self.conns = {}

    def on_message(self, conn, message):
        verb, _, rest = message.partition(b" ")
        if verb == b"name":
            self.conns[rest] = conn
            return b"named"
        if verb == b"push":
            target, count, size = rest.split()
            for index in range(int(count)):
                self.conns[target].send(pushed(index, int(size)))
            return b"pushed"
        return PREFIX + message


def pushed(index: int, size: int) -> bytes:
    """:class:`CrossSender`'s ``index``-th push: one letter repeated, so a mixed-up frame shows."""
    return b"push%03d " % index + bytes([97 + index % 26]) * size


class _RecordingClass(type):
    """A class made by :func:`recording_class` pickles as a call to it, so a prefork
    worker the fork server starts (which gets its app pickled) makes the same class."""


copyreg.pickle(_RecordingClass, lambda cls: (recording_class, (cls.record_path,)))


def recording_class(path):
    """A handler class whose every instance records its disconnects in the file ``path``.

    One JSON line per call, appended with a single ``write`` so worker processes
    may share the file: ``{"instance": "<pid>:<n>", "peer": [host, port],
    "error": null or repr}``; ``instance`` is unique per instance, in any process.
    Read them back with :func:`read_records`.
    """
    serial = itertools.count(1)  # each worker continues its own copy; the pid tells them apart

    class Recording(Greeter, metaclass=_RecordingClass):
        record_path = path

        def __init__(self):
            self.token = f"{os.getpid()}:{next(serial)}"

        def on_disconnect(self, conn, error):
            append_record(path, {"instance": self.token, "peer": conn.peer,
                                 "error": None if error is None else repr(error)})

    return Recording


def append_record(path, record: dict) -> None:
    """One JSON line, in a single ``write`` on an ``O_APPEND`` descriptor: processes
    may share the file without interleaving."""
    line = json.dumps(record) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_records(path) -> list[dict]:
    """The records a :func:`recording_class` handler has written so far."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def exits_on_exit(message, conn):
    """A function handler that calls sys.exit() for b"exit" and answers b"ok" otherwise."""
    if bytes(message) == b"exit":
        import sys

        sys.exit(3)
    return b"ok"


def contract_class(path):
    """A handler class that records, in the file ``path`` (one JSON line each, any
    process), what the ``conn`` contract gave it: ``{"event": "connect", "is_conn":
    bool}``; for the message ``close``, what ``send`` raised after its own ``close()``;
    for ``slow``, nothing (it sleeps 0.6 s, past the test's handler_timeout); and on
    disconnect the error it was given and what ``send`` raised then, with its cause."""

    class Contract(Greeter, metaclass=_ContractClass):
        record_path = path

        def on_connect(self, conn):
            import muxpool

            append_record(path, {"event": "connect", "is_conn": isinstance(conn, muxpool.Conn)})
            return GREETING

        def on_message(self, conn, message):
            if message == b"close":
                conn.close()
                append_record(path, {"event": "send after close", **_send_outcome(conn)})
                return None
            if message == b"slow":
                time.sleep(0.6)
            return PREFIX + message

        def on_disconnect(self, conn, error):
            append_record(path, {"event": "disconnect", "error": type(error).__name__,
                                 **_send_outcome(conn)})

    return Contract


class _ContractClass(type):
    """Pickles as a call to :func:`contract_class` (see _RecordingClass)."""


copyreg.pickle(_ContractClass, lambda cls: (contract_class, (cls.record_path,)))


def _send_outcome(conn) -> dict:
    try:
        conn.send(b"too late")
    except Exception as exc:  # noqa: BLE001 - what it raised is the record
        cause = exc.__cause__
        return {"raised": type(exc).__name__, "cause": None if cause is None else type(cause).__name__,
                "is_oserror": isinstance(cause, OSError)}
    return {"raised": None}


_GROWN: list[bytes] = []


class GrowingPidGreeter(PidGreeter):
    """``grow`` makes this worker hold 64 MiB more (touched, so resident); anything else echoes."""

    def on_message(self, conn, message):
        if message == b"grow":
            _GROWN.append(b"x" * (64 << 20))
            return b"grown"
        return PREFIX + message


class UnframeableOn(Greeter):
    """Reply with an int (no framing can carry it) to ``bad``; echo anything else."""

    def on_message(self, conn, message):
        return 42 if message == b"bad" else PREFIX + message
