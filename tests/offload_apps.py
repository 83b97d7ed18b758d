"""Handlers for offloading tests: module-level, so worker processes can import them."""

import os


def worker_pid(message, conn):
    """Replies with the pid of the process that ran the handler."""
    return b"%d" % os.getpid()


def sends_on_boom(message, conn):
    """Answers ok, except that b"boom" tries conn.send, which an offloaded handler cannot."""
    if message == b"boom":
        conn.send(b"not possible in another process")
    return b"ok"
