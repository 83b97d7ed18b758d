"""A prefork worker: how it starts, what it runs, how its supervisor watches it.

Two ways to start one, chosen by the supervisor for each worker:

* **fork** (:class:`ForkedWorker`), when the supervisor's process runs no
  other thread (``muxpool serve --engine prefork``: the supervisor is the
  main thread, alone). The child inherits everything, the app included, and
  is watched through a pidfd. ``PR_SET_PDEATHSIG`` sends it SIGTERM if the
  supervisor dies, however it dies.
* **the fork server** (:class:`ServedWorker`), otherwise: forking a process
  that runs threads copies locks other threads may hold at that instant
  (logging's, the allocator's, the import lock), and the child can deadlock
  on them before it ever serves (Python 3.12+ warns of exactly this). The
  worker is forked instead by ``multiprocessing``'s fork server, a
  single-threaded process started cleanly, and receives the listening
  socket, the shared stats array and the pickled app as arguments. It is the
  fork server's child, not ours: its exit is watched through
  ``process.sentinel``, and it watches its supervisor through
  ``parent_process().sentinel`` (EOF when the supervisor dies).

Either way the worker runs :func:`serve`: an ordinary :class:`Server` on the
handed-down socket, with a heartbeat timer that publishes its counters.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import pickle
import signal
import time
from dataclasses import fields, replace

from ..multiplexer import EVENT_READ
from ..server import Server
from . import worker_logs
from .slots import STARTING, UNUSED, WorkerSlot, slot_count
from .worker_logs import LogForwarder

# Held back across fork until the worker's own handlers are in place.
WORKER_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_PR_SET_PDEATHSIG = 1


def serve(app, listener, ssl_context, config, shared, slot: int, period: float,
          parent_gone_fd: int | None = None, mask: set | None = None) -> None:
    """Run one worker's server until it drains; the caller exits the process."""
    worker_logs.mark_worker()
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the parent decides
    worker_config = _worker_config(config)
    siblings = SlotSiblings(shared, slot, period, worker_config.max_connections, parent_gone_fd,
                            private_queue=config.reuse_port)
    worker = Server(app, config=worker_config, listener=listener, ssl_context=ssl_context,
                    siblings=siblings)
    signal.signal(signal.SIGTERM, lambda *_: worker.shutdown(wait=False))
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a SIGTERM held back arrives now
    worker.serve_forever()


def _worker_config(config):
    """The supervisor's config as one worker runs it: its worker_engine, and
    none of the prefork-only options (they are the supervisor's, and set on
    another engine they would be refused)."""
    defaults = {f.name: f.default for f in fields(config) if f.metadata["engines"] == ("prefork",)}
    return replace(config, **defaults, engine=config.worker_engine)


class SlotSiblings:
    """A worker's :class:`~muxpool.server.Siblings`, through the supervisor's shared
    slots: it publishes its own counters and heartbeat in its slot, and reads the
    others' to know whether one has room (on the shared socket the kernel hands
    a connection to whichever worker accepts first, so a full one asks before it
    closes a waiting client). With reuse_port a worker's socket is its own: what
    waits there no sibling will ever take, so a full worker closes it at once,
    as one server does."""

    def __init__(self, shared, slot: int, period: float, limit: int, parent_gone_fd: int | None,
                 private_queue: bool = False):
        self._private_queue = private_queue
        self._metrics_snapshot = None
        self._mine = WorkerSlot(shared, slot)
        self._others = [WorkerSlot(shared, other) for other in range(slot_count(shared)) if other != slot]
        self._period, self._limit = period, limit
        self._parent_gone_fd = parent_gone_fd

    def serving(self, mux, stats, stop, metrics_snapshot=None) -> None:
        self._metrics_snapshot = metrics_snapshot
        if self._parent_gone_fd is not None:
            fd = self._parent_gone_fd

            def parent_gone(_mask: int) -> None:
                mux.unregister(fd)  # EOF stays readable: once is enough
                stop()

            # Readable (EOF) once the supervisor is gone, however it went: drain and exit.
            mux.register(fd, EVENT_READ, parent_gone)

        def beat() -> None:  # on the worker's loop, so it is also the loop's heartbeat
            self._publish_totals(stats)
            self._mine.heartbeat = time.monotonic_ns()
            mux.call_later(self._period, beat)

        mux.call_later(0, beat)  # the first beat says: started

    def room(self) -> bool | None:
        if self._private_queue:
            return False
        now, unknown = time.monotonic_ns(), False
        for sibling in self._others:
            beat = sibling.heartbeat
            if beat == UNUSED:
                continue
            if beat == STARTING or now - beat >= (2 * self._period + 1) * 1e9:
                unknown = True
            elif sibling.open_connections < self._limit:
                return True
        return None if unknown else False

    def holding(self, connections: int) -> None:
        self._mine.open_connections = connections

    def report(self, stats, connections: int, queued: int) -> None:  # the supervisor logs them all
        _rate, p50, p99 = stats.snapshot()
        mine = self._mine
        mine.open_connections, mine.queued = connections, queued
        mine.p50_us, mine.p99_us = int(p50 * 1000), int(p99 * 1000)

    def stopped(self, stats) -> None:
        self._publish_totals(stats)

    def _publish_totals(self, stats) -> None:
        self._mine.connections_total = stats.connections_total
        self._mine.messages_total = stats.messages_total
        if self._metrics_snapshot is not None:  # the supervisor serves /metrics for every worker
            self._mine.publish(self._metrics_snapshot())


# --- fork -------------------------------------------------------------------------------


class ForkedWorker:
    """A worker forked from a single-threaded supervisor: our child, watched by pidfd.
    Its log records come to us as a served worker's do (:mod:`.worker_logs` says why)."""

    __slots__ = ("lane", "logs", "pid", "retiring", "sentinel", "slot", "started")

    def __init__(self, pid: int, slot: int, lane: int, logs: LogForwarder):
        self.pid = pid
        self.slot = slot
        self.lane = lane  # which of the server's listening sockets it serves
        self.started = time.monotonic()
        self.retiring = False
        self.logs = logs
        self.sentinel = os.pidfd_open(pid)

    def exit_status(self) -> int | None:
        """``None`` while it runs; then its exit code, or ``-signum`` if a signal killed it."""
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        return None if pid == 0 else os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        self.logs.finish(self.pid)  # what it logged on its way out
        self.logs.close()
        os.close(self.sentinel)

    def release(self) -> None:
        """In a worker forked after this one: close the copies of its fds, reading nothing."""
        self.logs.close()
        os.close(self.sentinel)


def die_with_parent(parent: int) -> None:
    """In a forked worker: SIGTERM (a drain) when the supervisor dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's kill_all is all there is
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


# --- the fork server -----------------------------------------------------------------------


class ServedWorker:
    """A worker forked by ``multiprocessing``'s fork server: watched through its sentinel."""

    __slots__ = ("lane", "logs", "pid", "process", "retiring", "sentinel", "slot", "started")

    def __init__(self, process: multiprocessing.process.BaseProcess, slot: int, lane: int,
                 logs: LogForwarder):
        self.process = process
        self.pid = process.pid
        self.slot = slot
        self.lane = lane
        self.started = time.monotonic()
        self.retiring = False
        self.sentinel = process.sentinel
        self.logs = logs

    def exit_status(self) -> int | None:
        return self.process.exitcode

    def close(self) -> None:
        self.logs.finish(self.pid)  # what it logged on its way out
        self.logs.close()
        self.process.close()

    def release(self) -> None:
        self.logs.close()


def start_served(app, listener, config, shared, slot: int, lane: int,
                 period: float) -> ServedWorker:
    """Start a worker through the fork server. Raises ``TypeError`` naming the fix when
    the app cannot be pickled (the other arguments always can)."""
    context = multiprocessing.get_context("forkserver")
    # daemon: should the supervisor's process exit with a worker left, multiprocessing
    # terminates it rather than waiting for it at exit. The environment comes first:
    # unpickled before the app, so the app's module loads with the supervisor's.
    logs = LogForwarder()
    process = context.Process(target=_served_main, name=f"muxpool-prefork-{slot}", daemon=True,
                              args=(_Environment(os.environ), logs.writer, worker_logs.levels(),
                                    app, listener, config, shared, slot, period))
    try:
        try:
            process.start()
        finally:
            logs.writer.close()  # the worker's copy only: EOF once it exits
    except (pickle.PicklingError, TypeError, AttributeError, RuntimeError) as exc:
        raise TypeError(
            f"prefork: this process runs other threads, so its workers start through a fork "
            f"server and the app must be picklable, and {app!r} is not ({exc}): define it at "
            f"module level (a function, a class, or an instance of a module-level class; "
            f"multiprocessing objects it holds from multiprocessing.get_context('forkserver')), "
            f"or run the server on the main thread of a process with no other thread "
            f"(`muxpool serve module:app --engine prefork`)") from exc
    return ServedWorker(process, slot, lane, logs)


def _served_main(environ: dict, log_socket, log_levels: dict, app, listener, config, shared,
                 slot: int, period: float) -> None:
    multiprocessing.current_process().daemon = False  # a handler may start processes of its own
    worker_logs.send_logs_to(log_socket, log_levels)
    # certfile: the worker builds its own context (an SSLContext cannot be pickled).
    serve(app, listener, None, config, shared, slot, period,
          parent_gone_fd=multiprocessing.parent_process().sentinel)


class _Environment(dict):
    """The supervisor's environment, put in place in the worker as it is unpickled: the
    fork server was started with the environment of its first use, a forked worker
    would see its parent's."""

    def __reduce__(self):
        return _set_environment, (dict(self),)


def _set_environment(environ: dict) -> dict:
    os.environ.clear()
    os.environ.update(environ)
    return environ


def check_fork_server_can_serve(config, ssl_context) -> None:
    """An ``ssl_context`` object cannot reach a worker the fork server starts."""
    if ssl_context is not None and not config.certfile:
        raise TypeError(
            "prefork: this process runs other threads, so its workers start through a fork "
            "server, which cannot hand them an ssl.SSLContext object: pass certfile= (and "
            "keyfile=) so each worker builds its own, or run the server on the main thread of "
            "a process with no other thread (`muxpool serve ... --engine prefork`)")


def thread_count() -> int:
    """Threads in this process, as the kernel counts them (native threads included)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[17])
    except (OSError, ValueError, IndexError):
        import threading

        return threading.active_count()
