"""The loop inside each ProcessPool worker process.

Wire format, both directions: a 4-byte big-endian length, then an 8-byte task
id, then a pickle. Parent to worker: ``(func, args, kwargs)``; an empty frame
means "exit". Worker to parent: ``(ok, value, traceback_text)``; id 0 is the
"initializer done" notice. The worker answers each task before reading the
next, so the parent always knows which task was running when a worker died.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
import traceback

from ..errors import RemoteError, SerializationError

HEADER = struct.Struct("!IQ")  # frame length (counting the id), task id
READY_ID = 0


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
        err = SerializationError("arguments", f"cannot unpickle in the worker: {exc!r}")
        return (False, err, traceback.format_exc())
    try:
        value = func(*args, **kwargs) if kwargs else func(*args)
    except BaseException as exc:  # noqa: BLE001 - SystemExit in a task fails that task only
        return (False, _portable_exception(exc), traceback.format_exc())
    return (True, value, None)


def _encode_outcome(task_id: int, outcome: tuple) -> bytes:
    try:
        return encode_frame(task_id, pickle.dumps(outcome, pickle.HIGHEST_PROTOCOL))
    except Exception as exc:
        ok, _value, tb = outcome
        what = "result" if ok else "exception"
        err = SerializationError("result", f"cannot pickle the task's {what}: {exc!r}")
        return encode_frame(task_id, pickle.dumps((False, err, tb)))


def worker_main(task_conn, result_conn, initializer, initargs, max_tasks) -> None:
    """Entry point of a worker process; returns (exit code 0) on a stop frame,
    at end of input (the parent is gone) or after ``max_tasks`` tasks."""
    # Ctrl-C reaches the whole process group; the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reader = os.fdopen(task_conn.fileno(), "rb", buffering=65536, closefd=False)
    result_fd = result_conn.fileno()
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(2)
    _write_all(result_fd, encode_frame(READY_ID, b""))
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
        _write_all(result_fd, _encode_outcome(task_id, outcome))
        del outcome
        done += 1
