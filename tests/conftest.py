"""Shared by every test module: the tests folder on sys.path (the app modules the
servers under test import), the descriptor limit, a TLS certificate made at test time, and
the fixtures more than one module uses."""

import pathlib
import resource
import ssl
import sys

import pytest

from muxpool import Server

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from support import servers as servers_support  # noqa: E402 - found through the path just set


@pytest.fixture
def nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, restored afterwards; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    yield target
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A CA made at test time, a server certificate for 127.0.0.1 (PEM file) and a client context."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    folder = tmp_path_factory.mktemp("tls")
    certfile = folder / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(certfile))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return certfile, client_context


# The suites that start `muxpool serve` on every engine, or meet hostile clients by
# the hundred: minutes of the whole run. `make test-fast` leaves them out.
_SLOW_MODULES = {"test_reliability", "test_hostile_at_scale", "test_lossless_close", "test_overload",
                 "test_reload", "test_stop_signals", "test_drain_under_load", "test_engines"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ in _SLOW_MODULES:
            item.add_marker(pytest.mark.slow)

@pytest.fixture
def prefork_server():
    """``prefork_server(app=None, **options)``: an in-process prefork server, started
    with every worker forked; always shut down, its workers checked gone."""
    servers: list[Server] = []

    def make(app=None, **options):
        options = {"port": 0, "processes": 2, "worker_engine": "loop", "framing": "line", **options}
        srv = Server(app, engine="prefork", **options)
        servers.append(srv)
        return servers_support.start_server(srv)

    yield make
    servers_support.stop_servers(servers)
