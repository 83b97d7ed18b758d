"""DaskPool specifics the conformance suite does not cover.

The conformance suite runs the whole pool API on a shared client; here are
the three ways a pool finds its cluster (its own ``LocalCluster``,
``address=``, ``client=``), ``task_timeout``, a killed worker, results that
cannot travel, and the optional-dependency story. Every cluster a test
starts is closed in a ``finally`` or a fixture, also when the test fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import CancelledError

import pool_tasks
import pytest
from support.pools import made_pools
from support.processes import process_exists
from support.waiting import wait_for

from muxpool import PoolClosed, RemoteTraceback, SerializationError, TaskTimeout

distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")
DaskPool = pytest.importorskip("muxpool.pools.dask").DaskPool
LOOPBACK_HTTP = pytest.importorskip("muxpool.pools.dask").LOOPBACK_HTTP

pytestmark = pytest.mark.timeout(60)


def local_cluster(n_workers=2):
    return distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                    host="127.0.0.1", dashboard_address=None,
                                    scheduler_kwargs=LOOPBACK_HTTP)


@pytest.fixture(scope="module")
def cluster():
    """One two-worker LocalCluster for the tests that only need *a* cluster."""
    c = local_cluster()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def client(cluster):
    c = distributed.Client(cluster, set_as_default=False)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def pools():
    yield from made_pools(DaskPool, 30)


def accepts(address: str) -> bool:
    """Whether something listens at a ``tcp://host:port`` address."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


# --- where the cluster comes from -------------------------------------------------------


def test_own_local_cluster_serves_and_close_shuts_it_down(pools):
    pool = pools(n_workers=2)
    address = pool.client.scheduler.address
    assert address.startswith("tcp://127.0.0.1:")  # loopback only
    workers = pool.client.scheduler_info()["workers"]
    assert len(workers) == 2 and all(w.startswith("tcp://127.0.0.1:") for w in workers)
    assert pool.max_workers == 2
    worker_pids = list(pool.client.run(os.getpid).values())

    assert pool.submit(pool_tasks.add, 2, 3).result(timeout=30) == 5
    assert list(pool.map(pool_tasks.square, range(20))) == [i * i for i in range(20)]
    s = pool.stats()
    assert (s.workers, s.busy, s.queued, s.completed) == (2, 0, 0, 21)

    slow = pool.submit(pool_tasks.sleep_then_return, 0.3, "late")
    pool.close()
    with pytest.raises(PoolClosed):
        pool.submit(pool_tasks.square, 2)
    assert pool.join(30)
    assert slow.result(timeout=0) == "late"  # close() lets work finish first
    assert pool.stats().workers == 0
    assert not accepts(address), "the scheduler still accepts connections after close()"
    wait_for(lambda: not any(process_exists(pid) for pid in worker_pids), 10, "worker processes to exit")


def test_terminate_cancels_running_work_and_shuts_the_cluster_down(pools, tmp_path):
    pool = pools(n_workers=1)
    address = pool.client.scheduler.address
    pid_file = tmp_path / "pid"
    running = pool.submit(pool_tasks.write_pid_then_sleep, str(pid_file), 30)
    wait_for(pid_file.exists, 20, "the task to start")
    queued = [pool.submit(pool_tasks.square, i) for i in range(5)]
    calls = []
    pool.run(pool_tasks.square, (3,), lambda ok, result: calls.append((ok, result)))

    t0 = time.monotonic()
    pool.terminate()
    assert time.monotonic() - t0 < 0.5
    assert running.cancelled() and all(f.cancelled() for f in queued)
    assert len(calls) == 1 and calls[0][0] is False and isinstance(calls[0][1], CancelledError)
    assert pool.join(30)
    assert not accepts(address)
    # Dask cannot interrupt the running call, but the cluster's end kills its worker.
    wait_for(lambda: not process_exists(int(pid_file.read_text())), 10, "the worker to exit")
    s = pool.stats()
    assert (s.cancelled, s.failed, s.completed, s.busy, s.queued) == (6, 1, 0, 0, 0)


def test_address_mode_connects_and_leaves_the_scheduler_running(pools, cluster):
    pool = pools(cluster.scheduler_address)
    assert pool.max_workers == 2
    assert pool.submit(pool_tasks.echo, 1, key="k", func="f").result(timeout=30) == (
        (1,), {"key": "k", "func": "f"})
    own_client = pool.client
    pool.close()
    assert pool.join(30)
    assert own_client.status == "closed"  # the pool's client is its own to close
    assert accepts(cluster.scheduler_address)  # the scheduler is not
    with distributed.Client(cluster.scheduler_address, set_as_default=False) as other:
        assert other.submit(pool_tasks.square, 4, pure=False).result(timeout=30) == 16


def test_client_mode_leaves_the_client_open(pools, client):
    pool = pools(client=client)
    assert pool.client is client
    assert pool.apply(pool_tasks.add, (1, 2)) == 3
    pool.close()
    assert pool.join(30)
    assert client.status == "running"
    assert client.submit(pool_tasks.square, 5, pure=False).result(timeout=30) == 25


def test_address_and_client_together_are_refused(client):
    with pytest.raises(ValueError):
        DaskPool("tcp://127.0.0.1:1", client=client)


# --- task_timeout -------------------------------------------------------------------------


def test_task_timeout_fails_the_task_and_the_pool_carries_on(pools, client):
    pool = pools(client=client, task_timeout=5)
    # Per task: it runs on in its worker thread (Dask cannot stop it); we stop waiting.
    t0 = time.monotonic()
    fut = pool.schedule(pool_tasks.sleep_then_return, (1.5, "too late"), task_timeout=0.2)
    with pytest.raises(TaskTimeout) as info:
        fut.result(timeout=10)
    assert info.value.timeout == 0.2
    assert time.monotonic() - t0 < 1.4
    assert isinstance(info.value, TimeoutError)

    calls = []
    pool.run(pool_tasks.sleep_then_return, (1.5,), lambda ok, r: calls.append((ok, r)),
             task_timeout=0.2)
    wait_for(lambda: calls, 10, "the timed-out run callback")
    assert calls[0][0] is False and isinstance(calls[0][1], TaskTimeout)

    # The pool-wide limit (5 s) leaves quick tasks alone.
    assert pool.submit(pool_tasks.square, 9).result(timeout=30) == 81
    time.sleep(1.6)  # the abandoned calls finish in the workers; nothing more arrives
    assert len(calls) == 1 and fut.exception(timeout=0) is info.value
    s = pool.stats()
    assert (s.failed, s.completed, s.busy, s.queued) == (2, 1, 0, 0)


def test_pool_wide_task_timeout(pools, client):
    pool = pools(client=client, task_timeout=0.2)
    fut = pool.submit(pool_tasks.sleep_then_return, 1.0)
    assert isinstance(fut.exception(timeout=10), TaskTimeout)
    assert pool.schedule(pool_tasks.sleep_then_return, (1.0, "ok"), task_timeout=30).result(
        timeout=30) == "ok"
    assert pool.stats().timed_out == 1


# --- failures ------------------------------------------------------------------------------


def test_a_remote_exception_keeps_its_traceback_as_cause(pools, client):
    pool = pools(client=client)
    exc = pool.submit(pool_tasks.raise_deep).exception(timeout=30)
    assert type(exc) is ValueError and str(exc) == "raised deep in the worker"
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "_deep_helper_for_traceback" in exc.__cause__.text


def test_arguments_and_results_that_cannot_travel(pools, client):
    pool = pools(client=client)
    exc = pool.submit(pool_tasks.identity, pool_tasks.UnpicklableError("x")).exception(timeout=30)
    assert isinstance(exc, SerializationError) and exc.what == "arguments"
    exc = pool.submit(pool_tasks.return_lock).exception(timeout=30)
    assert isinstance(exc, SerializationError) and exc.what == "result"
    assert pool.submit(pool_tasks.square, 3).result(timeout=30) == 9
    assert pool.stats().failed == 2


def test_a_killed_worker_never_hangs_the_pool(pools, tmp_path):
    """Dask reschedules the task of a dead worker elsewhere, up to
    ``allowed-failures`` deaths (here 1), then fails it with KilledWorker."""
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        pool = pools(n_workers=2)
    pids = set(pool.client.run(os.getpid).values())
    assert len(pids) == 2

    pid_file = tmp_path / "pid"
    fut = pool.submit(pool_tasks.write_pid_then_sleep, str(pid_file), 1.0)
    wait_for(pid_file.exists, 20, "the task to start")
    victim = int(pid_file.read_text())
    assert victim in pids
    os.kill(victim, signal.SIGKILL)
    try:
        assert fut.result(timeout=40) == "slept"  # rescheduled on the other worker
    except Exception as exc:  # noqa: BLE001 - or it failed: either way it settles
        assert isinstance(exc, distributed.KilledWorker), exc
    assert pool.submit(pool_tasks.square, 7).result(timeout=30) == 49

    # A task that kills every worker it runs on fails once the allowance is spent.
    exc = pool.submit(pool_tasks.kill_self).exception(timeout=40)
    assert isinstance(exc, distributed.KilledWorker)
    assert list(pool.map(pool_tasks.square, range(10))) == [i * i for i in range(10)]


def test_cpu_bound_work_spreads_over_both_workers(pools, client):
    # Timing belongs to benchmarks; that both worker processes computed is the
    # deterministic sign of parallelism.
    pool = pools(client=client)
    n = 200_000
    results = list(pool.map(pool_tasks.spin_where, [n] * 16))
    assert all(value == pool_tasks.spin(n) for _pid, value in results)
    assert len({pid for pid, _value in results}) == 2


# --- the optional dependency ----------------------------------------------------------------


def test_dask_pool_loads_dask_on_first_use_only():
    code = ("import sys, muxpool; before = 'distributed' in sys.modules; muxpool.DaskPool; "
            "print(before, 'distributed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_without_dask_the_error_says_what_to_install():
    code = ("import sys; sys.modules['distributed'] = None; import muxpool\n"
            "try:\n    muxpool.DaskPool\n"
            "except muxpool.MissingDependency as exc:\n    print(exc.extra, '|', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("dask |")
    assert "pip install 'muxpool[dask]'" in out.stdout


# --- a failure in the pool's own machinery ----------------------------------------------------


class FragileDaskPool(DaskPool):
    """A DaskPool whose housekeeper fails on the next batch of results once armed (fault injection)."""

    def __init__(self, *args, **kwargs):
        self.armed = False
        super().__init__(*args, **kwargs)

    def _deliver_ready(self, ready):
        if self.armed:
            raise RuntimeError("injected housekeeper failure")
        super()._deliver_ready(ready)


def test_a_housekeeper_failure_breaks_the_pool(pools, client, tmp_path, caplog):
    from muxpool import PoolBroken

    pool = pools(client=client, pool_class=FragileDaskPool)
    assert pool.submit(pool_tasks.square, 2).result(timeout=30) == 4
    started, release = tmp_path / "started", tmp_path / "release"
    try:
        blocked = pool.submit(pool_tasks.block_on_files, str(started), str(release))
        wait_for(started.exists, 30, what="the blocker to start")
        pending = [blocked] + [pool.submit(pool_tasks.square, i) for i in range(3)]
        pool.armed = True
        quick = pool.submit(pool_tasks.square, 9)  # its result reaches the housekeeper, which fails
        for fut in [quick, *pending]:
            exc = fut.exception(timeout=30)
            assert isinstance(exc, PoolBroken) and "injected" in str(exc.__cause__), repr(exc)
        with pytest.raises(PoolBroken):
            pool.submit(pool_tasks.square, 1)
        pool.close()
        assert pool.join(10)
        assert len([r for r in caplog.records if "broken" in r.getMessage()]) == 1
        assert client.submit(pool_tasks.square, 5).result(timeout=30) == 25  # the client is not ours
    finally:
        release.touch()
