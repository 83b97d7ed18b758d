"""Faults every pool must survive without leaving anyone waiting: a failure in
the thread and greenlet pools' own bookkeeping (injected into their queue),
``task_timeout`` on threads and greenlets, and Ctrl-C in a caller that waits
on a result (a real SIGINT to a real process group; every pool, DaskPool's
LocalCluster included, serves on). ProcessPool's own faults are in
``test_pool_process_faults``; the cases every pool shares are in the
conformance suite.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pool_tasks
import pytest
from support.pools import made_pools

from muxpool import PoolBroken, TaskTimeout, ThreadPool
from muxpool.pools.queued import THREADS, Runtime

pytestmark = pytest.mark.timeout(60)

TESTS = os.path.dirname(os.path.abspath(__file__))


class FragileQueue(queue.Queue):
    """A task queue that raises once, on the next take after ``arm()`` (fault injection)."""

    def __init__(self):
        super().__init__()
        self.armed = threading.Event()

    def get_nowait(self):
        if self.armed.is_set():
            self.armed.clear()
            raise RuntimeError("injected bookkeeping failure")
        return super().get_nowait()


class FragileThreadPool(ThreadPool):
    runtime = Runtime(make_queue=FragileQueue, make_semaphore=THREADS.make_semaphore,
                      make_event=THREADS.make_event, start_worker=THREADS.start_worker)


@pytest.fixture
def thread_pools():
    yield from made_pools(ThreadPool, 10)


def test_a_bookkeeping_failure_breaks_the_thread_pool(thread_pools, caplog):
    pool = thread_pools(1, pool_class=FragileThreadPool)
    gate, entered = threading.Event(), threading.Event()
    running = pool.submit(lambda: (entered.set(), gate.wait(30))[1])
    queued = [pool.submit(pool_tasks.square, i) for i in range(3)]
    calls = []
    pool.run(pool_tasks.square, (4,), lambda ok, value: calls.append((ok, value)))
    assert entered.wait(10)
    pool._queue.armed.set()
    gate.set()  # the worker finishes, takes the next task: the queue raises
    assert running.result(timeout=10) is True
    for fut in queued:
        exc = fut.exception(timeout=10)
        assert isinstance(exc, PoolBroken) and "injected" in str(exc.__cause__), repr(exc)
    assert calls and calls[0][0] is False and isinstance(calls[0][1], PoolBroken)
    with pytest.raises(PoolBroken):
        pool.submit(pool_tasks.square, 1)
    pool.close()
    assert pool.join(5)
    assert len([r for r in caplog.records if "broken" in r.getMessage()]) == 1


# --- task_timeout on threads and greenlets ------------------------------------------------


def test_thread_pool_task_timeout_fails_the_future_at_the_deadline(thread_pools):
    pool = thread_pools(1)
    gate = threading.Event()
    t0 = time.monotonic()
    fut = pool.schedule(gate.wait, (30,), task_timeout=0.3)
    with pytest.raises(TaskTimeout) as info:
        fut.result(timeout=10)
    assert 0.25 <= time.monotonic() - t0 < 5
    assert info.value.timeout == 0.3
    # The stuck thread no longer counts: a fresh one serves, and join() does not wait for it.
    assert pool.submit(pool_tasks.square, 6).result(timeout=10) == 36
    stats = pool.stats()
    assert (stats.timed_out, stats.failed, stats.completed) == (1, 1, 1)
    calls = []
    pool.run(gate.wait, (30,), lambda ok, value: calls.append((ok, value)), task_timeout=0.2)
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls and calls[0][0] is False and isinstance(calls[0][1], TaskTimeout)
    pool.close()
    assert pool.join(5)
    gate.set()


def test_thread_pool_wide_task_timeout_spares_quick_tasks(thread_pools):
    pool = thread_pools(2, task_timeout=0.3)
    gate = threading.Event()
    slow = pool.submit(gate.wait, 30)
    quick = [pool.submit(pool_tasks.square, i) for i in range(20)]
    assert [f.result(timeout=10) for f in quick] == [i * i for i in range(20)]
    assert isinstance(slow.exception(timeout=10), TaskTimeout)
    gate.set()


def test_gevent_pool_task_timeout_interrupts_the_greenlet():
    gevent = pytest.importorskip("gevent")
    from muxpool import GeventPool

    pool = GeventPool(1, task_timeout=0.3)
    try:
        t0 = time.monotonic()
        fut = pool.submit(gevent.sleep, 30)
        with pytest.raises(TaskTimeout):
            fut.result(timeout=10)
        assert time.monotonic() - t0 < 5
        assert pool.schedule(gevent.sleep, (0.01,), task_timeout=5).result(timeout=10) is None
        assert pool.submit(pool_tasks.square, 3).result(timeout=10) == 9
        assert pool.stats().timed_out == 1
        assert pool.stats().workers == 1  # the same greenlet serves on
    finally:
        pool.terminate()
        assert pool.join(10)


# --- Ctrl-C while the caller waits ------------------------------------------------------------

INTERRUPTED = """
import pathlib, signal, sys, time
# A shell that runs a job in the background starts it with SIGINT ignored, and
# Python then keeps it so: this test is about Ctrl-C, so Ctrl-C must raise here.
signal.signal(signal.SIGINT, signal.default_int_handler)
import pool_tasks
kind, tmp = sys.argv[1], pathlib.Path(sys.argv[2])
started, release = tmp / "started", tmp / "release"
import muxpool
if kind == "dask":
    pool = muxpool.DaskPool(n_workers=2)
else:
    pool = getattr(muxpool, {"thread": "ThreadPool", "process": "ProcessPool",
                             "gevent": "GeventPool"}[kind])(2)
assert pool.submit(pool_tasks.square, 2).result(timeout=60) == 4
if kind == "gevent":
    import gevent.event
    gate = gevent.event.Event()
    fut = pool.submit(gate.wait, 60)
    pool.submit(pool_tasks.square, 1).result(timeout=10)  # the waiter greenlet has started
else:
    fut = pool.submit(pool_tasks.block_on_files, str(started), str(release), 60)
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
try:
    print("waiting", flush=True)  # inside the try: the SIGINT may come at once
    fut.result(timeout=60)
    print("not interrupted", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
gate.set() if kind == "gevent" else release.touch()
assert pool.submit(pool_tasks.square, 3).result(timeout=30) == 9
if kind == "dask":
    assert list(pool.map(pool_tasks.getpid, range(2))), "the cluster has workers"
    assert sum(pool.client.nthreads().values()) == 2, pool.client.nthreads()
print("usable", flush=True)
pool.close()
assert pool.join(30)
print("closed", flush=True)
"""


def _lines(stream, into):
    for line in stream:
        into.put(line.strip())
    into.put(None)


@pytest.mark.parametrize("kind", ["thread", "process", "gevent", "dask"])
def test_ctrl_c_while_waiting_leaves_the_pool_usable(kind, tmp_path):
    pytest.importorskip({"gevent": "gevent", "dask": "distributed"}.get(kind, "os"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    # A session of its own: the SIGINT goes to its whole process group, as a terminal's Ctrl-C does.
    child = subprocess.Popen([sys.executable, "-c", INTERRUPTED, kind, str(tmp_path)], env=env,
                             start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(child.stdout, lines), daemon=True).start()
    seen = []

    def expect(wanted, timeout):
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {wanted!r} within {timeout} s; output: {seen}")
            if line is None:
                pytest.fail(f"exited before {wanted!r}; output: {seen}")
            seen.append(line)
            if line == wanted:
                return

    try:
        expect("waiting", 45)
        os.killpg(child.pid, signal.SIGINT)
        expect("interrupted", 10)
        expect("usable", 30)
        expect("closed", 30)
        assert child.wait(15) == 0, seen
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait(10)
        child.stdout.close()
