"""Shared by every test module: the tests folder on sys.path (the app modules the
servers under test import), the descriptor limit, and a TLS certificate made at test time."""

import pathlib
import resource
import ssl
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))


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
