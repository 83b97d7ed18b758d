"""Unit tests for muxpool.tls.TLSSession, the sans-IO server side of TLS.

No sockets: a TLSSession and a client-side ``ssl.SSLObject`` over a MemoryBIO
pair sit back to back, and the tests carry the bytes between them, cut where
they like: one byte at a time, at every cut of a flight, at cuts Hypothesis
picks. The certificate is the one conftest.py's ``tls_files`` makes (trustme).
"""

from __future__ import annotations

import random
import ssl
from itertools import cycle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from muxpool.errors import ProtocolError, RemoteProtocolError
from muxpool.tls import TLSSession, server_context

pytestmark = pytest.mark.timeout(60)

hsettings = settings(max_examples=50, deadline=None)
MAX_ROUNDS = 8  # a TLS 1.3 handshake takes 2; more means someone waits for bytes that never come


@pytest.fixture(scope="module")
def contexts(tls_files):
    certfile, client_context = tls_files
    return server_context(str(certfile)), client_context


class Peer:
    """The client: an ``ssl.SSLObject`` over memory, driven by hand."""

    def __init__(self, context: ssl.SSLContext):
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        self.handshaken = False
        self.closed = False  # the server's close_notify arrived

    def receive(self, data: bytes) -> bytes:
        """Feed ciphertext, advance the handshake; the ciphertext to send back."""
        if data:
            self.incoming.write(data)
        if not self.handshaken:
            try:
                self.tls.do_handshake()
                self.handshaken = True
            except ssl.SSLWantReadError:
                pass
        return self.outgoing.read()

    def send(self, plaintext: bytes) -> bytes:
        self.tls.write(plaintext)
        return self.outgoing.read()

    def read(self) -> bytes:
        chunks = []
        try:
            while True:
                chunk = self.tls.read(65536)
                if not chunk:
                    self.closed = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.closed = True
        return b"".join(chunks)


def whole(data: bytes) -> list[bytes]:
    return [data] if data else []


def by_sizes(sizes: list[int]):
    """A splitter that cuts every transfer into pieces of these sizes, in turn."""
    def split(data: bytes) -> list[bytes]:
        pieces, at = [], 0
        for size in cycle(sizes):
            if at >= len(data):
                return pieces
            pieces.append(data[at:at + size])
            at += size
        return pieces
    return split


def to_server(server: TLSSession, data: bytes, split=whole) -> tuple[bytes, bytes]:
    """Feed ``data`` in pieces (never an empty one: ``b""`` is EOF); what came out."""
    plaintext, reply = [], []
    for piece in split(data):
        assert piece
        text, out = server.receive(piece)
        plaintext.append(text)
        reply.append(out)
    return b"".join(plaintext), b"".join(reply)


def to_client(client: Peer, data: bytes, split=whole) -> bytes:
    return b"".join(client.receive(piece) for piece in split(data))


def handshake(server: TLSSession, client: Peer, split=whole) -> None:
    outgoing = client.receive(b"")  # the ClientHello
    for _ in range(MAX_ROUNDS):
        plaintext, reply = to_server(server, outgoing, split)
        assert plaintext == b""
        outgoing = to_client(client, reply, split)
        if server.handshaken and client.handshaken and not outgoing:
            break
    else:
        raise AssertionError(f"no handshake after {MAX_ROUNDS} rounds "
                             f"(server {server.handshaken}, client {client.handshaken})")
    assert not server.peer_closed and not client.closed


def new_pair(contexts) -> tuple[TLSSession, Peer]:
    server_ctx, client_ctx = contexts
    return TLSSession(server_ctx), Peer(client_ctx)


def echo_both_ways(server: TLSSession, client: Peer, split=whole) -> None:
    plaintext, reply = to_server(server, client.send(b"ping\n"), split)
    assert (plaintext, reply) == (b"ping\n", b"")
    to_client(client, server.send(b"pong\n"), split)
    assert client.read() == b"pong\n"


# --- the handshake, cut anywhere ------------------------------------------------------


def test_the_handshake_completes_when_every_byte_arrives_alone(contexts):
    server, client = new_pair(contexts)
    hello = client.receive(b"")
    replies = []
    for i in range(len(hello)):
        plaintext, reply = server.receive(hello[i:i + 1])
        assert plaintext == b""
        replies.append(reply)
    assert all(r == b"" for r in replies[:-1]), "the server answered a partial ClientHello"
    assert replies[-1], "no answer to the whole ClientHello"
    assert not server.handshaken
    finished = b"".join(client.receive(replies[-1][i:i + 1]) for i in range(len(replies[-1])))
    assert client.handshaken and finished
    flipped_at = []
    for i in range(len(finished)):
        was = server.handshaken
        plaintext, reply = server.receive(finished[i:i + 1])
        assert plaintext == b""
        if server.handshaken and not was:
            flipped_at.append(i)
            to_client(client, reply, by_sizes([1]))  # TLS 1.3 session tickets
    assert flipped_at == [len(finished) - 1], "handshaken must turn true on the client's last byte"
    echo_both_ways(server, client, by_sizes([1]))


def client_flight(server: TLSSession, client: Peer, flight: str) -> bytes:
    """The client's first flight (its ClientHello), or its second (its Finished)."""
    data = client.receive(b"")
    if flight == "client Finished":
        _, reply = server.receive(data)
        data = client.receive(reply)
    return data


@pytest.mark.parametrize("flight", ["ClientHello", "client Finished"])
def test_the_handshake_completes_at_every_cut_of_a_client_flight(contexts, flight):
    length = len(client_flight(*new_pair(contexts), flight))
    assert length > 10
    for cut in range(1, length):
        server, client = new_pair(contexts)
        data = client_flight(server, client, flight)
        assert len(data) == length, "the flight changed length"
        first = server.receive(data[:cut])
        assert first == (b"", b""), f"cut {cut}: the server acted on a partial flight"
        assert not server.handshaken
        _, reply = server.receive(data[cut:])
        assert reply, f"cut {cut}: no answer to the whole flight"
        outgoing = client.receive(reply)
        if flight == "ClientHello":
            assert not server.handshaken
            plaintext, reply = server.receive(outgoing)
            assert plaintext == b""
            client.receive(reply)
        assert server.handshaken and client.handshaken, f"cut {cut}"
    echo_both_ways(server, client)  # the last one serves


@hsettings
@given(sizes=st.lists(st.integers(min_value=1, max_value=1500), min_size=1, max_size=12))
def test_a_whole_session_survives_any_cuts_in_both_directions(contexts, sizes):
    """Handshake, data both ways, close_notify both ways: every transfer cut by ``sizes``."""
    split = by_sizes(sizes)
    server, client = new_pair(contexts)
    handshake(server, client, split)
    payload = random.Random(len(sizes)).randbytes(3000)
    plaintext, reply = to_server(server, client.send(payload), split)
    assert (plaintext, reply) == (payload, b"")
    to_client(client, server.send(payload[::-1]), split)
    assert client.read() == payload[::-1]
    try:
        client.tls.unwrap()
    except ssl.SSLWantReadError:
        pass  # ours is sent; it waits for the server's
    plaintext, reply = to_server(server, client.outgoing.read(), split)
    assert (plaintext, reply) == (b"", b"") and server.peer_closed
    to_client(client, server.close(), split)
    client.tls.unwrap()  # completes: the server's close_notify is valid


# --- application data ---------------------------------------------------------------------


def test_application_data_flows_both_ways_including_many_records_at_once(contexts):
    server, client = new_pair(contexts)
    handshake(server, client)
    big = random.Random(1).randbytes(300_000)  # > READ_SIZE, and many 16 KiB records
    plaintext, reply = to_server(server, client.send(big))
    assert plaintext == big and reply == b""
    # Several messages in one receive come back together, in order.
    burst = client.send(b"one\n") + client.send(b"two\n") + client.send(b"three\n")
    assert server.receive(burst) == (b"one\ntwo\nthree\n", b"")
    to_client(client, server.send(big[::-1]) + server.send(b"tail"))
    assert client.read() == big[::-1] + b"tail"
    assert not server.peer_closed and not client.closed


def test_the_clients_finished_and_its_first_request_in_one_chunk(contexts):
    """What TLS 1.3 clients do: Finished and the request in one TCP segment."""
    server, client = new_pair(contexts)
    _, reply = server.receive(client.receive(b""))
    finished = client.receive(reply)
    assert client.handshaken
    plaintext, tickets = server.receive(finished + client.send(b"GET\n"))
    assert server.handshaken
    assert plaintext == b"GET\n"
    to_client(client, tickets + server.send(b"OK\n"))
    assert client.read() == b"OK\n"


# --- close ---------------------------------------------------------------------------------


def test_the_clients_close_notify_ends_the_session_and_ours_answers_it(contexts):
    server, client = new_pair(contexts)
    handshake(server, client)
    with pytest.raises(ssl.SSLWantReadError):
        client.tls.unwrap()  # sends close_notify, waits for the server's
    assert server.receive(client.outgoing.read()) == (b"", b"")
    assert server.peer_closed
    assert server.receive(b"") == (b"", b"")  # the TCP EOF after it: nothing new
    ours = server.close()
    assert ours
    client.receive(ours)
    client.tls.unwrap()  # completes now
    assert client.read() == b"" and client.closed


def test_data_and_close_notify_in_one_chunk_give_the_data_then_the_close(contexts):
    server, client = new_pair(contexts)
    handshake(server, client)
    data = client.send(b"last words\n")
    with pytest.raises(ssl.SSLWantReadError):
        client.tls.unwrap()
    plaintext, _ = server.receive(data + client.outgoing.read())
    assert plaintext == b"last words\n"
    assert server.peer_closed


def test_our_close_notify_first_then_the_clients_answer(contexts):
    server, client = new_pair(contexts)
    handshake(server, client)
    client.receive(server.close())
    assert client.read() == b"" and client.closed, "the client did not see our close_notify"
    client.tls.unwrap()  # answers it, and completes: both have sent theirs
    answer = client.outgoing.read()
    assert answer
    assert server.receive(answer) == (b"", b"")
    assert server.peer_closed


def test_a_tcp_eof_without_close_notify_is_an_eof_not_an_error(contexts):
    server, client = new_pair(contexts)
    handshake(server, client)
    plaintext, _ = server.receive(client.send(b"no goodbye\n"))
    assert plaintext == b"no goodbye\n" and not server.peer_closed
    assert server.receive(b"")[0] == b""
    assert server.peer_closed


def test_an_eof_before_the_handshake_is_an_eof_and_close_sends_nothing(contexts):
    """A load balancer's TCP health check: connect, close."""
    server_ctx, _ = contexts
    server = TLSSession(server_ctx)
    assert server.close() == b""
    server.receive(b"")
    assert server.peer_closed and not server.handshaken


# --- garbage -------------------------------------------------------------------------------

GARBAGE = {
    "an HTTP request": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "a line protocol": b"hello\n",
    "random bytes": random.Random(13).randbytes(200),
    "a record far over the size limit": b"\x16\x03\x01\xff\xff" + b"\0" * 64,
    "a handshake record of junk": b"\x16\x03\x01\x00\x08" + b"\xff" * 8,
    "an SSLv2-style hello": b"\x80\x2e\x01\x00\x02" + b"\0" * 0x2b,
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_instead_of_a_client_hello_is_a_clear_protocol_error(contexts, name):
    server_ctx, _ = contexts
    server = TLSSession(server_ctx)
    with pytest.raises(RemoteProtocolError) as info:
        server.receive(GARBAGE[name])
    assert isinstance(info.value, ProtocolError)
    assert str(info.value).startswith("TLS: ") and len(str(info.value)) > len("TLS: ")
    assert isinstance(info.value.__cause__, ssl.SSLError)
    assert not server.handshaken


def test_a_corrupted_record_after_the_handshake_is_a_clear_protocol_error(contexts):
    server, client = new_pair(contexts)
    handshake(server, client)
    record = bytearray(client.send(b"tampered with\n"))
    record[-1] ^= 0x01  # the tag: decryption fails
    with pytest.raises(RemoteProtocolError, match="TLS: ") as info:
        server.receive(bytes(record))
    assert isinstance(info.value.__cause__, ssl.SSLError)


def test_a_client_that_rejects_our_certificate_gives_a_clear_error(contexts):
    server_ctx, _ = contexts
    server = TLSSession(server_ctx)
    client = Peer(ssl.create_default_context())  # trusts the system's CAs, not trustme's
    _, reply = server.receive(client.receive(b""))
    with pytest.raises(ssl.SSLCertVerificationError):
        client.receive(reply)
    alert = client.outgoing.read()
    assert alert
    with pytest.raises(RemoteProtocolError, match="TLS: .*UNKNOWN_CA|TLS: .*CERTIFICATE"):
        server.receive(alert)


@hsettings
@given(data=st.binary(min_size=1, max_size=600))
def test_any_bytes_then_eof_end_in_an_error_or_an_eof_never_a_wait(contexts, data):
    """Bytes that could start a record may wait for more; at EOF the wait is over."""
    server_ctx, _ = contexts
    server = TLSSession(server_ctx)
    try:
        plaintext, _ = server.receive(data)
        assert plaintext == b""
        plaintext, _ = server.receive(b"")
        assert plaintext == b""
    except RemoteProtocolError as exc:
        assert isinstance(exc.__cause__, ssl.SSLError)
        assert str(exc).startswith("TLS: ")
    else:
        assert server.peer_closed
    assert not server.handshaken
