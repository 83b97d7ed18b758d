"""``muxpool.Pool`` against the standard library's own ``multiprocessing.Pool`` usage.

Two sources: the examples of the ``multiprocessing`` documentation, run as
scripts with only their import changed (their functions live in the script's
``__main__``, as a user's would), and a port of the essential cases of
CPython's ``_TestPool``, ``_TestPoolWorkerErrors`` and
``_TestPoolWorkerLifetime`` (Lib/test/_test_multiprocessing.py). Where
muxpool differs on purpose (``SerializationError`` for ``MaybeEncodingError``,
its own ``RemoteTraceback``) the port says so.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
import traceback
import weakref
from concurrent.futures import CancelledError

import pool_tasks
import pytest

from muxpool import Pool, SerializationError, WorkerCrashed
from muxpool.errors import RemoteTraceback

pytestmark = pytest.mark.timeout(60)

TESTS = os.path.dirname(os.path.abspath(__file__))
TIMEOUT1 = 0.1
sqr, mul, identity = pool_tasks.sqr, pool_tasks.mul, pool_tasks.identity


# --- the documentation's examples, with only the import changed -----------------------------

DOCS_EXAMPLES = {
    "introduction": """
        from muxpool import Pool   # was: from multiprocessing import Pool

        def f(x):
            return x*x

        if __name__ == '__main__':
            with Pool(5) as p:
                print(p.map(f, [1, 2, 3]))
        """,
    "using-a-pool-of-workers": """
        from muxpool import Pool   # was: from multiprocessing import Pool, TimeoutError
        from multiprocessing import TimeoutError
        import time
        import os

        def f(x):
            return x*x

        if __name__ == '__main__':
            # start 4 worker processes
            with Pool(processes=4) as pool:

                # print "[0, 1, 4,..., 81]"
                print(pool.map(f, range(10)))

                # print same numbers in arbitrary order
                for i in pool.imap_unordered(f, range(10)):
                    print(i)

                # evaluate "f(20)" asynchronously
                res = pool.apply_async(f, (20,))      # runs in *only* one process
                print(res.get(timeout=1))             # prints "400"

                # evaluate "os.getpid()" asynchronously
                res = pool.apply_async(os.getpid, ()) # runs in *only* one process
                print(res.get(timeout=1))             # prints the PID of that process

                # launching multiple evaluations asynchronously *may* use more processes
                multiple_results = [pool.apply_async(os.getpid, ()) for i in range(4)]
                print([res.get(timeout=1) for res in multiple_results])

                # make a single worker sleep for 10 seconds
                res = pool.apply_async(time.sleep, (10,))
                try:
                    print(res.get(timeout=1))
                except TimeoutError:
                    print("We lacked patience and got a multiprocessing.TimeoutError")

                print("For the moment, the pool remains available for more work")

            # exiting the 'with'-block has stopped the pool
            print("Now the pool is closed and no longer available")
        """,
    "pool-examples": """
        import multiprocessing
        import random
        import time
        from muxpool import Pool   # was: multiprocessing.Pool below

        def calculate(func, args):
            result = func(*args)
            return '%s says that %s%s = %s' % (
                multiprocessing.current_process().name, func.__name__, args, result)

        def calculatestar(args):
            return calculate(*args)

        def mul(a, b):
            time.sleep(0.01 * random.random())
            return a * b

        def plus(a, b):
            time.sleep(0.01 * random.random())
            return a + b

        if __name__ == '__main__':
            with Pool(4) as pool:
                TASKS = [(mul, (i, 7)) for i in range(10)] + [(plus, (i, 8)) for i in range(10)]
                results = [pool.apply_async(calculate, t) for t in TASKS]
                imap_it = pool.imap(calculatestar, TASKS)
                imap_unordered_it = pool.imap_unordered(calculatestar, TASKS)
                ordered = [r.get() for r in results]
                assert [x.split(' says that ')[1] for x in ordered] == [
                    x.split(' says that ')[1] for x in imap_it]
                assert sorted(x.split(' says that ')[1] for x in ordered) == sorted(
                    x.split(' says that ')[1] for x in imap_unordered_it)
                assert len(pool.map(calculatestar, TASKS, chunksize=5)) == 20
                print(ordered[0].split(' says that ')[1])
        """,
}

EXPECTED = {
    "introduction": "[1, 4, 9]\n",
    "using-a-pool-of-workers": None,  # checked line by line below
    "pool-examples": "mul(0, 7) = 0\n",
}


@pytest.mark.parametrize("name", list(DOCS_EXAMPLES))
def test_documentation_example(name, tmp_path):
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(DOCS_EXAMPLES[name]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    if EXPECTED[name] is not None:
        assert out.stdout == EXPECTED[name]
        return
    lines = out.stdout.splitlines()
    assert lines[0] == str([x * x for x in range(10)])
    assert sorted(int(x) for x in lines[1:11]) == [x * x for x in range(10)]
    assert lines[11] == "400"
    assert lines[14] == "We lacked patience and got a multiprocessing.TimeoutError"
    assert lines[-1] == "Now the pool is closed and no longer available"


# --- a port of CPython's _TestPool ------------------------------------------------------------


class SayWhenError(ValueError):
    pass


def exception_throwing_generator(total, when):
    if when == -1:
        raise SayWhenError("Somebody said when")
    for i in range(total):
        if i == when:
            raise SayWhenError("Somebody said when")
        yield i


@pytest.fixture(scope="module")
def pool():
    p = Pool(4)
    try:
        yield p
    finally:
        p.terminate()
        p.join()


def test_apply(pool):
    assert pool.apply(sqr, (5,)) == 25
    assert pool.apply(sqr, (), {"x": 3}) == 9


def test_map(pool):
    assert pool.map(sqr, list(range(10))) == [x * x for x in range(10)]
    assert pool.map(sqr, list(range(100)), chunksize=20) == [x * x for x in range(100)]


def test_starmap(pool):
    tuples = list(zip(range(10), range(9, -1, -1)))
    assert pool.starmap(mul, tuples) == list(itertools.starmap(mul, tuples))
    tuples = list(zip(range(100), range(99, -1, -1)))
    assert pool.starmap(mul, tuples, chunksize=20) == list(itertools.starmap(mul, tuples))


def test_starmap_async(pool):
    tuples = list(zip(range(100), range(99, -1, -1)))
    assert pool.starmap_async(mul, tuples).get() == list(itertools.starmap(mul, tuples))


def test_map_async(pool):
    assert pool.map_async(sqr, list(range(10))).get() == [x * x for x in range(10)]


def test_map_async_callbacks(pool):
    call_args = []
    pool.map_async(int, ["1"], callback=call_args.append, error_callback=call_args.append).wait()
    assert call_args == [[1]]  # the callback ran before wait() returned
    pool.map_async(int, ["a"], callback=call_args.append, error_callback=call_args.append).wait()
    assert len(call_args) == 2 and isinstance(call_args[1], ValueError)


def test_map_unpicklable(pool):
    class A:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    # multiprocessing raises the RuntimeError itself; muxpool wraps it (it is the __cause__).
    with pytest.raises(SerializationError) as info:
        pool.map(sqr, [A()] * 10)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_map_chunksize(pool):
    assert pool.map_async(sqr, [], chunksize=1).get(timeout=TIMEOUT1) == []


def test_map_handle_iterable_exception(pool):
    with pytest.raises(SayWhenError):
        pool.map(sqr, exception_throwing_generator(1, -1), 1)
    with pytest.raises(SayWhenError):  # again, make sure it is reentrant
        pool.map(sqr, exception_throwing_generator(1, -1), 1)
    with pytest.raises(SayWhenError):
        pool.map(sqr, exception_throwing_generator(10, 3), 1)

    class SpecialIterable:
        def __iter__(self):
            return self

        def __next__(self):
            raise SayWhenError

        def __len__(self):
            return 1

    for _ in range(2):
        with pytest.raises(SayWhenError):
            pool.map(sqr, SpecialIterable(), 1)


def test_async(pool):
    res = pool.apply_async(sqr, (7, TIMEOUT1))
    t0 = time.monotonic()
    assert res.get() == 49
    assert time.monotonic() - t0 < TIMEOUT1 + 5


def test_async_timeout():
    p = Pool(3)
    try:
        res = p.apply_async(sqr, (6, 30))
        t0 = time.monotonic()
        with pytest.raises(multiprocessing.TimeoutError):
            res.get(timeout=0.2)
        assert 0.15 < time.monotonic() - t0 < 5
    finally:
        p.terminate()
        p.join()


def test_imap(pool):
    assert list(pool.imap(sqr, list(range(10)))) == [x * x for x in range(10)]
    it = pool.imap(sqr, list(range(10)))
    for i in range(10):
        assert next(it) == i * i
    with pytest.raises(StopIteration):
        it.__next__()
    it = pool.imap(sqr, list(range(1000)), chunksize=100)
    for i in range(1000):
        assert next(it) == i * i
    with pytest.raises(StopIteration):
        it.__next__()


def test_imap_next_with_a_timeout(pool):
    it = pool.imap(sqr, [1], chunksize=1)
    assert it.next(timeout=10) == 1
    slow = pool.imap(pool_tasks.sleep_then_return, [30])
    with pytest.raises(multiprocessing.TimeoutError):
        slow.next(timeout=0.1)


def test_imap_handle_iterable_exception(pool):
    it = pool.imap(sqr, exception_throwing_generator(1, -1), 1)
    pytest.raises(SayWhenError, it.__next__)
    it = pool.imap(sqr, exception_throwing_generator(1, -1), 1)  # reentrant
    pytest.raises(SayWhenError, it.__next__)

    it = pool.imap(sqr, exception_throwing_generator(10, 3), 1)
    for i in range(3):
        assert next(it) == i * i
    pytest.raises(SayWhenError, it.__next__)

    # SayWhenError seen at the start of the problematic chunk's results
    it = pool.imap(sqr, exception_throwing_generator(20, 7), 2)
    for i in range(6):
        assert next(it) == i * i
    pytest.raises(SayWhenError, it.__next__)
    it = pool.imap(sqr, exception_throwing_generator(20, 7), 4)
    for i in range(4):
        assert next(it) == i * i
    pytest.raises(SayWhenError, it.__next__)


def test_imap_unordered(pool):
    assert sorted(pool.imap_unordered(sqr, list(range(10)))) == [x * x for x in range(10)]
    assert sorted(pool.imap_unordered(sqr, list(range(1000)), chunksize=100)) == [
        x * x for x in range(1000)]


def test_imap_unordered_handle_iterable_exception(pool):
    it = pool.imap_unordered(sqr, exception_throwing_generator(1, -1), 1)
    pytest.raises(SayWhenError, it.__next__)
    it = pool.imap_unordered(sqr, exception_throwing_generator(1, -1), 1)
    pytest.raises(SayWhenError, it.__next__)

    for total, when, chunksize in [(10, 3, 1), (20, 7, 2)]:
        it = pool.imap_unordered(sqr, exception_throwing_generator(total, when), chunksize)
        expected = [x * x for x in range(total)]
        with pytest.raises(SayWhenError):
            for _ in range(total):
                value = next(it)
                assert value in expected
                expected.remove(value)


def test_make_pool():
    pytest.raises(ValueError, Pool, -1)
    pytest.raises(ValueError, Pool, 0)
    p = Pool(3)
    try:
        assert p._processes == 3
    finally:
        p.close()
        p.join()


def test_terminate():
    # Slow tasks that would take "forever": terminate() and join() must still return at once.
    p = Pool(3)
    result = p.map_async(time.sleep, [30] * 1_000, chunksize=1)
    t0 = time.monotonic()
    p.terminate()
    p.join()
    assert time.monotonic() - t0 < 10
    with pytest.raises(CancelledError):  # multiprocessing leaves it pending for ever
        result.get(timeout=10)


def test_empty_iterable():
    p = Pool(1)
    assert p.map(sqr, []) == []
    assert list(p.imap(sqr, [])) == []
    assert list(p.imap_unordered(sqr, [])) == []
    assert p.map_async(sqr, []).get() == []
    p.close()
    p.join()


def test_context():
    values = list(range(10))
    with Pool(2) as p:
        r = p.map_async(sqr, values)
        assert r.get() == [sqr(i) for i in values]
    p.join()
    pytest.raises(ValueError, p.map_async, sqr, values)


def test_traceback(capsys):
    with Pool(1) as p:
        with pytest.raises(RuntimeError) as info:
            p.apply(pool_tasks.traceback_raiser)
    p.join()
    exc = info.value
    assert type(exc) is RuntimeError and exc.args == (123,)
    # multiprocessing's cause is multiprocessing.pool.RemoteTraceback (.tb); muxpool's has .text.
    assert type(exc.__cause__) is RemoteTraceback
    assert "raise RuntimeError(123)  # some comment" in exc.__cause__.text
    printed = "".join(traceback.format_exception(exc))
    assert "raise RuntimeError(123)  # some comment" in printed
    with Pool(1) as p:  # the input's own exception is not made remote
        with pytest.raises(SayWhenError) as info:
            p.map(sqr, exception_throwing_generator(1, -1), 1)
        assert info.value.__cause__ is None
    p.join()


def test_wrapped_exception():
    with Pool(1) as p:
        with pytest.raises(RuntimeError):
            p.apply(pool_tasks.traceback_raiser)
    p.join()


def test_map_no_failfast():
    t0 = time.monotonic()
    with pytest.raises(ValueError):
        with Pool(2) as p:
            try:
                p.map(pool_tasks.raise_large_valuerror, [0, 0.3])
            finally:
                p.close()
                p.join()
    assert time.monotonic() - t0 > 0.25  # join() waited for every job


class CountedObject:
    pass


def test_release_task_refs(pool):
    objs = [CountedObject() for _ in range(10)]
    refs = [weakref.ref(o) for o in objs]
    pool.map(identity, objs)
    del objs
    deadline = time.monotonic() + 5
    while any(r() is not None for r in refs) and time.monotonic() < deadline:
        time.sleep(0.01)  # the supervisor drops its last references after delivering
    assert {r() for r in refs} == {None}


def test_enter():
    p = Pool(1)
    with p:
        pass
    with pytest.raises(ValueError):  # bpo-35477: __enter__ fails if the pool is not running
        with p:
            pass
    p.join()


def test_join_while_running_is_a_value_error():
    p = Pool(1)
    try:
        pytest.raises(ValueError, p.join)
    finally:
        p.terminate()
        p.join()


# --- _TestPoolWorkerErrors and _TestPoolWorkerLifetime ------------------------------------------


def test_async_error_callback_runs_before_get_returns(pool):
    scratchpad = [None]

    def errback(exc):
        scratchpad[0] = exc

    res = pool.apply_async(pool_tasks.raising, error_callback=errback)
    pytest.raises(KeyError, res.get)
    assert isinstance(scratchpad[0], KeyError)


def test_callback_runs_before_get_returns(pool):
    for i in range(5):
        got = []
        slowly = lambda value: (time.sleep(0.02), got.append(value))  # noqa: E731 - lets get() race it
        assert pool.apply_async(sqr, (i,), callback=slowly).get(timeout=10) == i * i
        assert got == [i * i]


def test_unpickleable_result(pool):
    # multiprocessing: MaybeEncodingError; muxpool: SerializationError. Workers survive either way.
    for _ in range(20):
        scratchpad = [None]
        res = pool.apply_async(pool_tasks.unpickleable_result,
                               error_callback=lambda exc: scratchpad.__setitem__(0, exc))
        pytest.raises(SerializationError, res.get)
        assert isinstance(scratchpad[0], SerializationError)


def test_pool_worker_lifetime():
    p = Pool(3, maxtasksperchild=10)
    try:
        results = [p.apply_async(pool_tasks.getpid) for _ in range(100)]
        pids = {r.get(timeout=30) for r in results}
        assert len(pids) >= 10  # 100 tasks, at most 10 per worker
    finally:
        p.close()
        p.join()


def test_pool_worker_lifetime_early_close():
    p = Pool(3, maxtasksperchild=1)
    results = [p.apply_async(sqr, (i, 0.3)) for i in range(6)]
    p.close()
    p.join()
    assert [r.get() for r in results] == [sqr(j) for j in range(6)]


@pytest.mark.parametrize("value", [0, -1, 0.5, "12"])
def test_pool_maxtasksperchild_invalid(value):
    with pytest.raises(ValueError):
        Pool(3, maxtasksperchild=value)


# --- what muxpool adds ------------------------------------------------------------------------------


def test_a_dying_worker_fails_its_task_instead_of_hanging(pool):
    # multiprocessing.Pool waits forever here (bpo-22393).
    res = pool.apply_async(pool_tasks.exit_hard, (3,))
    pytest.raises(WorkerCrashed, res.get, 20)
    assert pool.map(sqr, range(5)) == [0, 1, 4, 9, 16]


def test_imap_results_keep_coming_after_close():
    p = Pool(2)
    it = p.imap(sqr, range(50))
    p.close()
    assert list(it) == [x * x for x in range(50)]
    p.join()
