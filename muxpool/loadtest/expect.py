"""What the generator expects from a server: its greeting, and each request's reply.

The greeting is *detected* by default (``greeting_bytes="auto"``): the first
connection of each generator process waits briefly for the server to speak
first, and what it sends (one frame with ``line`` or ``length`` framing) sets
how many bytes every later connection skips. A server that greets nobody
costs that one short wait, not a connect error per connection.

Replies are ``reply_prefix + request`` unless ``LoadSpec.expected`` maps each
request body to its reply; :func:`learn_replies` fills that map by calling the
compared handler itself, in this process, on every request the generator
will send, so ``bench --compare --app module:handle`` checks any handler that
answers each request with one reply.
"""

from __future__ import annotations

import select
import socket
import time

RING = 16  # distinct requests per connection: enough to catch a reordered or repeated reply
GREETING_WAIT = 1.0  # seconds a first connection waits for a greeting before deciding there is none
GREETING_QUIET = 0.03  # raw framing: a greeting is complete once this long passes without more


def body(size: int, conn_index: int, slot: int) -> bytes:
    tag = b"%d.%d:" % (conn_index, slot)
    return (tag * (size // len(tag) + 1))[: max(size, 1)]


def ring(spec, framer, conn_index: int) -> list[tuple[bytes, bytes]]:
    """RING distinct (request wire bytes, expected reply wire bytes) pairs."""
    pairs = []
    for slot in range(RING):
        message = body(spec.size, conn_index, slot)
        reply = spec.expected[message] if spec.expected else spec.reply_prefix + message
        pairs.append((framer.encode(message), framer.encode(reply)))  # length counts even unverified
    return pairs


def detect_greeting(sock: socket.socket, framer, wait: float) -> int:
    """Bytes the server sent unasked on a fresh connection (0: it waits for the client)."""
    deadline = time.monotonic() + wait
    got = bytearray()
    while True:
        left = deadline - time.monotonic()
        if got and framer is None:
            left = min(left, GREETING_QUIET)
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return len(got)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("closed before it spoke")
        got += chunk
        if framer is not None and framer.feed(chunk):
            return len(got)


def read_greeting(sock: socket.socket, wanted: int) -> None:
    while wanted > 0:
        chunk = sock.recv(wanted)
        if not chunk:
            raise ConnectionResetError("closed before its greeting")
        wanted -= len(chunk)
