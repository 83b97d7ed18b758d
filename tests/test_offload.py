"""The threadpool engine's pool=: message handlers offloaded to a process or Dask pool."""

from __future__ import annotations

import os

import offload_apps
import pytest
from support.cli_process import cli_server, stop_gracefully

from muxpool import Client, ConnectionBroken, EchoService, ProcessPool, Server
from muxpool.loadtest import LoadSpec, run_load

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def process_pool():
    pool = ProcessPool(2)
    yield pool
    pool.terminate()
    pool.join(10)


def test_messages_run_in_the_pool_and_replies_come_back_in_order(process_pool):
    with Server(offload_apps.worker_pid, port=0, framing="line", pool=process_pool) as srv:
        with Client(*srv.address, framing="line", greeting=False) as client:
            pids = {int(client.request(b"x")) for _ in range(20)}
    assert pids and os.getpid() not in pids  # never run in the server's own process


def test_greeting_stays_local_and_the_echo_service_offloads(process_pool):
    with Server(EchoService(), port=0, framing="length", pool=process_pool) as srv:
        with Client(*srv.address, framing="length") as client:
            assert client.greeting == b"Hello client-side"
            assert [client.request(b"%d" % i) for i in range(10)] == [b"response: %d" % i for i in range(10)]


def test_an_offloaded_handler_cannot_send_and_only_its_connection_closes(process_pool):
    with Server(offload_apps.sends_on_boom, port=0, framing="line", pool=process_pool) as srv:
        with Client(*srv.address, framing="line", greeting=False) as good:
            assert good.request(b"before") == b"ok"
            with Client(*srv.address, framing="line", greeting=False) as bad:
                bad.send(b"boom")
                with pytest.raises(ConnectionBroken):
                    bad.receive()
            assert good.request(b"after") == b"ok"  # the server and other clients go on


def test_pool_needs_the_threadpool_engine(process_pool):
    with pytest.raises(ValueError, match="threadpool"):
        Server(EchoService(), port=0, engine="loop", pool=process_pool)


def test_a_dask_cluster_serves_the_handlers_end_to_end_under_the_bench_generator():
    pytest.importorskip("distributed")
    from muxpool import DaskPool

    with DaskPool(n_workers=1) as pool:
        with Server(EchoService(), port=0, pool=pool) as srv:
            report = run_load(LoadSpec(port=srv.address[1], connections=4, duration=1.0), processes=1)
    assert report.requests > 0
    assert report.errors == {}


def test_cli_serve_with_a_process_pool():
    env = dict(os.environ, PYTHONPATH=os.path.dirname(offload_apps.__file__))
    with cli_server("offload_apps:worker_pid", "--framing", "line", "--pool", "process",
                    "--pool-workers", "1", env=env) as (server, port):
        with Client("127.0.0.1", port, framing="line", greeting=False) as client:
            assert int(client.request(b"x")) != server.pid
        assert stop_gracefully(server) == 0


def test_pool_without_an_engine_means_threadpool_and_with_another_engine_is_refused():
    """The default engine (auto) runs handlers itself: pool= alone picks the engine
    that offloads to it; an engine named beside it that cannot is a clear error."""
    from muxpool import ThreadPool

    with ThreadPool(2) as pool:
        srv = Server(port=0, pool=pool)
        try:
            assert srv.config.engine == "threadpool"
        finally:
            srv.socket.close()
            srv._mux.close()
        with pytest.raises(ValueError, match="offloads handlers from the threadpool engine"):
            Server(port=0, engine="auto", pool=pool)
