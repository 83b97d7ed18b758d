"""TLS on every engine, with a certificate made at test time (trustme)."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import sys
import time

import pytest
from support.cli_process import cli_server, stop_gracefully
from support.engines import SERVER_ENGINES

from muxpool import Client, Server

trustme = pytest.importorskip("trustme")

ENGINES = [e for e in SERVER_ENGINES if e != "auto"]
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ssl(ca):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture(scope="module")
def client_ssl(ca):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture(scope="module")
def server_pem(ca, tmp_path_factory):
    path = tmp_path_factory.mktemp("tls") / "server.pem"
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(params=ENGINES)
def tls_server(request, server_ssl, server_pem):
    # prefork from this multi-threaded process starts its workers through a fork server,
    # which cannot hand them an SSLContext: each worker builds its own from certfile.
    options = ({"processes": 2, "worker_engine": "threadpool", "certfile": server_pem}
               if request.param == "prefork" else {"ssl_context": server_ssl})
    srv = Server(port=0, engine=request.param, framing="line",
                 tls_handshake_timeout=0.5, **options).start()
    yield srv
    srv.shutdown(timeout=10)


def test_a_tls_client_is_greeted_and_answered(tls_server, client_ssl):
    with Client(*tls_server.address, framing="line", ssl_context=client_ssl) as client:
        assert client.greeting == b"Hello client-side"
        assert client.request(b"secret") == b"response: secret"
        assert isinstance(client._sock, ssl.SSLSocket) and client._sock.version().startswith("TLS")


def test_a_plaintext_client_is_closed_and_the_server_goes_on(tls_server, client_ssl):
    with socket.create_connection(tls_server.address, timeout=5) as plain:
        plain.sendall(b"hello\n")
        try:
            assert plain.recv(100) in (b"",)  # closed: never a plaintext reply
        except ConnectionResetError:
            pass
    with Client(*tls_server.address, framing="line", ssl_context=client_ssl) as client:
        assert client.request(b"after") == b"response: after"


def test_a_client_that_never_handshakes_is_closed_after_the_timeout(tls_server):
    with socket.create_connection(tls_server.address, timeout=5) as silent:
        started = time.monotonic()
        try:
            assert silent.recv(100) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 4  # tls_handshake_timeout is 0.5 s


def test_a_client_that_does_not_trust_the_certificate_fails_cleanly(tls_server):
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(*tls_server.address, framing="line", tls=True).connect()


def test_cli_serves_tls_and_the_client_connects_with_cafile(ca, tmp_path):
    """`muxpool serve --certfile/--keyfile` and `muxpool client --tls --cafile`, on the
    gevent engine when it is installed (patched in its own process), else threaded."""
    cert = ca.issue_cert("127.0.0.1")
    certfile, cafile = tmp_path / "server.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    ca.cert_pem.write_to_path(str(cafile))
    engine = "gevent"
    try:
        import gevent  # noqa: F401
    except ImportError:
        engine = "threaded"
    with cli_server("--engine", engine, "--certfile", str(certfile)) as (server, port):
        out = subprocess.run([sys.executable, "-m", "muxpool.cli", "client", f"127.0.0.1:{port}",
                              "--cafile", str(cafile)], input="over tls\nq\n", capture_output=True,
                             text=True, timeout=30)
        assert "Hello client-side" in out.stdout and "response: over tls" in out.stdout, out
        assert stop_gracefully(server, 15) == 0


def test_tls_failures_are_logged_with_the_peer(server_ssl, caplog):
    caplog.set_level(logging.WARNING, logger="muxpool.server")
    with Server(port=0, engine="loop", ssl_context=server_ssl) as srv:
        with socket.create_connection(srv.address, timeout=5) as plain:
            port = str(plain.getsockname()[1])
            plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                plain.recv(100)
            except ConnectionResetError:
                pass
        deadline = time.monotonic() + 5
        while not any("TLS" in r.getMessage() and port in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "no TLS failure logged with the peer"
            time.sleep(0.02)
