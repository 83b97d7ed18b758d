"""A server's public surface is what its user calls; everything else is private
(issue 13: the connection, the engines and prefork's workers reach the server
only through what it hands them)."""

from __future__ import annotations

import pytest

from muxpool import PreforkServer, Server

USER_SURFACE = {"address", "config", "metrics_address", "serve_forever", "server_address", "shutdown", "socket", "start",
                "stop_now"}
PREFORK_EXTRAS = {"processes", "reload", "totals", "workers"}  # what operators ask of the workers


def _public(obj) -> set[str]:
    return {name for name in dir(obj) if not name.startswith("_")}


@pytest.mark.parametrize("engine", ["loop", "threadpool", "threaded", "auto"])
def test_a_server_shows_only_what_its_user_calls(engine):
    srv = Server(port=0, engine=engine)
    try:
        assert _public(srv) == USER_SURFACE
    finally:
        srv.socket.close()
        srv._mux.close()


def test_a_prefork_server_adds_only_its_workers():
    srv = Server(port=0, engine="prefork", processes=1)
    try:
        assert isinstance(srv, PreforkServer)
        assert _public(srv) == USER_SURFACE | PREFORK_EXTRAS
    finally:
        srv.socket.close()
        srv._mux.close()
