"""Apps for tests/test_lossless_close.py (``muxpool serve linger_apps:NAME --framing line``).

``RecordingBigReply``: each line ``<n>`` is answered with ``<n>:`` and 64 KiB of
filler; the numbers it handled are recorded per connection, one JSON line at
disconnect (``server_apps.append_record`` to the file named by ``LINGER_RECORD``),
so a test can compare what the server handled with what the client received.

``amplify``: each line is answered with 64 KiB — a never-reading client's few
bytes turn into megabytes of replies.

``sleepy``: ``sleep <s>`` sleeps that long (a handler that blocks the loop on the
``loop`` engine); anything else is echoed.
"""

from __future__ import annotations

import logging
import os
import time

from server_apps import append_record

FILLER = b"x" * 65536


class RecordingBigReply:
    def __init__(self):
        self.handled: list[int] = []

    def on_message(self, conn, message):
        number = int(bytes(message))
        self.handled.append(number)
        return b"%d:" % number + FILLER

    def on_disconnect(self, conn, error):
        append_record(os.environ["LINGER_RECORD"], {"port": conn.peer[1], "handled": self.handled})


def amplify(message, conn):
    return FILLER


def sleepy(message, conn):
    text = bytes(message)
    if text.startswith(b"sleep "):
        logging.getLogger("linger_apps").info("began sleep for %s", conn.peer)
        time.sleep(float(text.split()[1]))
        return b"slept"
    return b"response: " + text
