"""TLS for the loop engines, sans-IO: an ``ssl.MemoryBIO`` pair between the
socket and the framer.

The multiplexer keeps reading and writing raw bytes without blocking; this
object turns received ciphertext into plaintext (driving the handshake on the
way) and plaintext replies into ciphertext. It never touches a socket, so the
handshake cannot block the loop. The engines that own a blocking socket per
connection (``threaded``, ``gevent``) wrap the socket itself instead.
"""

from __future__ import annotations

import ssl

from .errors import RemoteProtocolError

READ_SIZE = 65536


def server_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    """A server-side context with the standard library's secure defaults."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


class TLSSession:
    """One server-side TLS session over memory buffers."""

    __slots__ = ("_incoming", "_outgoing", "_tls", "handshaken", "peer_closed")

    def __init__(self, context: ssl.SSLContext):
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.handshaken = False
        self.peer_closed = False  # the peer sent close_notify (or closed TCP after the handshake)

    def receive(self, data: bytes) -> tuple[bytes, bytes]:
        """Feed ciphertext (``b""`` at EOF); return ``(plaintext, ciphertext to send)``.

        Raises :class:`~muxpool.errors.RemoteProtocolError` for anything that is
        not valid TLS from the peer (a plaintext client, a failed handshake).
        After ``peer_closed`` turns true nothing more will come: treat it as EOF.
        """
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()
        chunks = []
        try:
            if not self.handshaken:
                self._tls.do_handshake()
                self.handshaken = True
            while True:
                chunk = self._tls.read(READ_SIZE)
                if not chunk:  # what read() returns once close_notify has arrived
                    self.peer_closed = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass  # needs more bytes
        except ssl.SSLZeroReturnError:
            self.peer_closed = True  # close_notify, on Pythons that raise it
        except ssl.SSLEOFError:
            # TCP closed without close_notify: what most clients do, and what a
            # load balancer's TCP health check does before any handshake. An EOF.
            self.peer_closed = True
        except ssl.SSLError as exc:
            raise RemoteProtocolError(f"TLS: {exc.reason or exc}") from exc
        return b"".join(chunks), self._outgoing.read()

    def close(self) -> bytes:
        """The ciphertext of our close_notify (nothing before the handshake)."""
        if not self.handshaken:
            return b""
        try:
            self._tls.unwrap()
        except ssl.SSLError:
            pass  # it waits for the peer's close_notify: ours is already written
        return self._outgoing.read()

    def send(self, plaintext: bytes) -> bytes:
        """The ciphertext that carries ``plaintext``."""
        self._tls.write(plaintext)
        return self._outgoing.read()
