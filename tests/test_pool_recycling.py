"""Worker recycling on real processes: ``max_worker_memory`` (RSS) and
``max_tasks_per_worker``, and the stats that count recycled and crashed workers.

A leaking task keeps a block of written pages in a module-level list of its
worker (``recycling_tasks.hold``), so the worker's RSS really passes the mark.
The mark sits well above a fresh worker's RSS (about 22 MiB here), checked by
each test before it relies on it.
"""

from __future__ import annotations

import os
import time

import pytest
import recycling_tasks as tasks
from support.pools import made_pools
from support.processes import process_exists
from support.waiting import wait_for

from muxpool import Pool, ProcessPool, TaskTimeout, WorkerCrashed
from muxpool.pools._memory import parse_size

pytestmark = pytest.mark.timeout(60)

MARK = 96 * tasks.MIB
LEAK_MIB = 128  # one leak passes the mark on its own
HALF_LEAK_MIB = 60  # a fresh worker stays under the mark after one, passes it after two


@pytest.fixture
def make_pool():
    yield from made_pools(ProcessPool, 10)


def fresh_worker(pool) -> tuple[int, int]:
    pid, rss = pool.submit(tasks.pid_and_rss).result(timeout=15)
    assert rss < MARK, f"a fresh worker already uses {rss} bytes; the test's mark is {MARK}"
    return pid, rss


def test_a_worker_over_the_mark_is_replaced_after_its_task(make_pool):
    pool = make_pool(1, max_worker_memory=MARK)
    first_pid, _ = fresh_worker(pool)
    leak = pool.submit(tasks.hold, LEAK_MIB)
    behind = [pool.submit(tasks.pid_and_rss) for _ in range(4)]  # queued behind the leak
    leak_pid, leak_rss = leak.result(timeout=15)  # the task that pushed it over is delivered
    assert leak_pid == first_pid and leak_rss > MARK
    later = [f.result(timeout=15) for f in behind]
    assert {pid for pid, _ in later} != {first_pid}
    assert all(pid != first_pid and rss < MARK for pid, rss in later), later
    assert len({pid for pid, _ in later}) == 1  # one replacement, which stays under the mark
    wait_for(lambda: not process_exists(first_pid), 10, what="the retired worker to exit")
    stats = pool.stats()
    assert (stats.recycled, stats.crashed, stats.failed) == (1, 0, 0)
    assert stats.submitted == stats.completed == 6 and stats.workers == 1


def test_a_worker_under_the_mark_serves_on(make_pool):
    pool = make_pool(1, max_worker_memory="1GiB")
    pid, _ = fresh_worker(pool)
    assert {p for p, _ in pool.map(tasks.pid_and_rss, range(50))} == {pid}
    assert pool.stats().recycled == 0


def test_memory_used_and_given_back_recycles_nothing(make_pool):
    """The mark is on the RSS a task leaves behind, not on the peak: the worker's
    peak passes it here, so its exact RSS is read, and found under the mark."""
    pool = make_pool(1, max_worker_memory=MARK)
    pid, _ = fresh_worker(pool)
    for _ in range(3):
        spiked_pid, rss_after = pool.submit(tasks.spike, LEAK_MIB).result(timeout=15)
        assert spiked_pid == pid and rss_after < MARK
    assert pool.submit(tasks.pid_and_rss).result(timeout=15)[0] == pid
    assert pool.stats().recycled == 0


def test_many_recycles_lose_no_task(make_pool):
    """Two workers that each pass the mark every other task: every future resolves,
    in its own order, and each leak's worker is replaced."""
    pool = make_pool(2, max_worker_memory=MARK)
    fresh_worker(pool)
    futures = [pool.submit(tasks.hold, HALF_LEAK_MIB) for _ in range(12)]
    results = [f.result(timeout=30) for f in futures]
    pids = [pid for pid, _ in results]
    assert max(pids.count(p) for p in set(pids)) <= 2, pids  # the second leak passes the mark
    stats = pool.stats()
    assert stats.completed == stats.submitted == 13 and stats.failed == 0
    assert stats.recycled == len({p for p, rss in results if rss > MARK}) >= 5
    assert stats.crashed == 0


def test_muxpool_pool_takes_max_worker_memory():
    with Pool(1, max_worker_memory=MARK) as pool:
        pid, _ = pool.apply(tasks.pid_and_rss)
        assert pool.apply(tasks.hold, (LEAK_MIB,))[0] == pid
        assert pool.apply(tasks.pid_and_rss)[0] != pid
        assert pool.stats().recycled == 1


def test_max_tasks_per_worker_counts_as_recycling(make_pool):
    pool = make_pool(1, max_tasks_per_worker=2)
    pids = [pool.submit(os.getpid).result(timeout=15) for _ in range(6)]
    assert len(set(pids)) == 3
    assert pool.stats().recycled == 3 and pool.stats().crashed == 0


def test_a_worker_that_dies_counts_as_crashed_and_a_timeout_does_not(make_pool):
    pool = make_pool(1)
    with pytest.raises(WorkerCrashed):
        pool.submit(os._exit, 3).result(timeout=15)
    with pytest.raises(TaskTimeout):
        pool.schedule(time.sleep, (30,), task_timeout=0.5).result(timeout=15)
    assert pool.submit(os.getpid).result(timeout=15) > 0
    stats = pool.stats()
    assert (stats.crashed, stats.timed_out, stats.recycled) == (1, 1, 0)
    assert stats.submitted == 3 and stats.failed == 2


@pytest.mark.parametrize("value, expected", [
    (1000, 1000), ("1000", 1000), ("200MB", 200_000_000), ("200 mb", 200_000_000),
    ("1.5GiB", 3 << 29), ("64KiB", 65536), ("1kB", 1000), (None, None),
])
def test_sizes(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["200M", "lots", "-5MB", 0, -1, True, 1.5e9, "1e9"])
def test_sizes_refused(value):
    with pytest.raises(ValueError, match="max_worker_memory"):
        ProcessPool(1, max_worker_memory=value)


