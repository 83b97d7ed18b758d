"""One conformance suite for every pool (design habits 5 and 9).

Every test takes ``pool_factory``, parametrized over the pool kinds; a new
pool joins the suite by adding its name to ``KINDS`` and a line to
``PoolKit``. The kit makes pools, tracks them and always terminates and joins
them at teardown, even when the test failed.

The kit also hides what differs between kinds so the tests read the same:

* ``kit.blocker()`` gives a task that blocks until released (a
  ``threading.Event``, a ``gevent.event.Event``, or a file barrier in
  ``tmp_path`` for processes) plus ``wait_started`` and ``release``;
* ``kit.spawn(fn, *args)`` runs a caller concurrently: a thread, or a
  greenlet for gevent (gevent objects belong to one thread);
* ``kit.sleep``/``kit.wait_until`` poll with a deadline without blocking the
  gevent hub.

Tasks given to pools live in ``pool_tasks`` so worker processes can import them.

Dask: a ``LocalCluster`` takes a while to start, so the module shares one per
thread count (``dask_clients``): each test gets its own ``DaskPool`` on a
shared client, and ``kit(1)`` a one-thread cluster so "one worker" means one
(``kit(n)`` for n > 2 gets two). Dask runs the whole suite: its blockers are
file barriers, as for processes, and ``stats()``' busy/queued split and the
failed/cancelled split at ``terminate()`` follow the rule documented in
``muxpool.pools.dask`` (the oldest in-flight tasks, one per thread, count as
running).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from concurrent.futures import CancelledError, Future

import pool_tasks
import pytest

import muxpool
from muxpool.errors import PoolClosed, QueueFull

pytestmark = pytest.mark.timeout(60)

KINDS = ["thread", "process", "gevent", "dask"]

POOL_CLASS = {"thread": "ThreadPool", "process": "ProcessPool", "gevent": "GeventPool",
              "dask": "DaskPool"}

#: How long a blocker task waits for its release before giving up on its own.
BLOCK_LIMIT = 30.0


# --- the kit -------------------------------------------------------------------


class EventBlocker:
    """A task that blocks on an Event (threading or gevent) until released."""

    def __init__(self, event_cls):
        self._started = event_cls()
        self._release = event_cls()
        self.func = self._task
        self.args = ()

    def _task(self):
        self._started.set()
        if not self._release.wait(BLOCK_LIMIT):
            raise TimeoutError("blocker was never released")
        return "released"

    def wait_started(self, timeout=10.0) -> bool:
        return bool(self._started.wait(timeout))

    def release(self) -> None:
        self._release.set()


class FileBlocker:
    """A task that blocks, in a worker process, until a file exists."""

    def __init__(self, kit, directory, n):
        self._kit = kit
        self._started = directory / f"blocker-{n}.started"
        self._release = directory / f"blocker-{n}.release"
        self.func = pool_tasks.block_on_files
        self.args = (str(self._started), str(self._release), BLOCK_LIMIT)

    def wait_started(self, timeout=10.0) -> bool:
        return self._kit.wait_until(self._started.exists, timeout, fail=False)

    def release(self) -> None:
        self._release.touch()


class ThreadHandle:
    def __init__(self, fn, args):
        self._result = None
        self._error = None
        self._thread = threading.Thread(target=self._main, args=(fn, args), daemon=True)
        self._thread.start()

    def _main(self, fn, args):
        try:
            self._result = fn(*args)
        except BaseException as exc:  # re-raised in join()
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"still running after {timeout} s"
        if self._error is not None:
            raise self._error
        return self._result


class GreenletHandle:
    def __init__(self, fn, args):
        import gevent

        self._greenlet = gevent.spawn(fn, *args)

    def done(self) -> bool:
        return self._greenlet.ready()

    def join(self, timeout):
        self._greenlet.join(timeout)
        assert self._greenlet.ready(), f"still running after {timeout} s"
        return self._greenlet.get()


class PoolKit:
    """Makes pools of one kind and cleans them up; callable like the pool class."""

    def __init__(self, kind, tmp_path, dask_clients=None):
        self.kind = kind
        self._dask_clients = dask_clients
        self.tmp_path = tmp_path
        self.pools = []
        self.blockers = []
        self.pool_class = getattr(muxpool, POOL_CLASS[kind])
        if kind == "gevent":
            import gevent
            import gevent.event

            self._gevent = gevent
        # 8 submitters x this many tasks in the exactly-once test.
        self.per_submitter = {"thread": 10_000, "process": 500, "gevent": 10_000, "dask": 200}[kind]
        # terminate() must return within this (spec: 100 ms; processes and Dask get slack).
        self.terminate_bound = {"thread": 0.1, "process": 0.5, "gevent": 0.1, "dask": 0.5}[kind]

    def __call__(self, max_workers=2, max_queue=None, **kwargs):
        if self.kind == "dask":
            # A pool of its own on a shared cluster with max_workers threads (at most 2).
            client = self._dask_clients(min(max_workers, 2))
            pool = self.pool_class(max_queue=max_queue, client=client, **kwargs)
        else:
            pool = self.pool_class(max_workers, max_queue, **kwargs)
        self.pools.append(pool)
        return pool

    # concurrency helpers that do not block the gevent hub

    def sleep(self, seconds):
        if self.kind == "gevent":
            self._gevent.sleep(seconds)
        else:
            time.sleep(seconds)

    def pause(self):
        """Let other submitters run (greenlets only switch when asked)."""
        if self.kind == "gevent":
            self._gevent.sleep(0)

    def wait_until(self, predicate, timeout=10.0, what="condition", fail=True) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                if fail:
                    pytest.fail(f"timed out after {timeout} s waiting for {what}")
                return False
            self.sleep(0.005)
        return True

    def stays(self, predicate, duration=0.2, what="condition"):
        """Assert ``predicate`` holds throughout ``duration`` (for "does not happen")."""
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            assert predicate(), what
            self.sleep(0.01)
        assert predicate(), what

    def spawn(self, fn, *args):
        if self.kind == "gevent":
            return GreenletHandle(fn, args)
        return ThreadHandle(fn, args)

    def blocker(self):
        if self.kind in ("process", "dask"):
            b = FileBlocker(self, self.tmp_path, len(self.blockers))
        elif self.kind == "gevent":
            b = EventBlocker(self._gevent.event.Event)
        else:
            b = EventBlocker(threading.Event)
        self.blockers.append(b)
        return b

    def teardown(self):
        for b in self.blockers:
            b.release()
        problems = []
        for pool in self.pools:
            try:
                pool.terminate()
            except Exception as exc:
                problems.append(f"terminate() raised {exc!r}")
            try:
                if not pool.join(10):
                    problems.append(f"{pool!r}: join(10) returned False after terminate()")
            except Exception as exc:
                problems.append(f"join() raised {exc!r}")
        assert not problems, problems


@pytest.fixture(scope="module")
def dask_clients():
    """``clients(n)``: a Dask client on a shared LocalCluster of ``n`` one-thread
    worker processes, started on first use; all are closed when the module ends."""
    distributed = pytest.importorskip("distributed")
    from muxpool.pools.dask import LOOPBACK_HTTP

    started = {}

    def client_for(n):
        if n not in started:
            cluster = distributed.LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None, scheduler_kwargs=LOOPBACK_HTTP)
            try:
                started[n] = (cluster, distributed.Client(cluster, set_as_default=False))
            except BaseException:
                cluster.close()
                raise
        return started[n][1]

    try:
        yield client_for
    finally:
        for cluster, client in started.values():
            client.close()
            cluster.close()


@pytest.fixture(params=KINDS)
def pool_factory(request, tmp_path):
    if request.param == "gevent":
        pytest.importorskip("gevent")
    clients = request.getfixturevalue("dask_clients") if request.param == "dask" else None
    kit = PoolKit(request.param, tmp_path, clients)
    try:
        yield kit
    finally:
        kit.teardown()


def squares(n):
    return [i * i for i in range(n)]


# --- submit / schedule / run ------------------------------------------------------


def test_submit_returns_a_future_with_the_result(pool_factory):
    pool = pool_factory(2)
    fut = pool.submit(pool_tasks.add, 2, 3)
    assert isinstance(fut, Future)
    assert fut.result(timeout=10) == 5
    futs = [pool.submit(pool_tasks.square, i) for i in range(20)]
    assert [f.result(timeout=10) for f in futs] == squares(20)


def test_submit_passes_every_keyword_to_the_function(pool_factory):
    pool = pool_factory(2)
    fut = pool.submit(pool_tasks.echo, 1, 2, func="f", timeout=3, callback="cb", task_timeout=4)
    assert fut.result(timeout=10) == (
        (1, 2), {"func": "f", "timeout": 3, "callback": "cb", "task_timeout": 4})


def test_schedule_passes_args_and_kwargs(pool_factory):
    pool = pool_factory(2)
    assert pool.schedule(pool_tasks.echo).result(timeout=10) == ((), {})
    fut = pool.schedule(pool_tasks.echo, (1, "a"), {"timeout": 2}, timeout=5)
    assert isinstance(fut, Future)
    assert fut.result(timeout=10) == ((1, "a"), {"timeout": 2})
    assert pool.schedule(pool_tasks.add, [4, 5]).result(timeout=10) == 9


def test_run_calls_the_callback_once_with_success_and_result(pool_factory):
    pool = pool_factory(2)
    calls = []
    assert pool.run(pool_tasks.add, (2, 3), lambda ok, result: calls.append((ok, result))) is None
    pool_factory.wait_until(lambda: calls, what="the run callback")
    pool.close()
    assert pool.join(10)
    assert calls == [(True, 5)]


# --- map / imap_unordered -------------------------------------------------------------


def test_map_returns_results_in_input_order(pool_factory):
    pool = pool_factory(3)
    assert list(pool.map(pool_tasks.square, range(30))) == squares(30)
    assert list(pool.map(pool_tasks.square, range(100), chunksize=7)) == squares(100)
    assert list(pool.map(pool_tasks.add, range(10), range(100, 110))) == [
        a + b for a, b in zip(range(10), range(100, 110))]
    # Like the builtin: stops at the shortest iterable; nothing in, nothing out.
    assert list(pool.map(pool_tasks.add, range(5), range(3))) == [0, 2, 4]
    assert list(pool.map(pool_tasks.square, [])) == []
    assert list(pool.map(pool_tasks.square, [], chunksize=7)) == []


def test_imap_unordered_gives_the_same_multiset(pool_factory):
    pool = pool_factory(3)
    items = [i % 7 for i in range(100)]  # duplicates on purpose
    expected = collections.Counter(x * x for x in items)
    assert collections.Counter(pool.imap_unordered(pool_tasks.square, items)) == expected
    assert collections.Counter(
        pool.imap_unordered(pool_tasks.square, items, chunksize=7)) == expected
    assert sorted(pool.imap_unordered(pool_tasks.add, range(10), range(10))) == list(
        range(0, 20, 2))
    assert list(pool.imap_unordered(pool_tasks.square, [])) == []


def test_map_raises_a_task_exception_when_iteration_reaches_it(pool_factory):
    pool = pool_factory(2)
    got = []
    it = pool.map(pool_tasks.fail_on, range(10), itertools.repeat(3))
    with pytest.raises(ValueError, match="bad item 3"):
        for value in it:
            got.append(value)
    assert got == [0, 1, 4]
    # The pool is still fine afterwards.
    assert list(pool.map(pool_tasks.square, range(5))) == squares(5)


def test_imap_unordered_raises_a_task_exception(pool_factory):
    pool = pool_factory(2)
    with pytest.raises(ValueError, match="bad item 3"):
        list(pool.imap_unordered(pool_tasks.fail_on, range(10), itertools.repeat(3)))
    assert sorted(pool.imap_unordered(pool_tasks.square, range(5))) == squares(5)


def test_map_over_an_endless_generator_is_lazy(pool_factory):
    pool = pool_factory(2)
    pulled = [0]

    def endless():
        for i in itertools.count():
            pulled[0] = i + 1
            yield i

    assert list(itertools.islice(pool.map(pool_tasks.square, itertools.count()), 50)) == squares(50)
    it = pool.map(pool_tasks.square, endless())
    assert list(itertools.islice(it, 50)) == squares(50)

    def bounded():
        s = pool.stats()
        return pulled[0] < 1000 and s.queued < 1000 and s.completed < 1000

    # Nothing keeps pulling from the generator behind our back.
    pool_factory.stays(bounded, 0.2, what=f"map pulled {pulled[0]} items / stats {pool.stats()}")
    close = getattr(it, "close", None)
    if close is not None:
        close()
    assert pool.submit(pool_tasks.square, 9).result(timeout=10) == 81


def test_imap_unordered_over_an_endless_generator_is_lazy(pool_factory):
    pool = pool_factory(2)
    pulled = [0]

    def endless():
        for i in itertools.count():
            pulled[0] = i + 1
            yield i

    it = pool.imap_unordered(pool_tasks.identity, endless())
    got = list(itertools.islice(it, 50))
    assert len(set(got)) == 50
    pool_factory.stays(lambda: pulled[0] < 1000 and pool.stats().queued < 1000, 0.2,
                       what=f"imap_unordered pulled {pulled[0]} items")
    close = getattr(it, "close", None)
    if close is not None:
        close()


# --- exceptions ---------------------------------------------------------------------


def test_exceptions_propagate_with_type_and_message(pool_factory):
    pool = pool_factory(2)
    exc = pool.submit(pool_tasks.fail, "boom").exception(timeout=10)
    assert type(exc) is ValueError
    assert str(exc) == "boom"
    with pytest.raises(ValueError, match="^boom$"):
        pool.submit(pool_tasks.fail, "boom").result(timeout=10)
    exc = pool.submit(pool_tasks.fail_custom, "custom").exception(timeout=10)
    assert type(exc) is pool_tasks.TaskError
    assert exc.args == ("custom",)

    calls = []
    pool.run(pool_tasks.fail, ("via run",), lambda ok, result: calls.append((ok, result)))
    pool_factory.wait_until(lambda: calls, what="the run callback")
    [(ok, result)] = calls
    assert ok is False
    assert type(result) is ValueError
    assert str(result) == "via run"


# --- callbacks -----------------------------------------------------------------------


def test_callbacks_fire_exactly_once_under_concurrent_submitters(pool_factory):
    kit = pool_factory
    submitters, per = 8, kit.per_submitter
    total = submitters * per
    pool = kit(4)
    lock = threading.Lock()
    counts = collections.Counter()
    failures = []

    def callback(ok, result):
        with lock:
            if ok:
                counts[result] += 1
            else:
                failures.append(result)

    def submit_all(s):
        for i in range(per):
            pool.run(pool_tasks.identity, (s * per + i,), callback)
            if i % 50 == 0:
                kit.pause()

    handles = [kit.spawn(submit_all, s) for s in range(submitters)]
    for h in handles:
        h.join(50)
    pool.close()
    assert pool.join(50)
    kit.wait_until(lambda: sum(counts.values()) + len(failures) >= total, 20,
                   what="every callback")
    assert failures == []
    assert len(counts) == total
    assert set(counts) == set(range(total))
    extra = {k: v for k, v in counts.items() if v != 1}
    assert extra == {}, f"callbacks fired more than once: {list(extra.items())[:10]}"
    assert sum(counts.values()) == total


def test_a_raising_callback_is_logged_and_the_pool_keeps_working(pool_factory, caplog):
    caplog.set_level(logging.DEBUG, logger="muxpool")
    pool = pool_factory(1)
    calls = []

    def bad_callback(ok, result):
        calls.append((ok, result))
        raise RuntimeError("callback exploded")

    for i in range(5):
        pool.run(pool_tasks.square, (i,), bad_callback)

    def logged():
        return [r for r in caplog.records
                if r.name.startswith("muxpool") and (
                    "callback exploded" in r.getMessage()
                    or (r.exc_info and "callback exploded" in str(r.exc_info[1])))]

    pool_factory.wait_until(lambda: len(calls) == 5 and len(logged()) >= 5,
                            what="5 callbacks and 5 log records")
    assert sorted(calls) == [(True, i * i) for i in range(5)]
    assert all(r.levelno >= logging.WARNING for r in logged())
    # The worker that delivered the exploding callbacks still serves.
    assert pool.submit(pool_tasks.square, 7).result(timeout=10) == 49
    good = []
    pool.run(pool_tasks.add, (1, 2), lambda ok, result: good.append((ok, result)))
    pool_factory.wait_until(lambda: good, what="a callback after the raising ones")
    assert good == [(True, 3)]


@pytest.mark.parametrize("raised", [SystemExit, KeyboardInterrupt, GeneratorExit])
def test_a_callback_raising_a_base_exception_is_logged_and_harms_nothing(pool_factory, caplog, raised):
    """SystemExit from a run callback, a future's done-callback or an
    apply_async callback: logged, the task's outcome delivered, the pool serves on."""
    caplog.set_level(logging.ERROR, logger="muxpool")
    pool = pool_factory(1)
    calls = []

    def bad(*args):
        calls.append(args)
        raise raised("from a callback")

    pool.run(pool_tasks.square, (2,), bad)
    fut = pool.submit(pool_tasks.square, 3)
    fut.add_done_callback(bad)
    applied = pool.apply_async(pool_tasks.square, (4,), callback=bad)
    pool_factory.wait_until(lambda: len(calls) == 3, what="the three callbacks")
    assert fut.result(timeout=10) == 9 and applied.get(timeout=10) == 16
    assert pool.submit(pool_tasks.square, 5).result(timeout=10) == 25
    pool_factory.wait_until(lambda: len([r for r in caplog.records if r.exc_info]) >= 3,
                            what="three logged callback errors")
    pool.close()
    assert pool.join(10)


def test_terminate_during_map_ends_the_map(pool_factory):
    kit = pool_factory
    pool = kit(2)
    seen = []

    def consume():
        try:
            for value in pool.map(pool_tasks.identity, itertools.count()):
                seen.append(value)
        except (CancelledError, PoolClosed) as exc:
            return exc
        return None

    consumer = kit.spawn(consume)
    kit.wait_until(lambda: len(seen) > 20, what="map to produce")
    pool.terminate()
    assert isinstance(consumer.join(10), (CancelledError, PoolClosed))
    assert pool.join(10)


def test_a_callback_may_submit_more_work(pool_factory):
    # The crawler pattern: each result schedules the next task from its callback.
    pool = pool_factory(2)
    results = []

    def callback(ok, result):
        results.append((ok, result))
        if ok and result < 20:
            pool.run(pool_tasks.add, (result, 1), callback)

    pool.run(pool_tasks.add, (0, 1), callback)
    pool_factory.wait_until(lambda: len(results) == 20, what="a chain of 20 callbacks")
    assert results == [(True, i) for i in range(1, 21)]


def test_cancelling_a_queued_future_skips_its_task(pool_factory):
    kit = pool_factory
    pool = kit(1)
    b = kit.blocker()
    running = pool.submit(b.func, *b.args)
    assert b.wait_started()
    first, doomed, last = (pool.submit(pool_tasks.square, i) for i in (2, 3, 4))
    assert doomed.cancel()
    b.release()
    assert running.result(timeout=10) == "released"
    assert (first.result(timeout=10), last.result(timeout=10)) == (4, 16)
    assert doomed.cancelled()
    kit.wait_until(lambda: (pool.stats().completed, pool.stats().cancelled) == (3, 1), 5,
                   what=f"completed=3 cancelled=1 (got {pool.stats()})")


# --- close / terminate / join --------------------------------------------------------------


def test_close_lets_queued_tasks_finish(pool_factory):
    pool = pool_factory(1)
    b = pool_factory.blocker()
    running = pool.submit(b.func, *b.args)
    assert b.wait_started()
    futs = [pool.submit(pool_tasks.square, i) for i in range(10)]
    calls = []
    for i in range(5):
        pool.run(pool_tasks.square, (i,), lambda ok, result: calls.append((ok, result)))
    pool.close()
    assert not any(f.cancelled() for f in futs)
    assert pool.join(0.05) is False  # a worker is still busy
    b.release()
    assert pool.join(20)
    assert running.result(timeout=0) == "released"
    assert [f.result(timeout=0) for f in futs] == squares(10)
    pool_factory.wait_until(lambda: len(calls) == 5, what="the run callbacks")
    assert sorted(calls) == [(True, i * i) for i in range(5)]
    assert pool.stats().workers == 0


def test_work_after_close_raises_pool_closed(pool_factory):
    pool = pool_factory(2)
    assert pool.submit(pool_tasks.square, 2).result(timeout=10) == 4
    pool.close()
    assert issubclass(PoolClosed, RuntimeError)
    with pytest.raises(PoolClosed):
        pool.submit(pool_tasks.square, 2)
    with pytest.raises(PoolClosed):
        pool.run(pool_tasks.square, (2,))
    with pytest.raises(PoolClosed):
        pool.schedule(pool_tasks.square, (2,))
    with pytest.raises(PoolClosed):
        pool.apply_async(pool_tasks.square, (2,))
    with pytest.raises(RuntimeError):  # what Executor users catch
        pool.submit(pool_tasks.square, 2)
    assert pool.join(10)


def test_work_after_terminate_raises_pool_closed(pool_factory):
    pool = pool_factory(2)
    pool.terminate()
    with pytest.raises(PoolClosed):
        pool.submit(pool_tasks.square, 2)
    with pytest.raises(PoolClosed):
        pool.run(pool_tasks.square, (2,), lambda ok, result: None)
    assert pool.join(10)


def test_terminate_cancels_queued_tasks_and_returns_fast(pool_factory):
    kit = pool_factory
    pool = kit(1)
    b = kit.blocker()
    running = pool.submit(b.func, *b.args)
    assert b.wait_started()
    futs = [pool.submit(pool_tasks.square, i) for i in range(10)]
    lock = threading.Lock()
    calls = []

    def callback(ok, result):
        with lock:
            calls.append((ok, result))

    for i in range(10):
        pool.run(pool_tasks.square, (i,), callback)

    t0 = time.monotonic()
    pool.terminate()
    elapsed = time.monotonic() - t0
    assert elapsed < kit.terminate_bound, f"terminate() took {elapsed:.3f} s"

    kit.wait_until(lambda: all(f.done() for f in futs), 5, what="queued futures to settle")
    assert all(f.cancelled() for f in futs), [f for f in futs if not f.cancelled()]
    kit.wait_until(lambda: len(calls) == 10, 5, what="10 run callbacks")
    assert all(ok is False and isinstance(result, CancelledError) for ok, result in calls), calls
    b.release()
    assert pool.join(10)
    assert running.done()
    with pytest.raises(PoolClosed):
        pool.submit(pool_tasks.square, 1)
    # Nothing more arrives later.
    assert len(calls) == 10


def test_context_manager_closes_and_joins(pool_factory):
    pool = pool_factory(2)
    calls = []
    with pool as entered:
        assert entered is pool
        futs = [pool.submit(pool_tasks.square, i) for i in range(20)]
        pool.run(pool_tasks.add, (1, 2), lambda ok, result: calls.append((ok, result)))
    assert all(f.done() for f in futs)
    assert [f.result(timeout=0) for f in futs] == squares(20)
    assert pool.stats().workers == 0
    with pytest.raises(PoolClosed):
        pool.submit(pool_tasks.square, 1)
    pool_factory.wait_until(lambda: calls, what="the run callback")
    assert calls == [(True, 3)]


def test_context_manager_joins_even_when_the_body_raises(pool_factory):
    pool = pool_factory(2)
    with pytest.raises(KeyError):
        with pool:
            fut = pool.submit(pool_tasks.square, 5)
            raise KeyError("body failed")
    assert fut.result(timeout=0) == 25
    assert pool.stats().workers == 0


def test_a_busy_worker_does_not_hold_up_work_the_others_can_do(pool_factory):
    # One worker is stuck on a long task; the other must run everything else
    # while it stays stuck (no task is parked behind the long one).
    pool = pool_factory(2)
    b = pool_factory.blocker()
    stuck = pool.submit(b.func, *b.args)
    assert b.wait_started()
    futs = [pool.submit(pool_tasks.square, i) for i in range(8)]
    pool_factory.wait_until(lambda: all(f.done() for f in futs), 5,
                            what=f"quick tasks while one worker is busy "
                                 f"({sum(not f.done() for f in futs)} still pending)")
    assert [f.result(timeout=0) for f in futs] == squares(8)
    assert not stuck.done()
    b.release()
    assert stuck.result(timeout=10) == "released"


# --- backpressure -------------------------------------------------------------------------


def test_a_full_queue_blocks_submitters_and_times_out_with_queue_full(pool_factory):
    kit = pool_factory
    pool = kit(1, 2)
    b = kit.blocker()
    running = pool.submit(b.func, *b.args)
    assert b.wait_started()
    # Two tasks wait in the queue; neither may block (schedule's timeout says so).
    queued = [pool.schedule(pool_tasks.square, (i,), timeout=5) for i in (1, 2)]

    third = kit.spawn(pool.submit, pool_tasks.square, 3)
    kit.stays(lambda: not third.done(), 0.2, what="a third submit returned while the queue was full")

    with pytest.raises(QueueFull) as info:
        pool.run(pool_tasks.square, (4,), timeout=0.05)
    assert info.value.max_queue == 2
    with pytest.raises(QueueFull):
        pool.schedule(pool_tasks.square, (4,), timeout=0.05)
    assert not third.done()

    b.release()
    fut3 = third.join(10)
    assert running.result(timeout=10) == "released"
    assert [f.result(timeout=10) for f in queued] == [1, 4]
    assert fut3.result(timeout=10) == 9


def test_a_blocked_submitter_is_released_by_terminate(pool_factory):
    kit = pool_factory
    pool = kit(1, 1)
    b = kit.blocker()
    pool.submit(b.func, *b.args)
    assert b.wait_started()
    pool.submit(pool_tasks.square, 1)
    waiting = kit.spawn(pool.submit, pool_tasks.square, 2)
    kit.stays(lambda: not waiting.done(), 0.1, what="submit returned while the queue was full")
    pool.terminate()
    kit.wait_until(waiting.done, 5, what="the blocked submit to return")
    try:
        fut = waiting.join(1)
    except PoolClosed:
        pass  # refused: terminate() refuses new work
    else:  # or it got in just before, and was cancelled with the rest of the queue
        kit.wait_until(fut.done, 5, what="the late task to settle")
        assert fut.cancelled()
    b.release()
    assert pool.join(10)


# --- stats ------------------------------------------------------------------------------------


def test_stats_counters_after_a_known_workload(pool_factory):
    kit = pool_factory
    pool = kit(1)
    s = pool.stats()
    for field in ("workers", "idle", "busy", "queued", "completed", "failed", "cancelled"):
        assert type(getattr(s, field)) is int, field
    assert (s.busy, s.queued, s.completed, s.failed, s.cancelled) == (0, 0, 0, 0, 0)

    ok = [pool.submit(pool_tasks.square, i) for i in range(10)]
    bad = [pool.submit(pool_tasks.fail, f"f{i}") for i in range(4)]
    for f in ok + bad:
        f.exception(timeout=10)

    def counters():
        s = pool.stats()
        return s.completed, s.failed, s.cancelled, s.queued, s.busy

    kit.wait_until(lambda: counters() == (10, 4, 0, 0, 0), 5, what="10 completed and 4 failed")
    assert counters() == (10, 4, 0, 0, 0)

    b = kit.blocker()
    pool.submit(b.func, *b.args)
    assert b.wait_started()
    waiting = [pool.submit(pool_tasks.square, i) for i in range(3)]
    kit.wait_until(lambda: (pool.stats().busy, pool.stats().queued) == (1, 3), 5,
                   what=f"busy=1 queued=3 (got {pool.stats()})")
    s = pool.stats()
    assert (s.workers, s.idle, s.busy, s.queued) == (1, 0, 1, 3)

    pool.terminate()
    kit.wait_until(lambda: pool.stats().cancelled == 3, 5, what="3 cancelled")
    assert all(f.cancelled() for f in waiting)
    b.release()
    assert pool.join(10)
    s = pool.stats()
    assert s.cancelled == 3
    assert s.queued == 0 and s.busy == 0
    # The blocker either finished (threads, greenlets) or was killed (processes).
    assert (s.completed, s.failed) in ((11, 4), (10, 5))


# --- multiprocessing.Pool compatibility ---------------------------------------------------


def test_apply_and_apply_async(pool_factory):
    pool = pool_factory(2)
    assert pool.apply(pool_tasks.add, (2, 3)) == 5
    assert pool.apply(pool_tasks.echo, (1,), {"k": 2}) == ((1,), {"k": 2})
    assert pool.apply(pool_tasks.echo, kwds={"k": 2}) == ((), {"k": 2})
    with pytest.raises(ValueError, match="apply failed"):
        pool.apply(pool_tasks.fail, ("apply failed",))

    got, errors = [], []
    r = pool.apply_async(pool_tasks.square, (6,), callback=got.append,
                         error_callback=errors.append)
    assert isinstance(r, concurrent.futures.Future)
    assert r.get(timeout=10) == 36
    r.wait(timeout=1)
    assert r.ready() and r.successful()
    assert r.result(timeout=0) == 36
    pool_factory.wait_until(lambda: got == [36], what="apply_async callback")

    r2 = pool.apply_async(pool_tasks.fail, ("nope",), callback=got.append,
                          error_callback=errors.append)
    r2.wait(timeout=10)
    assert r2.ready()
    assert not r2.successful()
    with pytest.raises(ValueError, match="nope"):
        r2.get(timeout=10)
    pool_factory.wait_until(lambda: len(errors) == 1, what="apply_async error_callback")
    assert type(errors[0]) is ValueError and str(errors[0]) == "nope"
    assert got == [36]

    r3 = pool.apply_async(pool_tasks.echo, kwds={"a": 1})
    assert r3.get(timeout=10) == ((), {"a": 1})


def test_apply_async_callbacks_run_before_get_returns(pool_factory):
    """multiprocessing.Pool's order: the callback has run when get() returns."""
    pool = pool_factory(2)

    def slowly(into):
        # The callback takes a while (and lets other threads run): get() must still wait for it.
        return lambda value: (time.sleep(0.02), into.append(value))

    for i in range(5):
        got, errors = [], []
        assert pool.apply_async(pool_tasks.square, (i,), callback=slowly(got)).get(timeout=10) == i * i
        assert got == [i * i]
        bad = pool.apply_async(pool_tasks.fail, ("no",), error_callback=slowly(errors))
        with pytest.raises(ValueError):
            bad.get(timeout=10)
        assert len(errors) == 1 and isinstance(errors[0], ValueError)


def test_apply_async_ready_and_wait_on_a_pending_task(pool_factory):
    pool = pool_factory(1)
    b = pool_factory.blocker()
    pool.submit(b.func, *b.args)
    assert b.wait_started()
    r = pool.apply_async(pool_tasks.square, (5,))
    assert not r.ready()
    r.wait(timeout=0.05)  # returns (no exception) even though the task has not run
    assert not r.ready()
    b.release()
    assert r.get(timeout=10) == 25
    assert r.ready() and r.successful()


# --- ThreadPool specifics ------------------------------------------------------------------


@pytest.fixture
def thread_pools():
    pools = []

    def make(*args, **kwargs):
        pool = muxpool.ThreadPool(*args, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.terminate()
        pool.join(10)


def _poll(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_thread_pool_is_lazy(thread_pools):
    before = threading.active_count()
    pool = thread_pools(4)
    assert pool.stats().workers == 0
    assert threading.active_count() <= before
    # Sequential tasks: a worker is idle each time, so one thread is enough.
    for i in range(10):
        assert pool.submit(pool_tasks.square, i).result(timeout=10) == i * i
        assert _poll(lambda: pool.stats().busy == 0)
    assert pool.stats().workers == 1


def test_thread_pool_grows_only_to_max_workers(thread_pools):
    pool = thread_pools(2)
    release = threading.Event()
    started = threading.Semaphore(0)

    def block():
        started.release()
        return release.wait(BLOCK_LIMIT)

    futs = [pool.submit(block) for _ in range(2)]
    assert started.acquire(timeout=10) and started.acquire(timeout=10)
    extra = [pool.submit(pool_tasks.square, i) for i in range(5)]
    s = pool.stats()
    assert (s.workers, s.busy, s.idle, s.queued) == (2, 2, 0, 5)
    release.set()
    assert [f.result(timeout=10) for f in futs] == [True, True]
    assert [f.result(timeout=10) for f in extra] == squares(5)
    assert pool.stats().workers <= 2


def test_thread_pool_idle_workers_exit_after_idle_timeout(thread_pools):
    pool = thread_pools(3, idle_timeout=0.2)
    release = threading.Event()
    futs = [pool.submit(release.wait, BLOCK_LIMIT) for _ in range(3)]
    assert _poll(lambda: pool.stats().busy == 3)
    assert pool.stats().workers == 3
    release.set()
    assert all(f.result(timeout=10) for f in futs)
    assert _poll(lambda: pool.stats().workers == 0), pool.stats()
    # A new task after they all left starts a fresh worker.
    assert pool.submit(pool_tasks.square, 6).result(timeout=10) == 36
    assert pool.stats().workers == 1
