"""ProcessPool-only behaviour: crashes, timeouts, serialization, recycling,
terminate, shared state, and multiprocessing.Pool-style code.

Workers start with "forkserver", so every task is a module-level function in
``pool_tasks``. Cross-process synchronisation uses files in ``tmp_path`` or
``multiprocessing`` objects handed over by the initializer; the only sleeps
are inside tasks (as their "work") or in deadline-bounded poll loops.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pool_tasks
import pytest
from support.pools import made_pools
from support.waiting import wait_for

from muxpool import ProcessPool
from muxpool.errors import (
    PoolClosed,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    TaskTimeout,
    WorkerCrashed,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def make_pool():
    yield from made_pools(ProcessPool, 10)


def pid_alive(pid: int) -> bool:
    """False once the process is gone or only a zombie is left."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def assert_pool_serves(pool):
    assert pool.submit(pool_tasks.square, 7).result(timeout=10) == 49
    assert list(pool.map(pool_tasks.square, range(10))) == [i * i for i in range(10)]


# --- a dying worker fails only its own task -------------------------------------------

CRASHES = {
    "os._exit": (pool_tasks.exit_hard, (3,), {"exitcode": 3, "signal": None}),
    "SIGKILL": (pool_tasks.kill_self, (), {"exitcode": None, "signal": signal.SIGKILL}),
    "segfault": (pool_tasks.segfault, (), {"exitcode": None, "signal": signal.SIGSEGV}),
}


@pytest.mark.parametrize("how", list(CRASHES))
def test_a_dying_worker_fails_only_its_own_task(make_pool, how):
    func, args, expected = CRASHES[how]
    pool = make_pool(2)
    crash = pool.submit(func, *args)
    others = [pool.submit(pool_tasks.sleep_then_return, 0.02, i) for i in range(8)]

    exc = crash.exception(timeout=20)
    assert isinstance(exc, WorkerCrashed), repr(exc)
    assert exc.exitcode == expected["exitcode"]
    assert exc.signal == expected["signal"]
    assert [f.result(timeout=20) for f in others] == list(range(8))

    wait_for(lambda: pool.stats().workers == 2, 10, what="the worker to be replaced")
    assert_pool_serves(pool)
    s = pool.stats()
    assert s.failed == 1
    assert s.completed == 8 + 1 + 10


def test_a_crash_reported_through_run_callback(make_pool):
    pool = make_pool(1)
    calls = []
    pool.run(pool_tasks.exit_hard, (3,), lambda ok, result: calls.append((ok, result)))
    wait_for(lambda: calls, 20, what="the crash callback")
    [(ok, exc)] = calls
    assert ok is False
    assert isinstance(exc, WorkerCrashed) and exc.exitcode == 3
    assert_pool_serves(pool)


def test_repeated_crashes_never_wedge_the_pool(make_pool):
    pool = make_pool(2)
    crashes = [pool.submit(pool_tasks.exit_hard, 3) for _ in range(6)]
    goods = [pool.submit(pool_tasks.square, i) for i in range(6)]
    assert all(isinstance(f.exception(timeout=30), WorkerCrashed) for f in crashes)
    assert [f.result(timeout=30) for f in goods] == [i * i for i in range(6)]
    wait_for(lambda: pool.stats().workers == 2, 10, what="workers to be replaced")
    assert_pool_serves(pool)


# --- task timeouts ---------------------------------------------------------------------


def test_pool_wide_task_timeout(make_pool):
    pool = make_pool(2, task_timeout=0.5)
    slow = pool.submit(pool_tasks.sleep_then_return, 30, "late")
    quick = [pool.submit(pool_tasks.square, i) for i in range(5)]
    with pytest.raises(TaskTimeout) as info:
        slow.result(timeout=15)
    assert info.value.timeout == 0.5
    assert isinstance(info.value, TimeoutError)
    assert [f.result(timeout=10) for f in quick] == [i * i for i in range(5)]
    # A task within the limit is untouched.
    assert pool.submit(pool_tasks.sleep_then_return, 0.05, "ok").result(timeout=10) == "ok"
    wait_for(lambda: pool.stats().workers == 2, 10, what="the worker to be replaced")
    assert_pool_serves(pool)
    assert pool.stats().timed_out == 1


def test_per_task_timeout_via_schedule_and_run(make_pool):
    pool = make_pool(1)
    fut = pool.schedule(pool_tasks.sleep_then_return, (30, "late"), task_timeout=0.3)
    with pytest.raises(TaskTimeout) as info:
        fut.result(timeout=15)
    assert info.value.timeout == 0.3

    calls = []
    pool.run(pool_tasks.sleep_then_return, (30,), lambda ok, result: calls.append((ok, result)),
             task_timeout=0.3)
    wait_for(lambda: calls, 15, what="the timeout callback")
    [(ok, exc)] = calls
    assert ok is False and isinstance(exc, TaskTimeout)

    # No limit on other tasks of the same pool.
    assert pool.schedule(pool_tasks.sleep_then_return, (0.4, "fine")).result(timeout=10) == "fine"
    wait_for(lambda: pool.stats().workers == 1, 10, what="the worker to be replaced")
    assert_pool_serves(pool)


def test_task_timeout_counts_run_time_not_time_in_the_queue(make_pool):
    # Four 0.2 s tasks on one worker: the last waits 0.6 s in the queue, yet
    # each runs well within its 0.5 s limit.
    pool = make_pool(1, task_timeout=0.5)
    futs = [pool.submit(pool_tasks.sleep_then_return, 0.2, i) for i in range(4)]
    assert [f.result(timeout=15) for f in futs] == [0, 1, 2, 3]


# --- exceptions keep the worker's traceback ----------------------------------------------


def test_a_worker_exception_keeps_the_remote_traceback(make_pool):
    pool = make_pool(1)
    exc = pool.submit(pool_tasks.raise_deep).exception(timeout=10)
    assert type(exc) is ValueError
    assert str(exc) == "raised deep in the worker"
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback), repr(cause)
    assert "_deep_helper_for_traceback" in cause.text
    assert "raise_deep" in cause.text
    assert "raised deep in the worker" in cause.text

    calls = []
    pool.run(pool_tasks.raise_deep, (), lambda ok, result: calls.append((ok, result)))
    wait_for(lambda: calls, what="the run callback")
    [(ok, exc)] = calls
    assert ok is False and isinstance(exc.__cause__, RemoteTraceback)
    assert "_deep_helper_for_traceback" in exc.__cause__.text


def test_an_unpicklable_exception_becomes_remote_error(make_pool):
    pool = make_pool(1)
    exc = pool.submit(pool_tasks.raise_unpicklable_error).exception(timeout=10)
    assert isinstance(exc, RemoteError), repr(exc)
    assert exc.type_name.endswith("UnpicklableError")
    assert "carries a lock" in str(exc)
    assert_pool_serves(pool)


# --- serialization -------------------------------------------------------------------------


@pytest.mark.parametrize("arg", [lambda: 1, threading.Lock()], ids=["lambda", "lock"])
def test_unpicklable_arguments_fail_the_future(make_pool, arg):
    pool = make_pool(1)
    fut = pool.submit(pool_tasks.identity, arg)
    exc = fut.exception(timeout=10)
    assert isinstance(exc, SerializationError), repr(exc)
    assert exc.what == "arguments"
    assert_pool_serves(pool)


def test_an_unpicklable_function_fails_the_future(make_pool):
    pool = make_pool(1)
    exc = pool.submit(lambda: 1).exception(timeout=10)
    assert isinstance(exc, SerializationError), repr(exc)
    assert_pool_serves(pool)


def test_an_argument_that_cannot_be_unpickled_in_the_worker_fails_the_future(make_pool):
    # Pickles fine in the parent; unpickling it in the worker raises.
    pool = make_pool(1)
    exc = pool.submit(pool_tasks.identity, pool_tasks.Unloadable()).exception(timeout=10)
    assert isinstance(exc, SerializationError), repr(exc)
    assert exc.what == "arguments", str(exc)
    assert_pool_serves(pool)


def test_unpicklable_arguments_reach_the_run_callback(make_pool):
    pool = make_pool(1)
    calls = []
    pool.run(pool_tasks.identity, (threading.Lock(),), lambda ok, result: calls.append((ok, result)))
    wait_for(lambda: calls, what="the run callback")
    [(ok, exc)] = calls
    assert ok is False and isinstance(exc, SerializationError) and exc.what == "arguments"
    assert_pool_serves(pool)


def test_an_unpicklable_result_fails_the_future(make_pool):
    pool = make_pool(1)
    exc = pool.submit(pool_tasks.return_lock).exception(timeout=10)
    assert isinstance(exc, SerializationError), repr(exc)
    assert exc.what == "result"
    assert_pool_serves(pool)


def test_a_result_that_cannot_be_unpickled_fails_the_future(make_pool):
    pool = make_pool(1)
    exc = pool.submit(pool_tasks.return_unloadable).exception(timeout=10)
    assert isinstance(exc, SerializationError), repr(exc)
    assert exc.what == "result"
    assert_pool_serves(pool)


def test_bad_payloads_in_map_fail_only_their_items(make_pool):
    pool = make_pool(2)
    futs = [pool.submit(pool_tasks.identity, threading.Lock() if i == 3 else i) for i in range(8)]
    results = [f.exception(timeout=10) or f.result() for f in futs]
    assert isinstance(results[3], SerializationError)
    assert results[:3] + results[4:] == [0, 1, 2, 4, 5, 6, 7]


# --- recycling ----------------------------------------------------------------------------------


def test_max_tasks_per_worker_recycles_workers(make_pool):
    pool = make_pool(1, max_tasks_per_worker=2)
    pids = [pool.submit(pool_tasks.getpid).result(timeout=10) for _ in range(10)]
    assert len(set(pids)) >= 5, pids
    assert max(pids.count(p) for p in set(pids)) <= 2, pids
    assert os.getpid() not in pids
    assert list(pool.map(pool_tasks.square, range(20))) == [i * i for i in range(20)]


# --- terminate kills running workers ----------------------------------------------------------


def test_terminate_kills_a_running_worker(make_pool, tmp_path):
    pool = make_pool(1)
    pid_file = tmp_path / "worker.pid"
    running = pool.submit(pool_tasks.write_pid_then_sleep, str(pid_file), 30)
    queued = [pool.submit(pool_tasks.square, i) for i in range(3)]
    wait_for(pid_file.exists, 15, what="the task to start")
    pid = int(pid_file.read_text())
    assert pid_alive(pid)

    t0 = time.monotonic()
    pool.terminate()
    elapsed = time.monotonic() - t0
    assert elapsed < 0.5, f"terminate() took {elapsed:.3f} s"
    assert pool.join(5)
    wait_for(lambda: not pid_alive(pid), 5, what=f"worker {pid} to disappear")
    assert all(f.cancelled() for f in queued)
    wait_for(running.done, 5, what="the killed task's future to settle")
    assert running.cancelled() or running.exception(timeout=0) is not None
    assert pool.stats().workers == 0
    with pytest.raises(PoolClosed):
        pool.submit(pool_tasks.square, 1)


def test_close_then_join_stops_every_worker_process(make_pool, tmp_path):
    pool = make_pool(2)
    release = tmp_path / "release"
    started = [tmp_path / f"started-{i}" for i in range(2)]
    # Two tasks that both must be running before either ends: two workers.
    futs = [pool.submit(pool_tasks.block_on_files, str(s), str(release), 30) for s in started]
    wait_for(lambda: all(s.exists() for s in started), 15, what="both tasks to start")
    pids = {int(s.read_text()) for s in started}
    assert len(pids) == 2
    pool.close()
    release.touch()
    assert pool.join(10)
    assert [f.result(timeout=0) for f in futs] == ["released", "released"]
    for pid in pids:
        wait_for(lambda: not pid_alive(pid), 5, what=f"worker {pid} to exit")
    assert pool.stats().workers == 0


# --- shared state through the initializer ----------------------------------------------------------


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("method", ["forkserver", "fork"])
def test_shared_array_and_lock_through_initializer(make_pool, method):
    ctx = multiprocessing.get_context(method)
    array = ctx.Array("i", 10)
    lock = ctx.Lock()
    kwargs = {"initializer": pool_tasks.init_shared, "initargs": (array, lock)}
    if method != "forkserver":  # forkserver is the pool's default
        kwargs["mp_context"] = method
    pool = make_pool(2, **kwargs)
    assert all(pool.submit(pool_tasks.initialized).result(timeout=20) for _ in range(4))
    futs = [pool.submit(pool_tasks.increment_shared, i % 10, 50) for i in range(40)]
    assert sorted(f.result(timeout=20) for f in futs) == sorted(i % 10 for i in range(40))
    assert list(array) == [200] * 10
    assert sum(array) == 40 * 50


def test_initializer_runs_in_replacement_workers(make_pool):
    ctx = multiprocessing.get_context("forkserver")
    array, lock = ctx.Array("i", 10), ctx.Lock()
    pool = make_pool(1, initializer=pool_tasks.init_shared, initargs=(array, lock))
    assert isinstance(pool.submit(pool_tasks.exit_hard, 3).exception(timeout=20), WorkerCrashed)
    assert pool.submit(pool_tasks.initialized).result(timeout=20) is True
    assert pool.submit(pool_tasks.increment_shared, 0, 5).result(timeout=20) == 0
    assert array[0] == 5


# --- ProcessPool keeps multiprocessing.Pool's apply/apply_async (muxpool.Pool is the full drop-in) ---


def test_multiprocessing_pool_style_code():
    from muxpool import ProcessPool as Pool  # its multiprocessing-style subset; muxpool.Pool is the drop-in

    got, errors = [], []
    with Pool(2) as pool:
        assert pool.apply(pool_tasks.add, (2, 3)) == 5
        assert pool.apply(pool_tasks.echo, (1,), {"k": 2}) == ((1,), {"k": 2})
        r = pool.apply_async(pool_tasks.square, (4,), callback=got.append,
                             error_callback=errors.append)
        bad = pool.apply_async(pool_tasks.fail, ("nope",), callback=got.append,
                               error_callback=errors.append)
        assert r.get(timeout=10) == 16
        r.wait(10)
        assert r.ready() and r.successful()
        bad.wait(10)
        assert bad.ready() and not bad.successful()
        with pytest.raises(ValueError, match="nope"):
            bad.get(timeout=10)
        many = [pool.apply_async(pool_tasks.square, (i,), callback=got.append)
                for i in range(10)]
        assert [m.get(timeout=10) for m in many] == [i * i for i in range(10)]
        assert list(pool.map(pool_tasks.square, range(10))) == [i * i for i in range(10)]
        assert sorted(pool.imap_unordered(pool_tasks.square, range(10), chunksize=3)) == [
            i * i for i in range(10)]
    wait_for(lambda: len(got) == 11 and len(errors) == 1, what="the callbacks")
    assert sorted(got) == sorted([16] + [i * i for i in range(10)])
    assert type(errors[0]) is ValueError and str(errors[0]) == "nope"
    assert pool.stats().workers == 0
