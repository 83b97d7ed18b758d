"""Module-level task functions for the pool tests.

Worker processes are started with "forkserver", so everything handed to a
ProcessPool must be importable by name from a module: this one. It imports
only the standard library (never pytest or gevent), so a worker can import
it cheaply. The same functions serve the thread and gevent pools, which is
why none of them sleeps except where the sleep *is* the work.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import signal
import sys
import threading
import time

# --- plain work --------------------------------------------------------------


def identity(x):
    return x


def square(x):
    return x * x


def add(a, b):
    return a + b


def echo(*args, **kwargs):
    """Return exactly what was received, to check argument forwarding."""
    return args, kwargs


def getpid(_ignored=None):
    return os.getpid()


def sleep_then_return(seconds, value=None):
    time.sleep(seconds)
    return value


def spin(n):
    """CPU-bound pure-Python work: ``n`` loop iterations, holding the GIL."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def spin_where(n):
    """``spin`` that also says which process ran it."""
    return os.getpid(), spin(n)


# --- failures ----------------------------------------------------------------


class TaskError(Exception):
    """A user-defined exception type that must survive the trip home."""


def fail(message):
    raise ValueError(message)


def fail_custom(message):
    raise TaskError(message)


def fail_on(x, bad):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x * x


def raise_deep():
    """Fails two frames down, so the remote traceback has names to look for."""
    return _deep_helper_for_traceback()


def _deep_helper_for_traceback():
    raise ValueError("raised deep in the worker")


class UnpicklableError(Exception):
    """An exception that cannot be pickled back to the parent (holds a lock)."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def raise_unpicklable_error():
    raise UnpicklableError("carries a lock")


# --- crashes (each kills the worker process running it) ----------------------


def exit_hard(code=3):
    os._exit(code)


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)  # not reached


def segfault():
    ctypes.string_at(0)


# --- serialization ---------------------------------------------------------------


def return_lock():
    return threading.Lock()


def _refuse_unpickle(message):
    raise RuntimeError(message)


class Unloadable:
    """Pickles fine in the worker; unpickling it in the parent raises."""

    def __reduce__(self):
        return _refuse_unpickle, ("this object refuses to be unpickled",)


def return_unloadable():
    return Unloadable()


# --- blocking across processes: a file-based barrier ---------------------------


def block_on_files(started_path, release_path, limit=30.0):
    """Announce the start by creating ``started_path`` (holding this worker's
    pid), then wait (with its own deadline) until ``release_path`` exists."""
    tmp = f"{started_path}.tmp"
    pathlib.Path(tmp).write_text(str(os.getpid()))
    os.replace(tmp, started_path)
    deadline = time.monotonic() + limit
    while not os.path.exists(release_path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"blocker was never released ({release_path})")
        time.sleep(0.005)
    return "released"


def write_pid_then_sleep(pid_path, seconds):
    """Publish this worker's pid (atomically), then sleep: a long-running task."""
    tmp = f"{pid_path}.tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, pid_path)
    time.sleep(seconds)
    return "slept"


# --- shared state handed over through the pool's initializer -----------------

_shared_array = None
_shared_lock = None


def init_shared(array, lock):
    global _shared_array, _shared_lock
    _shared_array = array
    _shared_lock = lock


def increment_shared(index, times):
    for _ in range(times):
        with _shared_lock:
            _shared_array[index] += 1
    return index


def initialized():
    """True in a worker whose initializer ran."""
    return _shared_array is not None and _shared_lock is not None


# --- start-up failures and results that misbehave in the parent -----------------


def init_raises(message):
    raise ValueError(message)


def init_hangs(seconds):
    time.sleep(seconds)  # the hang is the point: startup_timeout must cut it short


class ExitOnUnpickle:
    """Pickles fine in the worker; unpickling it in the parent raises SystemExit."""

    def __reduce__(self):
        return sys.exit, ("unpickled a SystemExit",)


def return_exit_on_unpickle():
    return ExitOnUnpickle()


def big_result(size):
    return bytes(size)


# --- the lesson's shared state: objects made with the top-level multiprocessing API ---

_shared = {}


def init_positional(*objects):
    _shared["objects"] = objects


def bump_value(times):
    value = _shared["objects"][0]
    for _ in range(times):
        with value.get_lock():
            value.value += 1
    return os.getpid()


def bump_array_under(index, times):
    """``array[index] += 1`` under the handed-over lock (taken twice if it is an RLock)."""
    array, lock = _shared["objects"]
    reentrant = type(lock).__name__ == "RLock"
    for _ in range(times):
        with lock:
            if reentrant:
                with lock:
                    array[index] += 1
            else:
                array[index] += 1
    return os.getpid()


def put_on_queue(item):
    _shared["objects"][0].put((item, os.getpid()))
    return os.getpid()


def bump_dict(key, times):
    mapping, lock = _shared["objects"]
    for _ in range(times):
        with lock:
            mapping[key] = mapping.get(key, 0) + 1
    return os.getpid()


# --- the tasks of CPython's _TestPool (Lib/test/_test_multiprocessing.py) --------------


def sqr(x, wait=0.0):
    time.sleep(wait)
    return x * x


def mul(x, y):
    return x * y


def raising():
    raise KeyError("key")


def unpickleable_result():
    return lambda: 42


def raise_large_valuerror(wait):
    time.sleep(wait)
    raise ValueError("x" * 1024 ** 2)


def traceback_raiser():
    raise RuntimeError(123)  # some comment
