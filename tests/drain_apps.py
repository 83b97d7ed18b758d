"""An app for tests/test_drain_under_load.py: ``muxpool serve drain_apps:CountingSlowEcho``.

Line framing, no greeting: each message is answered ``response: <message>``
after ``DELAY`` seconds of ``time.sleep`` (under the gevent engine the process
is monkey-patched, so the sleep yields to the other connections).

The class form makes one instance per connection, so ``self`` counts that
connection's messages: how many handlers started, how many returned a reply,
and the start and return times (``time.monotonic()``, the system-wide
CLOCK_MONOTONIC on Linux, so the test process can compare them with its own)
of the last ``RECENT`` messages. ``on_disconnect`` appends one JSON line with
them to the file named by the environment variable ``DRAIN_RECORD``, in a
single ``os.write`` on an ``O_APPEND`` descriptor, so prefork workers may
share the file without interleaving. The line is keyed by the client's port
(``conn.peer``), which the load generator reports for each of its connections.
"""

from __future__ import annotations

import collections
import os
import time

from server_apps import append_record

DELAY = 0.002  # seconds of "work" per message
RECENT = 64    # (started, returned) times kept per connection: far more than a drain handles
PREFIX = b"response: "


class CountingSlowEcho:
    def __init__(self):
        self.path = os.environ["DRAIN_RECORD"]
        self.started = 0
        self.returned = 0
        self.recent: collections.deque = collections.deque(maxlen=RECENT)

    def on_message(self, conn, message):
        self.started += 1
        began = time.monotonic()
        time.sleep(DELAY)
        reply = PREFIX + bytes(message)
        self.returned += 1
        self.recent.append((began, time.monotonic()))
        return reply

    def on_disconnect(self, conn, error):
        peer = conn.peer
        append_record(self.path, {"pid": os.getpid(), "peer": list(peer), "port": peer[1],
                                  "started": self.started, "returned": self.returned,
                                  "recent": list(self.recent), "dropped_times": self.returned > RECENT,
                                  "error": None if error is None else repr(error)})
