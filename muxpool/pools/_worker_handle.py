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
                 "inflight", "sent", "ready", "doomed", "retiring")

    def __init__(self, ctx, name: str, initializer, initargs: tuple, max_tasks: int | None):
        task_r, task_w = ctx.Pipe(duplex=False)
        result_r, result_w = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_procworker.worker_main, name=name, daemon=True,
            args=(task_r, result_w, initializer, initargs, max_tasks))
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
        eof = False
        try:
            while chunk := os.read(self.result_fd, PIPE_SIZE):
                self.inbuf += chunk
                if len(chunk) < PIPE_SIZE:
                    break
            else:
                eof = True
        except OSError:
            pass  # BlockingIOError: nothing more for now
        buf, pos, frames = self.inbuf, 0, []
        while len(buf) - pos >= HEADER.size:
            size, task_id = HEADER.unpack_from(buf, pos)
            end = pos + 4 + size
            if len(buf) < end:
                break
            frames.append((task_id, bytes(buf[pos + HEADER.size:end])))
            pos = end
        del buf[:pos]
        return frames, eof

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


def default_start_method() -> str:
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else methods[0]
