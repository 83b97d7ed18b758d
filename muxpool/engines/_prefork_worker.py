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
from dataclasses import replace

from ..multiplexer import EVENT_READ

FIELDS = 7  # per worker slot in the shared array; see prefork.py
HEARTBEAT = 6
# Held back across fork until the worker's own handlers are in place.
WORKER_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_PR_SET_PDEATHSIG = 1


def serve(app, listener, ssl_context, config, shared, slot: int, period: float,
          parent_gone_fd: int | None = None, mask: set | None = None) -> None:
    """Run one worker's server until it drains; the caller exits the process."""
    from ..server import Server

    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the parent decides
    worker = Server(app, listener=listener, ssl_context=ssl_context,
                    **vars(replace(config, engine=config.worker_engine)))
    signal.signal(signal.SIGTERM, lambda *_: worker.shutdown(wait=False))
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a SIGTERM held back arrives now
    if parent_gone_fd is not None:
        # Readable (EOF) once the supervisor is gone, however it went: drain and exit.
        worker.mux.register(parent_gone_fd, EVENT_READ, lambda _mask: worker.shutdown(wait=False))
    base = slot * FIELDS

    def publish_totals():  # on the worker's loop, so it is also the loop's heartbeat
        shared[base] = worker.stats.connections_total
        shared[base + 1] = worker.stats.messages_total
        shared[base + HEARTBEAT] = time.monotonic_ns()
        worker.mux.call_later(period, publish_totals)

    def publish_interval(connections: int, queued: int) -> None:  # instead of logging
        _rate, p50, p99 = worker.stats.snapshot()
        shared[base + 2], shared[base + 3] = connections, int(p50 * 1000)
        shared[base + 4], shared[base + 5] = int(p99 * 1000), queued

    worker.report_stats = publish_interval
    worker.mux.call_later(0, publish_totals)  # the first beat says: started
    worker.serve_forever()
    shared[base] = worker.stats.connections_total
    shared[base + 1] = worker.stats.messages_total


# --- fork -------------------------------------------------------------------------------


class ForkedWorker:
    """A worker forked from a single-threaded supervisor: our child, watched by pidfd."""

    __slots__ = ("pid", "retiring", "sentinel", "slot", "started")

    def __init__(self, pid: int, slot: int):
        self.pid = pid
        self.slot = slot
        self.started = time.monotonic()
        self.retiring = False
        self.sentinel = os.pidfd_open(pid)

    def exit_status(self) -> int | None:
        """``None`` while it runs; then its exit code, or ``-signum`` if a signal killed it."""
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        return None if pid == 0 else os.waitstatus_to_exitcode(status)

    def close(self) -> None:
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

    __slots__ = ("pid", "process", "retiring", "sentinel", "slot", "started")

    def __init__(self, process: multiprocessing.process.BaseProcess, slot: int):
        self.process = process
        self.pid = process.pid
        self.slot = slot
        self.started = time.monotonic()
        self.retiring = False
        self.sentinel = process.sentinel

    def exit_status(self) -> int | None:
        return self.process.exitcode

    def close(self) -> None:
        self.process.close()


def start_served(app_pickle: bytes, listener, config, shared, slot: int, period: float) -> ServedWorker:
    context = multiprocessing.get_context("forkserver")
    # daemon: should the supervisor's process exit with a worker left, multiprocessing
    # terminates it rather than waiting for it at exit.
    process = context.Process(target=_served_main, name=f"muxpool-prefork-{slot}", daemon=True,
                              args=(app_pickle, listener, config, shared, slot, period, dict(os.environ)))
    process.start()
    return ServedWorker(process, slot)


def _served_main(app_pickle: bytes, listener, config, shared, slot: int, period: float,
                 environ: dict) -> None:
    # The fork server was started with the environment of its first use; a worker
    # runs with its supervisor's, as a forked one would, before the app's module loads.
    os.environ.clear()
    os.environ.update(environ)
    multiprocessing.current_process().daemon = False  # a handler may start processes of its own
    app = pickle.loads(app_pickle)
    # certfile: the worker builds its own context (an SSLContext cannot be pickled).
    serve(app, listener, None, config, shared, slot, period,
          parent_gone_fd=multiprocessing.parent_process().sentinel)


def app_pickle_for_fork_server(app, config, ssl_context) -> bytes:
    """The app, pickled for workers the fork server starts; a clear error when it cannot be."""
    if ssl_context is not None and not config.certfile:
        raise TypeError(
            "prefork: this process runs other threads, so its workers start through a fork "
            "server, which cannot hand them an ssl.SSLContext object: pass certfile= (and "
            "keyfile=) so each worker builds its own, or run the server on the main thread of "
            "a process with no other thread (`muxpool serve ... --engine prefork`)")
    try:
        return pickle.dumps(app)
    except Exception as exc:
        raise TypeError(
            f"prefork: this process runs other threads, so its workers start through a fork "
            f"server and the app must be picklable, and {app!r} is not ({exc}): define it at "
            f"module level (a function, a class, or an instance of a module-level class), or "
            f"run the server on the main thread of a process with no other thread "
            f"(`muxpool serve module:app --engine prefork`)") from exc


def thread_count() -> int:
    """Threads in this process, as the kernel counts them (native threads included)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[17])
    except (OSError, ValueError, IndexError):
        import threading

        return threading.active_count()
