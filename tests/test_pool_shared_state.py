"""The lesson's shared state, made with the top-level ``multiprocessing`` API and
handed to ProcessPool's workers through ``initializer``/``initargs``, with the
pool's defaults: one test per kind of object, counting across workers, a
worker that crashed and was replaced included.

``multiprocessing.Lock()`` and friends belong to the default context (``fork``
on Linux up to 3.13); the pool adopts it when given no ``mp_context``, and
refuses them with a ``ValueError`` naming the fix when told to use another.
"""

from __future__ import annotations

import multiprocessing

import pool_tasks
import pytest
from support.pools import made_pools
from support.waiting import wait_for

from muxpool import ProcessPool, WorkerCrashed

pytestmark = [
    pytest.mark.timeout(60),
    # Python 3.12+ warns that forking a threaded process can deadlock: adopting fork is the point here.
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]


@pytest.fixture
def make_pool():
    yield from made_pools(ProcessPool, 10)


def run_across_a_crash(pool, func, calls, before_the_crash=lambda: None):
    """Half the calls, a crash (its worker is replaced), the other half; the worker pids seen."""
    half = len(calls) // 2
    pids = {f.result(timeout=30) for f in [pool.submit(func, *args) for args in calls[:half]]}
    before_the_crash()
    assert isinstance(pool.submit(pool_tasks.exit_hard, 3).exception(timeout=30), WorkerCrashed)
    pids |= {f.result(timeout=30) for f in [pool.submit(func, *args) for args in calls[half:]]}
    assert len(pids) >= 2, pids  # the replacement worker took part
    return pids


@pytest.mark.parametrize("make_lock", [multiprocessing.Lock, multiprocessing.RLock], ids=["Lock", "RLock"])
def test_array_and_lock(make_pool, make_lock):
    array, lock = multiprocessing.Array("i", 4), make_lock()
    pool = make_pool(2, initializer=pool_tasks.init_positional, initargs=(array, lock))
    run_across_a_crash(pool, pool_tasks.bump_array_under, [(i % 4, 25) for i in range(16)])
    assert list(array) == [100] * 4


def test_value(make_pool):
    value = multiprocessing.Value("i", 0)
    pool = make_pool(2, initializer=pool_tasks.init_positional, initargs=(value,))
    run_across_a_crash(pool, pool_tasks.bump_value, [(25,)] * 16)
    assert value.value == 400


def test_queue(make_pool):
    q = multiprocessing.Queue()
    pool = make_pool(2, initializer=pool_tasks.init_positional, initargs=(q,))
    got = []

    def take_the_first_half():
        # A Queue's put() is written by a feeder thread after it returns: a worker that
        # dies at once (the crash) may take an item with it. multiprocessing says so;
        # the pool is not what loses it. So the first half arrives before the crash.
        got.extend(q.get(timeout=10) for _ in range(10))
        # And the feeder lets go of the queue's shared write lock only after its item
        # is in the pipe: a worker killed in between holds it for good, and every
        # later put hangs ("a process killed while using a Queue" corrupts it, as the
        # docs warn). Once this process can take the lock, no feeder holds it.
        wait_for(lambda: q._wlock.acquire(timeout=0.01) and (q._wlock.release() or True),
                 what="the workers' queue feeders to let go of the queue's lock")

    pids = run_across_a_crash(pool, pool_tasks.put_on_queue, [(i,) for i in range(20)],
                              before_the_crash=take_the_first_half)
    got += [q.get(timeout=10) for _ in range(10)]
    assert sorted(item for item, _pid in got) == list(range(20))
    assert {pid for _item, pid in got} == pids
    q.close()
    q.join_thread()


def test_manager_dict_and_lock(make_pool):
    with multiprocessing.Manager() as manager:
        mapping, lock = manager.dict(), manager.Lock()
        pool = make_pool(2, initializer=pool_tasks.init_positional, initargs=(mapping, lock))
        run_across_a_crash(pool, pool_tasks.bump_dict, [("n", 10)] * 10)
        assert mapping["n"] == 100
        pool.terminate()
        assert pool.join(10)


def test_fork_only_objects_and_another_start_method_are_refused_with_the_fix():
    lock = multiprocessing.Lock()
    with pytest.raises(ValueError, match="mp_context='fork'") as info:
        ProcessPool(1, initializer=pool_tasks.init_positional, initargs=(lock,), mp_context="forkserver")
    assert "get_context('forkserver')" in str(info.value)


def test_objects_of_the_pool_start_method_keep_it(make_pool):
    ctx = multiprocessing.get_context("forkserver")
    array, lock = ctx.Array("i", 1), ctx.Lock()
    pool = make_pool(1, initializer=pool_tasks.init_positional, initargs=(array, lock))
    assert pool.submit(pool_tasks.bump_array_under, 0, 5).result(timeout=30)
    assert array[0] == 5
