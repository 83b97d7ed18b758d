"""The loop inside each ProcessPool worker process.

Wire format, both directions: a 4-byte big-endian length, then an 8-byte task
id, then a pickle. Parent to worker: ``(func, args, kwargs)``; an empty frame
means "exit". Worker to parent: ``(ok, value, traceback_text)``; id 0 is the
"initializer done" notice and ``INIT_FAILED_ID`` carries ``(exception,
traceback_text)`` of an initializer that raised, just before the worker exits.
With ``max_worker_memory``, a result's pickle is preceded, in its frame, by
the worker's RSS after the task (8 bytes, big-endian): one frame, so the
parent has both at once and decides before it could send this worker more.
The worker answers each task before reading the
next, so the parent always knows which task was running when a worker died.

A worker must not outlive the pool's process, even one killed by SIGKILL.
An idle worker sees EOF on its task pipe; a busy one has a thread that polls
its result pipe, whose write end reports an error once the parent's read end
is gone (``os._exit`` then). That covers ``forkserver``, whose server outlives
the parent while any worker lives (each holds its "alive" fd). With ``fork``
and ``spawn`` the kernel also kills the worker when the thread that started
it dies (``PR_SET_PDEATHSIG``, Linux), even while a C call holds the GIL.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import select
import signal
import struct
import sys
import threading
import traceback

from ..errors import RemoteError, SerializationError
from . import _memory, _pickling

HEADER = struct.Struct("!IQ")  # frame length (counting the id), task id
RSS = struct.Struct("!Q")
READY_ID = 0
INIT_FAILED_ID = (1 << 64) - 1
_PR_SET_PDEATHSIG = 1


def encode_frame(task_id: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload) + 8, task_id) + payload


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _portable_exception(exc: BaseException) -> BaseException:
    """The exception itself if it survives a pickle round trip, else a RemoteError."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RemoteError(type(exc).__qualname__, str(exc))


def _outcome(task: bytes) -> tuple:
    try:
        func, args, kwargs = pickle.loads(task)
    except BaseException as exc:  # noqa: BLE001
        hint = _pickling.worker_unpickling_hint(exc)
        err = SerializationError("arguments", f"cannot unpickle in the worker: {exc!r}{hint}")
        return (False, err, traceback.format_exc())
    try:
        value = func(*args, **kwargs) if kwargs else func(*args)
    except BaseException as exc:  # noqa: BLE001 - SystemExit in a task fails that task only
        return (False, _portable_exception(exc), traceback.format_exc())
    return (True, value, None)


def _encode_outcome(task_id: int, outcome: tuple) -> tuple[bytes, bytes]:
    """The frame as (header, payload): a large result is not copied to prepend the header."""
    try:
        payload = pickle.dumps(outcome, pickle.HIGHEST_PROTOCOL)
        return HEADER.pack(len(payload) + 8, task_id), payload
    except BaseException as exc:  # noqa: BLE001 - a __reduce__ raising SystemExit fails the task only
        ok, _value, tb = outcome
        what = "result" if ok else "exception"
        err = SerializationError("result", f"cannot pickle the task's {what}: {exc!r}")
        payload = pickle.dumps((False, err, tb))
        return HEADER.pack(len(payload) + 8, task_id), payload


def _die_with_parent() -> None:
    """Ask the kernel for SIGKILL when our parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # no prctl: the result pipe's watcher still stops the worker


def _watch_parent(result_fd: int) -> None:
    """Exit when the parent's end of the result pipe closes (the parent died)."""
    poller = select.poll()
    poller.register(result_fd, 0)  # POLLERR and POLLHUP are always reported
    while True:
        for _fd, events in poller.poll():
            if events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                os._exit(3)


def worker_main(task_conn, result_conn, initializer, initargs, max_tasks, max_memory=None) -> None:
    """Entry point of a worker process; returns (exit code 0) on a stop frame,
    at end of input (the parent is gone) or after ``max_tasks`` tasks."""
    # Ctrl-C reaches the whole process group; the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reader = os.fdopen(task_conn.fileno(), "rb", buffering=65536, closefd=False)
    result_fd = result_conn.fileno()
    _die_with_parent()
    threading.Thread(target=_watch_parent, args=(result_fd,), name="parent-watch", daemon=True).start()
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, then exit
            traceback.print_exc()
            sys.stderr.flush()
            report = (_portable_exception(exc), traceback.format_exc())
            _write_all(result_fd, encode_frame(INIT_FAILED_ID, pickle.dumps(report)))
            os._exit(2)
    _write_all(result_fd, encode_frame(READY_ID, b""))
    rss = _memory.rss_reader(max_memory) if max_memory is not None else None
    done = 0
    while max_tasks is None or done < max_tasks:
        header = reader.read(HEADER.size)
        if len(header) < HEADER.size:
            return
        size, task_id = HEADER.unpack(header)
        if size == 8:
            return
        task = reader.read(size - 8)
        outcome = _outcome(task)
        del task
        header, payload = _encode_outcome(task_id, outcome)
        # Measured without the result object; its pickle is still held, so a result
        # bigger than the mark recycles the worker too (it just needed that much).
        del outcome
        if rss is not None:
            header = HEADER.pack(len(payload) + 8 + RSS.size, task_id) + RSS.pack(rss())
        _write_all(result_fd, header + payload if len(payload) < 65536 else header)
        if len(payload) >= 65536:
            _write_all(result_fd, payload)
        del payload
        done += 1
