"""Handler apps that fault on purpose, for ``tests/test_faults.py``.

Served with ``muxpool serve fault_apps:...`` in a subprocess (the faults end or
stop whole processes, so never in the test's own process). Stdlib only.

Both apps append each message to the file named by the environment variable
``FAULTS_RECORD`` (one line, one ``write``, so every process may share the
file) as its handler starts: the test polls that file to know a handler is
running, instead of sleeping.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
import time

PREFIX = b"response: "

#: What :class:`Faulty` does for each special message.
EXIT = b"fault os._exit"  # os._exit(3): the process ends, no clean-up
KILL = b"fault sigkill"  # the process SIGKILLs itself
SEGFAULT = b"fault segfault"  # reads address 0 through ctypes: SIGSEGV
SYS_EXIT = b"fault sys.exit"  # raises SystemExit: must end the call, not the process


def _record(message: bytes) -> None:
    path = os.environ.get("FAULTS_RECORD")
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"%d %s\n" % (os.getpid(), bytes(message)))
    finally:
        os.close(fd)


def read_record(path) -> list[tuple[int, bytes]]:
    """``(pid, message)`` for every handler call recorded so far in ``path``."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    return [(int(pid), message) for pid, _, message in (line.partition(b" ") for line in lines)]


class Faulty:
    """Greets with ``pid <n>`` (the serving process); echoes with ``response: ``;
    the messages :data:`EXIT`, :data:`KILL`, :data:`SEGFAULT` and :data:`SYS_EXIT`
    fault instead of answering."""

    def on_connect(self, conn):
        return b"pid %d" % os.getpid()

    def on_message(self, conn, message):
        message = bytes(message)
        if message.startswith(b"fault "):
            _record(message)
        if message == EXIT:
            os._exit(3)
        if message == KILL:
            os.kill(os.getpid(), signal.SIGKILL)
        if message == SEGFAULT:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the tests folder
            ctypes.string_at(0)
        if message == SYS_EXIT:
            sys.exit("sys.exit() requested by the test")
        return PREFIX + message


class Sleeper:
    """``sleep <seconds>`` sleeps that long (recorded as it starts), then echoes;
    anything else is echoed at once. Greets with ``pid <n>``."""

    def on_connect(self, conn):
        return b"pid %d" % os.getpid()

    def on_message(self, conn, message):
        message = bytes(message)
        if message.startswith(b"sleep "):
            _record(message)
            time.sleep(float(message.split()[1]))
        return PREFIX + message
