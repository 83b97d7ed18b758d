"""ProcessPool: every way it could leave a caller waiting forever, each with a bound.

A supervisor failure (injected) breaks the pool with one ``PoolBroken``; a
failing or hanging initializer, unpicklable initargs, results that cannot be
unpickled (even with ``SystemExit``), a 500 MB result, and the parent being
SIGKILLed all end in a clear outcome within seconds. Tasks live in
``pool_tasks``; processes a test starts are stopped at teardown.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pool_tasks
import pytest
from support.pools import made_pools
from support.waiting import wait_for

from muxpool import PoolBroken, ProcessPool, SerializationError, WorkerCrashed
from muxpool.errors import PoolClosed

pytestmark = pytest.mark.timeout(60)

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def make_pool():
    yield from made_pools(ProcessPool, 10)


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")


# --- a failure in the pool's own machinery -------------------------------------------


class FragilePool(ProcessPool):
    """A ProcessPool whose supervisor fails on the next result once armed (fault injection)."""

    def __init__(self, *args, **kwargs):
        self.armed = threading.Event()
        super().__init__(*args, **kwargs)

    def _on_results(self, key, mask, settled):
        if self.armed.is_set():
            raise RuntimeError("injected supervisor failure")
        super()._on_results(key, mask, settled)


def test_a_supervisor_failure_breaks_the_pool_and_fails_every_task(make_pool, tmp_path, caplog):
    pool = make_pool(1, pool_class=FragilePool)
    assert pool.submit(pool_tasks.square, 3).result(timeout=20) == 9
    worker_pid = pool.submit(pool_tasks.getpid).result(timeout=10)
    started, release = tmp_path / "started", tmp_path / "release"
    running = pool.submit(pool_tasks.block_on_files, str(started), str(release))
    queued = [pool.submit(pool_tasks.square, i) for i in range(3)]
    calls = []
    pool.run(pool_tasks.square, (5,), lambda ok, value: calls.append((ok, value)))
    wait_for(started.exists, what="the blocker to start")
    pool.armed.set()
    release.touch()  # its result makes the supervisor fail

    for fut in [running, *queued]:
        exc = fut.exception(timeout=10)
        assert isinstance(exc, PoolBroken), repr(exc)
        assert isinstance(exc.__cause__, RuntimeError) and "injected" in str(exc.__cause__)
    wait_for(lambda: calls, what="the run callback")
    assert calls[0][0] is False and isinstance(calls[0][1], PoolBroken)
    with pytest.raises(PoolBroken):
        pool.submit(pool_tasks.square, 1)
    with pytest.raises(PoolBroken):
        pool.run(pool_tasks.square, (1,))
    pool.close()
    assert pool.join(5)
    pool.terminate()
    wait_for(lambda: gone(worker_pid), 5, what="the worker to be killed")
    broken_logs = [r for r in caplog.records if "broken" in r.getMessage()]
    assert len(broken_logs) == 1, [r.getMessage() for r in caplog.records]


# --- start-up ------------------------------------------------------------------------


def test_an_initializer_that_raises_is_named_in_the_error(make_pool):
    pool = make_pool(1, initializer=pool_tasks.init_raises, initargs=("no database",))
    exc = pool.submit(pool_tasks.square, 2).exception(timeout=20)
    assert isinstance(exc, WorkerCrashed), repr(exc)
    assert "initializer raised ValueError('no database')" in str(exc)
    assert "None" not in str(exc)
    assert isinstance(exc.__cause__, ValueError)


def test_an_initializer_that_hangs_meets_the_startup_timeout(make_pool):
    pool = make_pool(1, initializer=pool_tasks.init_hangs, initargs=(60,), startup_timeout=0.3)
    exc = pool.submit(pool_tasks.square, 2).exception(timeout=20)
    assert isinstance(exc, WorkerCrashed), repr(exc)
    assert "startup_timeout=0.3" in str(exc)


@pytest.mark.parametrize("initializer, initargs", [
    (pool_tasks.init_positional, (threading.Lock(),)),
    (lambda: None, ()),
], ids=["thread-lock", "lambda"])
def test_unpicklable_initargs_are_a_value_error_at_construction(initializer, initargs):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="cannot be pickled for 'forkserver' workers"):
        ProcessPool(1, initializer=initializer, initargs=initargs)
    assert time.monotonic() - t0 < 1.0


# --- results that misbehave in the parent ----------------------------------------------


def test_a_result_whose_unpickling_raises_system_exit_fails_that_task_only(make_pool, caplog):
    pool = make_pool(1)
    exc = pool.submit(pool_tasks.return_exit_on_unpickle).exception(timeout=10)
    assert isinstance(exc, SerializationError) and exc.what == "result", repr(exc)
    assert isinstance(exc.__cause__, SystemExit)
    assert any("cannot be unpickled" in r.getMessage() for r in caplog.records)
    assert pool.submit(pool_tasks.square, 4).result(timeout=10) == 16


def test_a_500_mb_result_arrives(make_pool):
    pool = make_pool(1)
    size = 500 * 2 ** 20
    assert len(pool.submit(pool_tasks.big_result, size).result(timeout=40)) == size
    assert pool.submit(pool_tasks.square, 4).result(timeout=10) == 16


def test_submit_after_close_raises_at_once(make_pool):
    pool = make_pool(1)
    pool.close()
    t0 = time.monotonic()
    with pytest.raises(PoolClosed):
        pool.submit(pool_tasks.square, 1)
    assert time.monotonic() - t0 < 0.5
    assert pool.join(10)


# --- the parent dies -------------------------------------------------------------------

PARENT = """
import sys, time, pool_tasks
from muxpool import ProcessPool
pool = ProcessPool(2)
started, release = sys.argv[1:3]
futs = [pool.submit(pool_tasks.block_on_files, f"{started}.{i}", release, 60) for i in range(2)]
print("submitted", flush=True)
time.sleep(60)
"""


def test_workers_do_not_outlive_a_sigkilled_parent(tmp_path):
    started, release = tmp_path / "started", tmp_path / "never"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(started), str(release)],
                              env=env, start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        marks = [tmp_path / f"started.{i}" for i in range(2)]
        wait_for(lambda: all(m.exists() for m in marks), 30, what="both workers to be busy")
        pids = [int(m.read_text()) for m in marks]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_for(lambda: all(gone(pid) for pid in pids), 10, what=f"workers {pids} to die")
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        parent.wait(10)
        parent.stdout.close()


def test_supervisor_failure_is_logged_once_at_error_level(make_pool, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="muxpool.pools.process")
    pool = make_pool(1, pool_class=FragilePool)
    pool.armed.set()
    exc = pool.submit(pool_tasks.square, 2).exception(timeout=20)
    assert isinstance(exc, PoolBroken), repr(exc)
    assert pool.join(5)
    assert [r.levelno for r in caplog.records if r.name == "muxpool.pools.process"] == [logging.ERROR]


# --- pickling errors that say what cannot be pickled and how to fix it ----------------------

FROM_DASH_C = """
import sys
from muxpool import ProcessPool, SerializationError
def sq(x):
    return x * x
with ProcessPool(1, mp_context=sys.argv[1] if len(sys.argv) > 1 else None) as pool:
    fut = pool.submit(sq, 3)
    exc = fut.exception(timeout=30)
    print(repr(exc) if exc else fut.result())
"""


def test_a_function_from_python_dash_c_is_explained():
    out = subprocess.run([sys.executable, "-c", FROM_DASH_C], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert "cannot pickle the task's function" in out.stdout
    assert "sq is defined in the __main__ of `python -c`" in out.stdout
    assert "mp_context='fork'" in out.stdout and "module" in out.stdout
    # ...and the fix it names works.
    fixed = subprocess.run([sys.executable, "-c", FROM_DASH_C, "fork"], capture_output=True, text=True,
                           timeout=50)
    assert fixed.stdout.strip() == "9", fixed.stderr


def test_a_lambda_and_a_closure_are_explained(make_pool):
    pool = make_pool(1)
    exc = pool.submit(lambda x: x, 1).exception(timeout=10)
    assert isinstance(exc, SerializationError) and exc.what == "function", repr(exc)
    assert "is a lambda" in str(exc) and "module level" in str(exc)

    def inner(x):
        return x

    exc = pool.submit(inner, 1).exception(timeout=10)
    assert isinstance(exc, SerializationError) and exc.what == "function", repr(exc)
    assert "closure" in str(exc) and "module level" in str(exc)


def test_an_unpicklable_argument_is_named(make_pool):
    pool = make_pool(1)
    exc = pool.schedule(pool_tasks.echo, (1, threading.Lock()), {"k": 2}).exception(timeout=10)
    assert isinstance(exc, SerializationError) and exc.what == "arguments", repr(exc)
    assert "argument 1 (lock)" in str(exc)
    exc = pool.schedule(pool_tasks.echo, (1,), {"k": threading.Lock()}).exception(timeout=10)
    assert "keyword argument 'k'" in str(exc)
