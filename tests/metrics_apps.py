"""The handler the server-metrics and access-log tests load, in process or as
``muxpool serve metrics_apps:app``: what each message does is known, so every
counter a scrape reports can be checked against the load a test sends."""

from __future__ import annotations

import time

SLOW = 0.03  # s the "slow" message sleeps: past the 25 ms bucket, inside the 50 ms one


def app(message: bytes, conn):
    if message == b"boom":
        raise ValueError("boom, as asked")
    if message == b"slow":
        time.sleep(SLOW)
        return message
    if message == b"bye":
        conn.close()
        return None
    return message
