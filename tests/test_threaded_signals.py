"""A signal the kernel hands to a connection thread must not cut that thread's reply short.

Process-directed signals (SIGTERM from a supervisor, SIGINT from a terminal) go
to any thread that does not block them. A connection thread of the
``threaded`` engine blocked in ``send`` would return a partial count, which the
engine must take for a write timeout: the reply would be lost just as a drain
begins. Connection threads block asynchronous signals, so the kernel hands
them to the main thread, where Python runs its handlers anyway. The test sends
the signal to the connection thread itself (``pthread_kill``), as the kernel
might, while that thread is blocked sending an 8 MiB reply to a client that is
not reading yet; the client then reads the whole reply.
"""

from __future__ import annotations

import signal
import socket
import threading

import pytest
from support.served import unread_bytes
from support.waiting import DEADLINE, wait_for

from muxpool import Server

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")]

REPLY = b"r" * (8 << 20)


def big_reply(message: bytes, conn) -> bytes:
    return REPLY


@pytest.fixture
def sigusr1_handled():
    """A Python handler for SIGUSR1 (its default action would end the process), restored after."""
    noted = threading.Event()
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: noted.set())
    yield noted
    signal.signal(signal.SIGUSR1, previous)


def test_a_signal_on_a_connection_thread_does_not_cut_its_reply(sigusr1_handled):
    srv = Server(big_reply, port=0, engine="threaded", framing="length",
                 write_high_water=64 * 1024, write_timeout=30).start()
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.settimeout(DEADLINE)
        client.connect(srv.address[:2])
        client.sendall(len(b"go").to_bytes(4, "big") + b"go")
        # The reply's first bytes arrive while the connection thread is inside its one send
        # of 8 MiB, which blocks there: far more than the two kernel buffers hold.
        wait_for(lambda: unread_bytes(client) > 0, what="the reply to start arriving")
        sender = wait_for(lambda: next((t for t in threading.enumerate()
                                        if t.name.startswith("muxpool-conn-")), None),
                          what="the connection thread")
        signal.pthread_kill(sender.ident, signal.SIGUSR1)
        received = bytearray()
        want = 4 + len(REPLY)
        while len(received) < want:
            chunk = client.recv(1 << 20)
            assert chunk, f"the server closed the connection after {len(received)} of {want} bytes"
            received += chunk
        assert received[4:] == REPLY
    finally:
        client.close()
        srv.shutdown(timeout=DEADLINE)
