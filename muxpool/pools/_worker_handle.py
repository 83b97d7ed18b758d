"""The parent's handle on one ProcessPool worker: its process, its two pipes,
their buffers, and the tasks it holds.

Writes never block (what the pipe will not take waits in ``outbuf`` for the
supervisor to flush), so a submitting thread can hand a task straight to an
idle worker. Reads drain the pipe in 1 MiB gulps and cut the frames out of
``inbuf`` (see :mod:`._procworker` for the wire format).
"""

from __future__ import annotations

import collections
import fcntl
import multiprocessing
import os
import time

from ..errors import RemoteTraceback, WorkerCrashed
from . import _procworker

HEADER = _procworker.HEADER
PIPE_SIZE = 1 << 20


class Task:
    """One call, from submission until its outcome is delivered."""

    __slots__ = ("id", "frame", "fut", "callback", "task_timeout", "started", "holds_slot",
                 "running", "dropped")

    def __init__(self, task_id, frame, fut, callback, task_timeout, holds_slot):
        self.id = task_id
        self.frame = frame  # kept until settled: a task a dead worker never began is resent
        self.fut = fut
        self.callback = callback
        self.task_timeout = task_timeout
        self.started = 0.0
        self.holds_slot = holds_slot
        self.running = False   # its future is RUNNING: it is, or was, a worker's current task
        self.dropped = False   # cancelled by its caller after it was sent: ignore its result


class WorkerHandle:
    __slots__ = ("process", "pid", "task_fd", "result_fd", "conns", "inbuf", "outbuf",
                 "inflight", "sent", "ready", "doomed", "retiring", "started_at", "init_error",
                 "startup_expired", "big", "big_id", "big_filled", "rss", "stop_when_idle")

    def __init__(self, ctx, name: str, initializer, initargs: tuple, max_tasks: int | None,
                 max_memory: int | None = None):
        task_r, task_w = ctx.Pipe(duplex=False)
        result_r, result_w = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_procworker.worker_main, name=name, daemon=True,
            args=(task_r, result_w, initializer, initargs, max_tasks, max_memory))
        self.started_at = time.monotonic()
        self.process.start()
        task_r.close()  # the child's ends: EOF must reach each side when the other goes
        result_w.close()
        self.pid = self.process.pid
        self.conns = (task_w, result_r)  # keep the Connection objects: they own the fds
        self.task_fd = task_w.fileno()
        self.result_fd = result_r.fileno()
        for fd in (self.task_fd, self.result_fd):
            os.set_blocking(fd, False)
            _grow_pipe(fd)
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.inflight: collections.deque[Task] = collections.deque()
        self.sent = 0
        self.ready = False      # its initializer has run
        self.doomed = False     # killed on purpose: its tasks are already settled
        self.retiring = max_tasks == 0
        self.init_error: tuple | None = None  # (exception, traceback text) if its initializer raised
        self.startup_expired = False  # killed for overrunning startup_timeout
        self.big: bytearray | None = None  # a frame larger than the pipe, being filled
        self.big_id = self.big_filled = 0
        self.rss = 0  # bytes as last reported (max_worker_memory only; under it, maybe the peak)
        self.stop_when_idle = False  # over max_worker_memory: told to stop once its task is answered

    def write(self, frame: bytes) -> bool:
        """Send without blocking; True when some bytes now wait for :meth:`flush`."""
        if not self.outbuf:
            try:
                written = os.write(self.task_fd, frame)
            except BlockingIOError:
                written = 0
            except OSError:
                return False  # the worker is gone; its exit settles its tasks
            if written == len(frame):
                return False
            frame = frame[written:]
        self.outbuf += frame
        return True

    def flush(self) -> bool:
        """Write what waits; True when everything is out."""
        try:
            written = os.write(self.task_fd, self.outbuf)
        except BlockingIOError:
            return False
        except OSError:
            written = len(self.outbuf)  # the worker is gone
        del self.outbuf[:written]
        return not self.outbuf

    def read_frames(self) -> tuple[list[tuple[int, bytes]], bool]:
        """The complete ``(task_id, payload)`` frames that arrived, and whether EOF was seen."""
        frames: list = []
        eof = False
        try:
            while True:
                if self.big is not None:  # a large frame is read straight into its own buffer
                    n = os.readv(self.result_fd, [memoryview(self.big)[self.big_filled:]])
                    self.big_filled += n
                    if self.big_filled == len(self.big):
                        frames.append((self.big_id, self.big))
                        self.big = None
                    if n == 0:
                        eof = True
                        break
                    continue
                chunk = os.read(self.result_fd, PIPE_SIZE)
                if not chunk:
                    eof = True
                    break
                self.inbuf += chunk
                self._cut_frames(frames)
                if len(chunk) < PIPE_SIZE and self.big is None:
                    break
        except OSError:
            pass  # BlockingIOError: nothing more for now
        return frames, eof

    def _cut_frames(self, frames: list) -> None:
        buf, pos = self.inbuf, 0
        while len(buf) - pos >= HEADER.size:
            size, task_id = HEADER.unpack_from(buf, pos)
            start, end = pos + HEADER.size, pos + 4 + size
            if len(buf) < end:
                if size > PIPE_SIZE:  # too big to grow inbuf for: one allocation, no copies
                    self.big, self.big_id = bytearray(end - start), task_id
                    self.big_filled = len(buf) - start
                    self.big[:self.big_filled] = memoryview(buf)[start:]
                    pos = len(buf)
                break
            with memoryview(buf) as view:
                frames.append((task_id, bytes(view[start:end])))
            pos = end
        del buf[:pos]

    def close(self) -> None:
        self.process.join()
        for conn in self.conns:
            conn.close()


def _grow_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe (Linux): a large chunk or result then crosses in
    one write instead of sixteen 64 KiB wake-ups."""
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size for this user: keep the default


def startup_failed(worker: WorkerHandle, startup_timeout: float) -> WorkerCrashed:
    """The error for tasks of a pool whose workers keep failing to start: it
    names the cause (the initializer's exception is its ``__cause__``)."""
    if worker.init_error is not None:
        exc, tb_text = worker.init_error
        exc.__cause__ = RemoteTraceback(tb_text)
        why = f"its initializer raised {exc!r}"
    elif worker.startup_expired:
        exc = None
        why = f"its start-up (the initializer) took longer than startup_timeout={startup_timeout} s"
    else:
        exc = None
        why = f"it exited during start-up with code {worker.process.exitcode}"
    err = WorkerCrashed(worker.pid, worker.process.exitcode)
    # WorkerCrashed's own text speaks of "this task"; no task ran here.
    err.args = (f"worker process {worker.pid} could not start: {why}",)
    err.__cause__ = exc
    return err


def default_start_method() -> str:
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else methods[0]
